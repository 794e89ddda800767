"""Perturbation labels from pertpy's guide assignments."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from mudata import MuData

from .._data import InvalidValueError, MissingKeyError

logger = logging.getLogger(__name__)

MultiplePolicy = Literal["exclude", "combine"]


def _guide_sets(guides: AnnData, assignment: str, unassigned, multiple_label, separator):
    """Per cell, the set of assigned guide names (None: several guides, names unknown)."""
    if assignment in guides.obs:
        sets = []
        for label in guides.obs[assignment].astype("string"):
            if pd.isna(label) or label.strip() in unassigned or not label.strip():
                sets.append(set())
            elif label == multiple_label:
                sets.append(None)
            else:
                sets.append({part.strip() for part in label.split(separator)})
        return sets
    if assignment in guides.layers:
        matrix = sp.csr_matrix(guides.layers[assignment])
        names = np.asarray(guides.var_names)
        return [
            set(names[matrix.indices[start:end][matrix.data[start:end] > 0]])
            for start, end in zip(matrix.indptr[:-1], matrix.indptr[1:], strict=True)
        ]
    raise MissingKeyError(
        f"{assignment!r} is neither an obs column nor a layer of the guide data. Run "
        "pt.pp.GuideAssignment first (assign_to_max_guide / assign_mixture_model write "
        "obs['assigned_guide'], assign_by_threshold writes layers['assigned_guides']). "
        f"obs columns: {list(guides.obs.columns)}; layers: {list(guides.layers)}."
    )


def perturbation_labels(
    data: MuData | AnnData,
    *,
    assignment: str = "assigned_guide",
    guide_modality: str = "gdo",
    rna_modality: str = "rna",
    target_key: str | None = "target_gene",
    guide_to_target: Mapping[str, str] | None = None,
    control: str = "non-targeting",
    multiple: MultiplePolicy = "exclude",
    unassigned: Sequence[str] = ("Negative", "negative"),
    multiple_label: str = "multiple",
    separator: str = "+",
    key_added: str = "perturbation",
    guide_key_added: str | None = None,
    overwrite: bool = False,
) -> pd.Series:
    """Turn pertpy guide assignments into the perturbation labels the model trains on.

    Reads any of the three outputs of :class:`pertpy.preprocessing.GuideAssignment`:
    ``assign_to_max_guide`` (``obs['assigned_guide']``, ``"Negative"`` for no guide),
    ``assign_mixture_model`` (``obs['assigned_guide']`` with ``"negative"``, ``"multiple"`` and
    ``"g1+g2"``) and ``assign_by_threshold`` (a binary guide-by-cell layer, pass
    ``assignment="assigned_guides"``). Each guide maps to its target through
    ``var[target_key]`` of the guide data, or through ``guide_to_target``.

    Rules:

    - a cell whose guides all target ``control`` is labelled ``control`` (background);
    - control guides next to targeting guides are ignored: the targeting guides perturb the cell;
    - a cell with no guide gets a missing label, so the model excludes it (never background);
    - a cell with guides for several targets is excluded (``multiple="exclude"``, for low-MOI
      screens) or labelled with the sorted targets joined by ``+``, e.g. ``"IFNGR1+JAK2"``
      (``multiple="combine"``, for high-MOI screens); a cell labelled ``multiple_label`` by
      the mixture model (guide names unknown) is always excluded.

    Counts per outcome are logged at INFO level.

    Parameters
    ----------
    data
        MuData with the guide and RNA modalities, or the guide AnnData alone.
    assignment
        obs column or layer of the guide data holding pertpy's assignment.
    guide_modality, rna_modality
        Modality names, for a MuData.
    target_key
        Column of the guide data's ``var`` with each guide's target gene.
    guide_to_target
        Mapping from guide name to target; used instead of ``target_key`` when given.
    control
        Target label of control guides (e.g. ``"non-targeting"``).
    multiple
        Policy for cells with guides against several targets: ``"exclude"`` or ``"combine"``.
    unassigned
        Labels pertpy uses for cells without a guide.
    multiple_label
        Label the mixture model uses for cells with too many guides.
    separator
        Separator of several guides in one label, and of the targets in a combined label
        (``multiple="combine"``).
    key_added
        obs column written: on the RNA modality for a MuData, else on ``data``.
    guide_key_added
        Also write each labelled cell's guide (several joined by ``separator``) to this obs
        column, for ``ContrastiveVAE.setup_anndata(guide_key=...)`` and per-guide responder
        fractions.
        Cells without a label get a missing value.
    overwrite
        Replace existing ``key_added`` / ``guide_key_added`` columns; otherwise an existing
        column is an error.

    Returns
    -------
    The labels, indexed by cell; also written to ``obs[key_added]``.
    """
    if multiple not in ("exclude", "combine"):
        raise InvalidValueError(f"multiple must be 'exclude' or 'combine', got {multiple!r}.")
    guides, destination = _guide_and_rna_data(data, guide_modality, rna_modality)
    if not overwrite:
        _check_free_columns(destination, (key_added, guide_key_added))
    guide_to_target = _guide_targets(guides, target_key, guide_to_target)
    guide_sets = _guide_sets(guides, assignment, set(unassigned), multiple_label, separator)
    labels, outcomes = _label_cells(guide_sets, guide_to_target, control, multiple, separator)
    series = pd.Series(pd.Categorical(labels), index=destination.obs_names, name=key_added)
    destination.obs[key_added] = series
    if guide_key_added is not None:
        destination.obs[guide_key_added] = pd.Categorical(
            [
                separator.join(sorted(guide_set)) if label is not None else None
                for guide_set, label in zip(guide_sets, labels, strict=True)
            ]
        )
    logger.info(
        "Perturbation labels in obs[%r]: %s.",
        key_added,
        ", ".join(f"{n} {outcome}" for outcome, n in outcomes.items()),
    )
    return series


def _guide_and_rna_data(data: MuData | AnnData, guide_modality: str, rna_modality: str):
    """Return the guide data, and the data whose obs gets the labels (the same for an AnnData)."""
    if not isinstance(data, MuData):
        return data, data
    for name in (guide_modality, rna_modality):
        if name not in data.mod:
            raise MissingKeyError(
                f"The MuData has no modality {name!r}; its modalities are {list(data.mod)}."
            )
    guides, destination = data.mod[guide_modality], data.mod[rna_modality]
    if not guides.obs_names.equals(destination.obs_names):
        raise InvalidValueError(
            f"Modalities {guide_modality!r} and {rna_modality!r} have different cells. "
            "Subset both to the same cells (e.g. mu.pp.intersect_obs(mdata))."
        )
    return guides, destination


def _check_free_columns(destination: AnnData, keys) -> None:
    """Refuse obs columns that exist already."""
    for key in keys:
        if key is not None and key in destination.obs:
            raise MissingKeyError(
                f"obs[{key!r}] already exists. Pass overwrite=True to replace it, or choose "
                "another key_added / guide_key_added."
            )


def _guide_targets(
    guides: AnnData, target_key: str | None, guide_to_target: Mapping[str, str] | None
) -> Mapping[str, str]:
    """Return each guide's target: ``guide_to_target``, or ``var[target_key]`` of the guides."""
    if guide_to_target is not None:
        return guide_to_target
    if target_key not in guides.var:
        raise MissingKeyError(
            f"var[{target_key!r}] not found in the guide data (var columns: "
            f"{list(guides.var.columns)}). Pass target_key=<column> or guide_to_target={{...}}."
        )
    return guides.var[target_key].astype(str).to_dict()


def _label_cells(guide_sets, guide_to_target, control, multiple, separator):
    """Return each cell's label (``None``: excluded) and the number of cells of each outcome."""
    unknown = sorted({g for s in guide_sets if s for g in s} - set(guide_to_target))
    if unknown:
        raise MissingKeyError(
            f"Guides {unknown[:5]} have no target in the guide mapping. Add them to "
            "guide_to_target or to var[target_key]."
        )
    labels = []
    outcomes = {
        "control": 0,
        "single target": 0,
        "combination": 0,
        "several (excluded)": 0,
        "no guide (excluded)": 0,
    }
    for guide_set in guide_sets:
        if guide_set is None:
            labels.append(None)
            outcomes["several (excluded)"] += 1
            continue
        targets = {guide_to_target[g] for g in guide_set}
        perturbing = sorted(targets - {control})
        if not targets:
            labels.append(None)
            outcomes["no guide (excluded)"] += 1
        elif not perturbing:
            labels.append(control)
            outcomes["control"] += 1
        elif len(perturbing) == 1:
            labels.append(perturbing[0])
            outcomes["single target"] += 1
        elif multiple == "combine":
            labels.append(separator.join(perturbing))
            outcomes["combination"] += 1
        else:
            labels.append(None)
            outcomes["several (excluded)"] += 1
    return labels, outcomes
