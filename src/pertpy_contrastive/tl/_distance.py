"""The target test on written outputs: pertpy's ``DistanceTest`` without the background controls."""

from __future__ import annotations

import pandas as pd
from anndata import AnnData

from .._calling import permutation_distance_test
from .._constants import CellGroup
from .._data import MissingKeyError
from .._expression import ROLE_NAMES


def distance_test(
    adata: AnnData,
    *,
    groupby: str = "perturbation",
    contrast: str = "non-targeting",
    obsm_key: str = "X_contrastive_salient",
    role_key: str = "contrastive_role",
    metric: str = "edistance",
    n_perms: int = 1000,
    strata_key: str | None = None,
    seed: int = 0,
    show_progressbar: bool = True,
) -> pd.DataFrame:
    """Permutation test of each group's distance to ``contrast``, on the model's written outputs.

    ``pt.tl.DistanceTest`` on the cells of ``adata`` that a test may use: every cell but the
    background controls (``obs[role_key]``, written by
    :meth:`~pertpy_contrastive.ContrastiveVAE.write_outputs`). The contrast controls left were
    trained exactly as perturbed cells were, so for a group without an effect the p-value is
    exact; this is what ``write_outputs`` stores in ``uns['<prefix>_target_calls']``, here
    for an AnnData read back without its model, or with other options.

    Exchangeability also fails when a group's cells are spread over batches (replicates,
    lanes) unlike the contrast's and the embedding carries any batch signal. ``strata_key``
    then permutes the labels within each stratum (e.g. the replicate), which keeps every
    permutation's batch composition that of the data.

    Parameters
    ----------
    adata
        Cells with ``obsm[obsm_key]`` and ``obs[role_key]``.
    groupby, contrast
        obs column of the groups, and the control label.
    obsm_key
        Embedding to test.
    role_key
        obs column of each cell's role in training (``write_outputs``' ``<prefix>_role``).
    metric, n_perms, show_progressbar
        Passed to ``pt.tl.DistanceTest``.
    strata_key
        obs column of the strata to permute within; the test then uses pertpy's metric on
        precomputed pairwise distances, with ``n_perms`` seeded permutations.
    seed
        Seed of the permutations within strata (pertpy's own permutations are not seeded).

    Returns
    -------
    pertpy's table (``distance``, ``pvalue``, ``significant``, ``pvalue_adj``,
    ``significant_adj``), indexed by group, with the contrast's row.
    """
    for key, what in ((groupby, "groupby"), (role_key, "role_key")):
        if key not in adata.obs:
            raise MissingKeyError(
                f"obs[{key!r}] ({what}) is missing. Run model.write_outputs(adata) first, or "
                "pass the obs columns of the labels (groupby=) and of the roles (role_key=, "
                "'<prefix>_role')."
            )
    if obsm_key not in adata.obsm:
        raise MissingKeyError(
            f"obsm[{obsm_key!r}] is missing. Run model.write_outputs(adata) first, or pass "
            "obsm_key='X_<prefix>_salient'."
        )
    untestable = [ROLE_NAMES[CellGroup.BACKGROUND], ROLE_NAMES[CellGroup.EXCLUDED]]
    tested = adata[~adata.obs[role_key].isin(untestable).to_numpy()]
    columns = [groupby] + ([strata_key] if strata_key is not None else [])
    cells = AnnData(
        obs=tested.obs[[c for c in columns if c in tested.obs]].astype(str),
        obsm={obsm_key: tested.obsm[obsm_key]},
    )
    return permutation_distance_test(
        cells,
        groupby=groupby,
        contrast=contrast,
        obsm_key=obsm_key,
        metric=metric,
        n_perms=n_perms,
        strata_key=strata_key,
        seed=seed,
        show_progressbar=show_progressbar,
    )
