"""Tools: the model, tests and checks on its outputs, and a pseudobulk path into count-based DE."""

from .._model import ContrastiveVAE
from ._calibration import CalibrationCheck, calibration_check
from ._cross_fitting import cross_fitted_salient
from ._distance import distance_test
from ._pseudobulk import responder_pseudobulk

__all__ = [
    "CalibrationCheck",
    "ContrastiveVAE",
    "calibration_check",
    "cross_fitted_salient",
    "distance_test",
    "responder_pseudobulk",
]
