"""Tools: the model, and a pseudobulk path into count-based DE."""

from .._model import ContrastiveVAE
from ._pseudobulk import responder_pseudobulk

__all__ = ["ContrastiveVAE", "responder_pseudobulk"]
