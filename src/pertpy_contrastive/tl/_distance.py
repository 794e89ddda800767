"""pertpy's ``DistanceTest``, with tied permutations counted."""

from __future__ import annotations

import pandas as pd
import pertpy as pt
from anndata import AnnData
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
    cells.

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

    Returns
    -------
    pertpy's table (``distance``, ``pvalue``, ``significant``, ``pvalue_adj``,
    ``significant_adj``), indexed by group.
    """
    test = pt.tl.DistanceTest(metric, n_perms=n_perms, obsm_key=obsm_key, **kwargs)
    table = test(adata, groupby=groupby, contrast=contrast, show_progressbar=show_progressbar)
    tested = table.index != contrast
    table.loc[tested & (table["distance"] == 0), "pvalue"] = 1.0
    significant_adj, adjusted, _, _ = multipletests(
        table.loc[tested, "pvalue"].to_numpy(), alpha=test.padj_threshold, method=test.correction
    )
    table.loc[tested, "significant"] = table.loc[tested, "pvalue"] < test.padj_threshold
    table.loc[tested, "pvalue_adj"] = adjusted
    table.loc[tested, "significant_adj"] = significant_adj
    return table
