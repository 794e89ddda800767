"""Tools: the model, the target test on its outputs, a calibration check, and pseudobulk counts."""

from .._model import ContrastiveVAE
from ._calibration import CalibrationCheck, calibration_check
from ._distance import distance_test
from ._pseudobulk import responder_pseudobulk

__all__ = [
    "CalibrationCheck",
    "ContrastiveVAE",
    "calibration_check",
    "distance_test",
    "responder_pseudobulk",
]
