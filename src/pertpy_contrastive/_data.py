"""Input parsing and validation: which matrix, which cells are controls, which covariates.

Everything here reads the user's data and raises an error that names the problem and the fix.
The only write is the documented group code column, done by :class:`PerturbationGroupField`
through scvi-tools' registry.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from mudata import MuData
from scvi.data.fields import BaseAnnDataField

from ._constants import CONTRAST_SHARE, GROUP_KEY, NO_TARGET, TARGET_KEY, CellGroup

logger = logging.getLogger(__name__)


class InvalidInputError(Exception):
    """Data or arguments the package cannot use; the message names the problem and the fix.

    Every error the package raises on purpose about its input is one, under the built-in type
    a caller would expect (``ValueError``, ``KeyError``, ...): the command line reports these as
    bad input (exit code 2), and anything else as a failure.
    """


class InvalidValueError(InvalidInputError, ValueError):
    """A value that cannot be used."""


class MissingKeyError(InvalidInputError, KeyError):
    """A key (column, layer, modality, ...) that is not there."""

    def __str__(self) -> str:
        # KeyError quotes its message; this one reads as a sentence.
        return str(self.args[0]) if self.args else ""


class InvalidTypeError(InvalidInputError, TypeError):
    """An argument or column of the wrong type."""


class MissingFileError(InvalidInputError, FileNotFoundError):
    """A file or directory that does not exist."""


class ExistingFileError(InvalidInputError, FileExistsError):
    """A file that exists and may not be replaced."""


# Labels that guide-assignment tools use for "no usable guide"; seeing one that the user did not
# exclude almost always means the cells would wrongly be trained on as a perturbation.
_UNASSIGNED_LOOKING_LABELS = {"negative", "multiple", "unassigned", "none", "nan", "na", ""}

_CHUNK_ROWS = 10_000


def as_label_list(labels: str | Iterable[str] | None) -> list[str]:
    """Normalise a label or a list of labels to a list of strings."""
    if labels is None:
        return []
    if isinstance(labels, str):
        return [labels]
    return [str(label) for label in labels]


def resolve_modality(data: AnnData | MuData, modality: str) -> AnnData:
    """Return the AnnData to model: ``data`` itself, or its ``modality`` if it is a MuData."""
    if isinstance(data, MuData):
        if modality not in data.mod:
            raise MissingKeyError(
                f"The MuData has no modality {modality!r}; its modalities are {list(data.mod)}. "
                "Pass modality=<name of the RNA modality>."
            )
        return data.mod[modality]
    if isinstance(data, AnnData):
        return data
    raise InvalidTypeError(f"Expected an AnnData or a MuData, got {type(data).__name__}.")


def get_count_matrix(adata: AnnData, layer: str | None):
    """Return ``adata.X`` or ``adata.layers[layer]`` without copying it."""
    if layer is None:
        if adata.X is None:
            raise InvalidValueError("adata.X is empty. Pass layer=<name of the raw counts layer>.")
        return adata.X
    if layer not in adata.layers:
        raise MissingKeyError(
            f"Layer {layer!r} not found. Available layers: {list(adata.layers)}. "
            "Pass layer=None to use adata.X."
        )
    return adata.layers[layer]


def _row_chunks(matrix):
    """Yield ``(first row, rows)`` chunks, so that a sparse or backed matrix is never densified."""
    for start in range(0, matrix.shape[0], _CHUNK_ROWS):
        yield start, matrix[start : start + _CHUNK_ROWS]


def median_library_size(matrix) -> float:
    """Median total count per cell, read in row chunks."""
    totals = [np.asarray(chunk.sum(axis=1)).ravel() for _, chunk in _row_chunks(matrix)]
    return float(np.median(np.concatenate(totals)))


def validate_counts(matrix, source: str, obs_names: Sequence[str]) -> None:
    """Check that ``matrix`` holds raw counts: finite, non-negative, integer, no empty cells.

    Reads row chunks so that a sparse or backed matrix is never densified as a whole.
    """
    has_non_integer = False
    empty_cells: list[int] = []
    for start, chunk in _row_chunks(matrix):
        values = chunk.data if sp.issparse(chunk) else np.asarray(chunk)
        if not np.isfinite(values).all():
            raise InvalidValueError(
                f"{source} contains NaN or infinite values. ContrastiveVAE models raw UMI counts: "
                "pass the layer that holds them with layer=<name>, or fix the missing values."
            )
        if (values < 0).any():
            raise InvalidValueError(
                f"{source} contains negative values, so it is not raw counts (scaled or "
                "centred data?). Pass the raw UMI counts with layer=<name>."
            )
        has_non_integer = has_non_integer or bool(np.any(values != np.round(values)))
        totals = np.asarray(chunk.sum(axis=1)).ravel()
        empty_cells.extend((np.flatnonzero(totals == 0) + start).tolist())
    if empty_cells:
        examples = ", ".join(str(obs_names[i]) for i in empty_cells[:5])
        raise InvalidValueError(
            f"{len(empty_cells)} cells have zero total counts in {source} (e.g. {examples}). "
            "Their library size is zero, so they cannot be modelled. Remove them first, e.g. "
            "`adata = adata[adata.X.sum(1).A1 > 0].copy()` or `sc.pp.filter_cells(adata, min_counts=1)`."
        )
    if has_non_integer:
        warnings.warn(
            f"{source} contains non-integer values. The count likelihood assumes raw UMI counts; "
            "normalised or log-transformed data give a meaningless fit. Pass the raw counts "
            "with layer=<name> if you have them.",
            UserWarning,
            stacklevel=3,
        )


def _missing_key_error(adata: AnnData, key: str, role: str, parent_obs: pd.DataFrame | None):
    hint = ""
    if parent_obs is not None and key in parent_obs:
        hint = (
            f" It is a column of the MuData's global obs: copy it to the modality first, e.g. "
            f"`mdata.mod[modality].obs[{key!r}] = mdata.obs[{key!r}]`."
        )
    return MissingKeyError(
        f"{role} {key!r} is not a column of obs. Available columns: {list(adata.obs.columns)}."
        + hint
    )


def validate_covariates(
    adata: AnnData,
    categorical: dict[str, str],
    continuous: Sequence[str],
    parent_obs: pd.DataFrame | None = None,
) -> None:
    """Check that covariate columns exist and have no missing values.

    ``categorical`` maps each categorical obs key to its role, used in the error message.
    """
    for key, role in categorical.items():
        if key not in adata.obs:
            raise _missing_key_error(adata, key, role, parent_obs)
        n_missing = int(adata.obs[key].isna().sum())
        if n_missing:
            raise InvalidValueError(
                f"obs[{key!r}] ({role}) has {n_missing} missing values. Fill them with an "
                f"explicit category (e.g. `adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)"
                ".replace('nan', 'unknown')`) or drop those cells."
            )
    for key in continuous:
        if key not in adata.obs:
            raise _missing_key_error(adata, key, "Continuous covariate", parent_obs)
        column = adata.obs[key]
        if not pd.api.types.is_numeric_dtype(column):
            raise InvalidTypeError(
                f"Continuous covariate obs[{key!r}] is not numeric (dtype {column.dtype}). "
                "Pass it in categorical_covariate_keys instead, or convert it to numbers."
            )
        n_bad = int((~np.isfinite(column.to_numpy(dtype=float))).sum())
        if n_bad:
            raise InvalidValueError(
                f"Continuous covariate obs[{key!r}] has {n_bad} NaN or infinite values. "
                "Impute them (e.g. with the median) or drop those cells."
            )


def is_contrast_control(obs_names: Sequence[str]) -> np.ndarray:
    """Whether a control with each of these names is a contrast control (``CONTRAST_SHARE``).

    A hash of the cell's name, not a draw: the role of a cell is the same in every AnnData that
    holds it (a subset, a reordering, the file read back), with no index stored anywhere, and a
    barcode carries no biology, so the split is random with respect to everything measured.
    """
    digests = b"".join(
        hashlib.blake2b(str(name).encode(), digest_size=8, salt=b"contrast").digest()
        for name in obs_names
    )
    return np.frombuffer(digests, dtype="<u8") < np.uint64(CONTRAST_SHARE * 2.0**64)


def assign_groups(
    labels: pd.Series,
    control_labels: Sequence[str],
    excluded_labels: Sequence[str],
    perturbation_key: str,
    require_contrast: bool = True,
) -> np.ndarray:
    """Split cells into background controls, contrast controls, targets and excluded cells.

    Missing or empty labels and ``excluded_labels`` are excluded; ``control_labels`` are
    controls, background or contrast by :func:`is_contrast_control`; every other label is a
    target. With ``require_contrast``, every group must be non-empty.
    """
    text = labels.astype("string")
    missing = (text.isna() | (text.str.strip() == "")).to_numpy(dtype=bool, na_value=True)
    is_control = text.isin(control_labels).to_numpy(dtype=bool, na_value=False)
    is_excluded = missing | text.isin(excluded_labels).to_numpy(dtype=bool, na_value=False)

    groups = np.full(len(labels), CellGroup.TARGET, dtype=np.int64)
    groups[is_control] = CellGroup.BACKGROUND
    groups[is_control & is_contrast_control(labels.index)] = CellGroup.CONTRAST
    groups[is_excluded] = CellGroup.EXCLUDED
    if require_contrast:
        _check_groups(text, groups, missing, control_labels, excluded_labels, perturbation_key)
    return groups


def _check_groups(text, groups, missing, control_labels, excluded_labels, perturbation_key):
    """Refuse labels that leave a group empty; warn of labels that look unassigned."""
    counts = text[~missing].value_counts()
    absent = [label for label in control_labels if label not in counts.index]
    if absent:
        shown = ", ".join(f"{label!r} ({n})" for label, n in counts.head(15).items())
        raise InvalidValueError(
            f"Control label(s) {absent} not found in obs[{perturbation_key!r}]. Labels present "
            f"(cells): {shown}{', ...' if len(counts) > 15 else ''}. Pass control=<the label of "
            "your non-targeting or control cells>."
        )
    sizes = {group: int((groups == group).sum()) for group in CellGroup}
    if sizes[CellGroup.BACKGROUND] + sizes[CellGroup.CONTRAST] == 0:
        raise InvalidValueError(
            f"No control cells: every cell labelled {control_labels} in obs[{perturbation_key!r}] "
            "is excluded. Controls define the background; remove them from exclude=."
        )
    if not sizes[CellGroup.BACKGROUND] or not sizes[CellGroup.CONTRAST]:
        raise InvalidValueError(
            f"Only {sizes[CellGroup.BACKGROUND] + sizes[CellGroup.CONTRAST]} control "
            "cells: the model trains half of the controls as the background and tests the "
            "targets against the other half, and one of the halves is empty. Add control "
            "cells (a screen needs at least dozens)."
        )
    if not sizes[CellGroup.TARGET]:
        raise InvalidValueError(
            f"No perturbed cells: every labelled cell in obs[{perturbation_key!r}] is a control "
            "or excluded. Check control= and exclude=."
        )
    suspicious = [
        label
        for label in counts.index
        if label.strip().lower() in _UNASSIGNED_LOOKING_LABELS
        and label not in control_labels
        and label not in excluded_labels
    ]
    for label in suspicious:
        warnings.warn(
            f"obs[{perturbation_key!r}] has label {label!r} ({counts[label]} cells), which looks "
            "like a guide-assignment placeholder. It is treated as a perturbation target. Pass "
            f"exclude=[{label!r}] to leave these cells out of training.",
            UserWarning,
            stacklevel=4,
        )
    logger.info(
        "Cell groups from obs[%r]: %d controls (%d train the background, %d are the contrast "
        "of the tests), %d perturbed, %d excluded.",
        perturbation_key,
        sizes[CellGroup.BACKGROUND] + sizes[CellGroup.CONTRAST],
        sizes[CellGroup.BACKGROUND],
        sizes[CellGroup.CONTRAST],
        sizes[CellGroup.TARGET],
        sizes[CellGroup.EXCLUDED],
    )


class _PerturbationObsField(BaseAnnDataField):
    """An obs column derived from the perturbation labels, written as ``_scvi_<registry_key>``.

    scvi-tools' loaders read only registered obs columns, so derived codes are written next to
    scvi-tools' own ``_scvi_*`` columns.
    """

    def __init__(self, perturbation_key: str, control_labels: Sequence[str], excluded_labels):
        super().__init__()
        self.perturbation_key = perturbation_key
        self.control_labels = list(control_labels)
        self.excluded_labels = list(excluded_labels)

    @property
    def attr_name(self) -> str:
        return "obs"

    @property
    def attr_key(self) -> str:
        return f"_scvi_{self.registry_key}"

    @property
    def is_empty(self) -> bool:
        return False

    def validate_field(self, adata: AnnData) -> None:
        if self.perturbation_key not in adata.obs:
            raise MissingKeyError(
                f"Perturbation key {self.perturbation_key!r} is not a column of obs. Available "
                f"columns: {list(adata.obs.columns)}."
            )

    def view_state_registry(self, state_registry: dict) -> None:
        return None


class PerturbationGroupField(_PerturbationObsField):
    """Registers each cell's :class:`~pertpy_contrastive._constants.CellGroup` code.

    The code is written to ``obs['_scvi_contrastive_group']``. Unlike
    :class:`~scvi.data.fields.CategoricalObsField`, it accepts missing labels (they mark
    excluded cells) and keeps the control and excluded labels in the registry, so that the
    same rule applies when a saved model meets new data.
    """

    @property
    def registry_key(self) -> str:
        return GROUP_KEY

    def _write_groups(self, adata: AnnData, groups: np.ndarray) -> dict:
        adata.obs[self.attr_key] = groups
        return {
            "perturbation_key": self.perturbation_key,
            "control_labels": self.control_labels,
            "excluded_labels": self.excluded_labels,
        }

    def register_field(self, adata: AnnData) -> dict:
        self.validate_field(adata)
        # setup_anndata has already checked the contrast, warned and logged the group counts,
        # before writing anything; doing it again here would repeat them.
        groups = assign_groups(
            adata.obs[self.perturbation_key],
            self.control_labels,
            self.excluded_labels,
            self.perturbation_key,
            require_contrast=False,
        )
        return self._write_groups(adata, groups)

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        # New data only needs labels for training; for inference, cells without the
        # perturbation column are simply excluded.
        if self.perturbation_key in adata_target.obs:
            groups = assign_groups(
                adata_target.obs[self.perturbation_key],
                self.control_labels,
                self.excluded_labels,
                self.perturbation_key,
                require_contrast=False,
            )
        else:
            groups = np.full(adata_target.n_obs, CellGroup.EXCLUDED, dtype=np.int64)
        return self._write_groups(adata_target, groups)

    def get_summary_stats(self, state_registry: dict) -> dict:
        return {}


class PerturbationTargetField(_PerturbationObsField):
    """Registers each cell's target index: the position of its label among the trained targets.

    The responder prior of the model is per target, so the loaders must carry the index. It is
    written to ``obs['_scvi_contrastive_target']`` (``NO_TARGET`` for controls and for labels
    that are not trained targets). The trained targets are the labels of the target cells at
    registration, sorted; the registry keeps them, so new data is indexed the same way.
    """

    @property
    def registry_key(self) -> str:
        return TARGET_KEY

    def _write_codes(self, adata: AnnData, target_labels: list[str]) -> dict:
        if self.perturbation_key in adata.obs:
            labels = adata.obs[self.perturbation_key].astype("string")
            codes = pd.Categorical(labels, categories=target_labels).codes.astype(np.int64)
        else:
            codes = np.full(adata.n_obs, NO_TARGET, dtype=np.int64)
        codes[codes < 0] = NO_TARGET
        adata.obs[self.attr_key] = codes
        return {"target_labels": list(target_labels)}

    def register_field(self, adata: AnnData) -> dict:
        self.validate_field(adata)
        labels = adata.obs[self.perturbation_key]
        groups = assign_groups(
            labels,
            self.control_labels,
            self.excluded_labels,
            self.perturbation_key,
            require_contrast=False,
        )
        targets = sorted(set(labels.astype(str).to_numpy()[groups == CellGroup.TARGET]))
        return self._write_codes(adata, targets)

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        return self._write_codes(adata_target, state_registry["target_labels"])

    def get_summary_stats(self, state_registry: dict) -> dict:
        return {"n_targets": len(state_registry["target_labels"])}
