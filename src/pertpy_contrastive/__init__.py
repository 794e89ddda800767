"""pertpy-contrastive: a contrastive VAE in Pyro for CRISPR screens, as a pertpy tool."""

from importlib.metadata import version

from . import datasets, tl
from ._constants import CellGroup
from ._model import ContrastiveVAE
from ._training_plan import TrainingDivergedError

__version__ = version("pertpy-contrastive")

__all__ = ["CellGroup", "ContrastiveVAE", "TrainingDivergedError", "datasets", "tl"]
