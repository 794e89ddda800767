"""pertpy-contrastive: a contrastive VAE in Pyro for CRISPR screens, as a pertpy tool."""

import logging
from importlib.metadata import version

from . import datasets, pl, pp, tl
from ._constants import CellGroup
from ._data import InvalidInputError
from ._model import ContrastiveVAE
from ._pertpy_registration import register_with_pertpy
from ._training_plan import TrainingDivergedError, TrainingTerminatedError

# Log through scvi-tools' logger: its handler shows our INFO messages (label counts, reference
# cells) as it shows its own, and scvi.settings.verbosity sets their level. A logger of our own
# would have no handler, and the messages would never reach the user.
logging.getLogger(__name__).parent = logging.getLogger("scvi")

register_with_pertpy(ContrastiveVAE)

__version__ = version("pertpy-contrastive")

__all__ = [
    "CellGroup",
    "ContrastiveVAE",
    "InvalidInputError",
    "TrainingDivergedError",
    "TrainingTerminatedError",
    "datasets",
    "pl",
    "pp",
    "tl",
]
