"""A count-based path into pseudobulk DE (``pt.tl.PyDESeq2``): responders' raw counts."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._data import InvalidValueError, MissingKeyError, get_count_matrix


def responder_pseudobulk(
    adata: AnnData,
    *,
    perturbation_key: str = "perturbation",
    control: str = "non-targeting",
    sample_key: str = "replicate",
    responders: Literal["posterior", "salient_norm"] = "posterior",
    salient_key: str = "X_contrastive_salient",
    quantile: float = 0.95,
    probability_key: str = "contrastive_p_perturbed",
    threshold: float = 0.5,
    layer: str | None = None,
    min_cells: int = 10,
) -> AnnData:
    """Sum the raw counts of the cells the model finds perturbed, per perturbation and sample.

    Escapers would dilute the pseudobulk, so only the perturbed cells the model finds perturbed
    are kept: with ``responders="posterior"`` (default), those whose posterior probability of
    having responded (``obs[probability_key]``, written by
    :meth:`~pertpy_contrastive.ContrastiveVAE.write_outputs`) exceeds ``threshold``; with
    ``responders="salient_norm"``, those whose salient latent norm exceeds the ``quantile`` of
    the control cells' norms (a heuristic). Control cells are all kept. Counts are summed per (perturbation, sample);
    groups with fewer than ``min_cells`` cells are dropped.

    What the p-values mean: with ``pt.tl.PyDESeq2`` on this output (e.g.
    ``compare_groups(pb, column=perturbation_key, baseline=control, groups_to_compare=[...],
    paired_by=sample_key)``), each p-value tests whether the mean raw expression of a target's
    responders differs from that of the controls, with samples (replicates) as the units of
    replication. Responders were selected on the same cells' expression, through the model, so
    the p-values are conditional on that selection: for genes that drove it they are
    optimistic. Use them to rank genes and compare targets, not as exact error rates.

    Parameters
    ----------
    adata
        AnnData with raw counts, perturbation labels, samples, and the model's outputs (from
        :meth:`~pertpy_contrastive.ContrastiveVAE.write_outputs`).
    perturbation_key, control, sample_key
        obs columns of the labels and samples, and the control label.
    responders
        How responders are selected: ``"posterior"`` or ``"salient_norm"``.
    salient_key
        obsm key of the salient latent (``"salient_norm"``).
    quantile
        Quantile of control norms above which a perturbed cell is a responder
        (``"salient_norm"``).
    probability_key
        obs column of the responder probability (``"posterior"``).
    threshold
        Responder probability above which a perturbed cell is kept (``"posterior"``).
    layer
        Layer with raw counts; ``None`` uses ``X``.
    min_cells
        Smallest number of cells in a pseudobulk sample.

    Returns
    -------
    AnnData of pseudobulk samples: integer counts, and obs ``perturbation_key``, ``sample_key``
    and ``n_cells``.
    """
    for key in (perturbation_key, sample_key):
        if key not in adata.obs:
            raise MissingKeyError(
                f"obs[{key!r}] not found. Available columns: {list(adata.obs.columns)}."
            )
    if responders not in ("salient_norm", "posterior"):
        raise InvalidValueError(
            f"responders must be 'salient_norm' or 'posterior', got {responders!r}."
        )
    if responders == "salient_norm" and salient_key not in adata.obsm:
        raise MissingKeyError(
            f"obsm[{salient_key!r}] not found. Run model.write_outputs(adata) first, or pass "
            "salient_key=<your key>."
        )
    if responders == "posterior" and probability_key not in adata.obs:
        raise MissingKeyError(
            f"obs[{probability_key!r}] not found. Run model.write_outputs(adata) first, or pass "
            "probability_key=<your key>."
        )
    labels = adata.obs[perturbation_key].astype("string")
    is_control = (labels == control).to_numpy(dtype=bool, na_value=False)
    if not is_control.any():
        raise InvalidValueError(f"No cells labelled {control!r} in obs[{perturbation_key!r}].")
    if responders == "posterior":
        responded = np.nan_to_num(adata.obs[probability_key].to_numpy(dtype=float)) > threshold
    else:
        norm = np.linalg.norm(adata.obsm[salient_key], axis=1)
        responded = norm > np.quantile(norm[is_control], quantile)
    keep = is_control | (labels.notna().to_numpy() & responded)
    groups = pd.DataFrame(
        {
            perturbation_key: labels.to_numpy()[keep],
            sample_key: adata.obs[sample_key].to_numpy()[keep],
        }
    )
    return _summed_counts(get_count_matrix(adata, layer), keep, groups, min_cells, adata.var_names)


def _summed_counts(counts, keep, groups: pd.DataFrame, min_cells: int, var_names) -> AnnData:
    """Sum the counts of cells ``keep`` per row of ``groups`` (their two columns' values).

    Groups of fewer than ``min_cells`` cells are dropped.
    """
    perturbation_key, sample_key = groups.columns
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(groups.astype(str)))
    indicator = sp.csr_matrix(
        (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(uniques), len(codes))
    )
    summed = indicator @ sp.csr_matrix(counts[np.flatnonzero(keep)])
    n_cells = np.bincount(codes, minlength=len(uniques))
    obs = pd.DataFrame(list(uniques), columns=[perturbation_key, sample_key])
    obs["n_cells"] = n_cells
    large_enough = n_cells >= min_cells
    obs = obs[large_enough].reset_index(drop=True)
    obs.index = (obs[perturbation_key] + "_" + obs[sample_key]).to_numpy()
    values = np.asarray(summed[np.flatnonzero(large_enough)].todense()).round().astype(np.int64)
    return AnnData(X=values, obs=obs, var=pd.DataFrame(index=var_names.copy()))
