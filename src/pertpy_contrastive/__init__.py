"""pertpy-contrastive: a contrastive VAE in Pyro for CRISPR screens, as a pertpy tool."""

from importlib.metadata import version

from . import datasets, pp, tl
from ._constants import CellGroup
from ._model import ContrastiveVAE
from ._pertpy_registration import register_with_pertpy
from ._training_plan import TrainingDivergedError

register_with_pertpy(ContrastiveVAE)

__version__ = version("pertpy-contrastive")

__all__ = ["CellGroup", "ContrastiveVAE", "TrainingDivergedError", "datasets", "pp", "tl"]
