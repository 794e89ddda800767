"""Tools: the model, as ``pertpy_contrastive.tl.ContrastiveVAE``."""

from .._model import ContrastiveVAE

__all__ = ["ContrastiveVAE"]
