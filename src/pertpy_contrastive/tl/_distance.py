"""pertpy's ``DistanceTest``, with tied permutations counted, and permutations within strata."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pertpy as pt
from anndata import AnnData
from sklearn.metrics import pairwise_distances
from statsmodels.stats.multitest import multipletests


def distance_test(
    adata: AnnData,
    *,
    groupby: str = "perturbation",
    contrast: str = "non-targeting",
    obsm_key: str = "X_contrastive_response",
    metric: str = "edistance",
    n_perms: int = 1000,
    show_progressbar: bool = False,
    strata_key: str | None = None,
    seed: int = 0,
    **kwargs,
) -> pd.DataFrame:
    """Permutation test of each group's distance to ``contrast``: ``pt.tl.DistanceTest``, tie-safe.

    pertpy (up to 1.4 at least) counts a permutation as reaching the observed distance only if
    it exceeds it strictly. When a group and the contrast coincide (in the response latent
    ``obsm['X_contrastive_response']``, a target without a detectable response is exactly 0,
    like the controls), every permutation ties at distance 0 and pertpy reports
    p = 1/n_perms, significant. Here such a group (observed distance exactly 0) gets p = 1, the
    permutation p-value with ties counted, and the adjusted p-values are recomputed over the
    tested groups with the test's correction. Other groups keep pertpy's p-values: with a
    nonzero distance, exact ties have probability 0.

    A permutation p-value is calibrated only if a null group's cells and the contrast's are
    exchangeable in the embedding. The model's latents of its training cells are not (the
    salient encoder fitted the perturbed ones; the response latent is 0 for every control by
    construction), and non-targeting guides trained as targets test significant there
    (docs/benchmarks.md). To call targets, use
    :meth:`pertpy_contrastive.ContrastiveVAE.distance_test`, which runs this test on held-out
    cells, or run it on every cell of the cross-fitted salient latent
    (:func:`pertpy_contrastive.tl.cross_fitted_salient`), each cell read by a model that did not
    train on it.

    Exchangeability also fails when a group's cells are spread over batches (replicates,
    lanes) unlike the contrast's and the embedding carries any batch signal: on the bundled
    Papalexi data the non-targeting guides' replicate shares differ (chi-squared p = 5e-13),
    and PCA of log-normalised counts called 2 of 4 of them against the others. ``strata_key``
    then permutes the labels within each stratum (e.g. the replicate), which keeps every
    permutation's batch composition that of the data.

    Parameters
    ----------
    adata
        Cells with ``obsm[obsm_key]`` (for the response latent, subset to cells where it is
        defined, i.e. whose ``obs['contrastive_p_perturbed']`` is not NaN).
    groupby, contrast
        obs column of the groups, and the reference group.
    obsm_key
        Embedding to test.
    metric, n_perms, show_progressbar, **kwargs
        Passed to ``pt.tl.DistanceTest``.
    strata_key
        obs column of the strata to permute within. The test then uses pertpy's metric on
        precomputed pairwise distances (the metric must accept them, as ``"edistance"``
        does), with ``n_perms`` seeded permutations and the permutation p-value
        ``(1 + #{permuted >= observed}) / (1 + n_perms)``.
    seed
        Seed of the permutations within strata (pertpy's own permutations are not seeded).

    Returns
    -------
    pertpy's table (``distance``, ``pvalue``, ``significant``, ``pvalue_adj``,
    ``significant_adj``), indexed by group.
    """
    test = pt.tl.DistanceTest(metric, n_perms=n_perms, obsm_key=obsm_key, **kwargs)
    if strata_key is None:
        table = test(adata, groupby=groupby, contrast=contrast, show_progressbar=show_progressbar)
    else:
        table = _stratified_test(adata, test, groupby, contrast, obsm_key, strata_key, seed)
    tested = table.index != contrast
    table.loc[tested & (table["distance"] == 0), "pvalue"] = 1.0
    significant_adj, adjusted, _, _ = multipletests(
        table.loc[tested, "pvalue"].to_numpy(), alpha=test.padj_threshold, method=test.correction
    )
    # The contrast row gets pertpy's values for it (p = 1, adjusted 1, not significant).
    table["significant"] = table["pvalue"] < test.padj_threshold
    table["pvalue_adj"] = 1.0
    table.loc[tested, "pvalue_adj"] = adjusted
    table["significant_adj"] = False
    table.loc[tested, "significant_adj"] = significant_adj
    return table


def check_strata_key(obs: pd.DataFrame, strata_key: str) -> None:
    """Raise a KeyError naming the fix if ``strata_key`` is not a column of ``obs``."""
    if strata_key not in obs:
        raise KeyError(
            f"strata_key {strata_key!r} is not a column of adata.obs (columns: "
            f"{list(obs.columns)}). Pass the obs column of the batches to permute within, e.g. "
            "the replicate."
        )


def _stratified_test(adata, test, groupby, contrast, obsm_key, strata_key, seed) -> pd.DataFrame:
    """Distance and permutation p-value of each group, labels permuted within strata.

    Written here because pertpy's ``DistanceTest`` permutes across all cells; the distance
    itself is pertpy's metric (``from_precomputed``).
    """
    check_strata_key(adata.obs, strata_key)
    metric = test.distance.metric_fct
    if not metric.accepts_precomputed:
        raise ValueError(
            f"Permutations within strata need a metric that accepts precomputed distances; "
            f"{test.metric!r} does not. Use metric='edistance', or strata_key=None."
        )
    labels = adata.obs[groupby].astype(str).to_numpy()
    strata = adata.obs[strata_key].astype(str).to_numpy()
    embedding = np.asarray(adata.obsm[obsm_key])
    rng = np.random.default_rng(seed)
    rows = {}
    for group in sorted(set(labels) - {contrast}):
        cells = np.flatnonzero((labels == group) | (labels == contrast))
        distances = pairwise_distances(embedding[cells], metric=metric.cell_wise_metric)
        total = distances.sum(dtype=np.float64)
        in_group = labels[cells] == group
        observed = metric.from_precomputed(distances, in_group, total=total)
        # Shuffling the labels inside each stratum keeps each stratum's share of the group.
        stratum_cells = [np.flatnonzero(strata[cells] == s) for s in np.unique(strata[cells])]
        reached = 0
        for _ in range(test.n_perms):
            permuted = in_group.copy()
            for members in stratum_cells:
                permuted[members] = rng.permutation(in_group[members])
            reached += metric.from_precomputed(distances, permuted, total=total) >= observed
        rows[group] = (observed, (1 + reached) / (1 + test.n_perms))
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["distance", "pvalue"])
    table.loc[contrast] = (0.0, 1.0)
    return table
