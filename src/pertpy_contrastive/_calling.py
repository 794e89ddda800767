"""Which targets had an effect: a permutation test of each target against the contrast controls.

A mixin of :class:`~pertpy_contrastive.ContrastiveVAE`, and the test itself. The contrast
controls were trained exactly as perturbed cells were (``_module.py``), so for a target
without an effect, its cells and the contrast controls are exchangeable in the salient latent of
every cell, training cells included: the labels could be swapped without changing anything
training did, and the permutation p-value is exact. The background controls, decoded without
the salient latent in training, are not part of the test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pertpy as pt
from anndata import AnnData
from mudata import MuData
from scvi.utils import track
from sklearn.metrics import pairwise_distances
from statsmodels.stats.multitest import multipletests

from ._constants import CellGroup
from ._data import InvalidValueError, MissingKeyError, resolve_modality

TESTED_GROUPS = (CellGroup.TARGET, CellGroup.CONTRAST)
"""Groups whose cells the distance test compares: targets, and the contrast controls."""


class CallingMixin:
    """Target-level testing of a trained :class:`~pertpy_contrastive.ContrastiveVAE`."""

    def distance_test(
        self,
        adata: AnnData | MuData | None = None,
        *,
        metric: str = "edistance",
        n_perms: int = 1000,
        strata_key: str | None = None,
        seed: int = 0,
        modality: str = "rna",
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Test each target against the contrast controls in the salient latent of every cell.

        pertpy's E-distance permutation test (``pt.tl.DistanceTest``) of each target's cells
        against the contrast controls, the half of the controls that training treated exactly
        as perturbed cells. Use these p-values to decide which targets had an effect; they are
        exact for a target without an effect. Controls that trained the background are left
        out: they sit nearer the origin by construction, and no test may use them.

        Parameters
        ----------
        adata
            Data to test; defaults to the data the model was set up with.
        metric, n_perms
            Passed to ``pt.tl.DistanceTest``.
        strata_key
            obs column to permute the labels within, e.g. the replicate, when targets and
            controls are spread over it unequally (pertpy permutes across all cells).
        seed
            Seed of the permutations within strata (pertpy's own are not seeded).
        modality
            Modality when ``adata`` is a MuData.
        progress_bar
            Show a progress bar over the targets.

        Returns
        -------
        pertpy's table (``distance``, ``pvalue``, ``significant``, ``pvalue_adj``,
        ``significant_adj``) indexed by target, without the contrast's row, with ``n_cells``,
        the cells tested per target.
        """
        self._check_if_trained(warn=False)
        target = self.adata if adata is None else resolve_modality(adata, modality)
        groups = self.get_anndata_manager(self._validate_anndata(target)).get_from_registry(
            "contrastive_group"
        )
        tested = np.flatnonzero(np.isin(groups.ravel(), TESTED_GROUPS))
        contrast = contrast_label(self.control_labels)
        perturbation_key = self.get_setup_arg("perturbation_key")
        labels = target.obs[perturbation_key].astype(str).to_numpy()[tested]
        labels[groups.ravel()[tested] == CellGroup.CONTRAST] = contrast
        obs = pd.DataFrame({"label": labels}, index=target.obs_names[tested])
        if strata_key is not None:
            check_strata_key(target.obs, strata_key)
            obs["stratum"] = target.obs[strata_key].iloc[tested].to_numpy()
        cells = AnnData(
            obs=obs,
            obsm={"salient": self.get_latent_representation(target, indices=tested)},
        )
        table = permutation_distance_test(
            cells,
            groupby="label",
            contrast=contrast,
            obsm_key="salient",
            metric=metric,
            n_perms=n_perms,
            strata_key=None if strata_key is None else "stratum",
            seed=seed,
            show_progressbar=progress_bar,
        ).drop(index=contrast)
        table["n_cells"] = obs["label"].value_counts().reindex(table.index).to_numpy()
        return table


def contrast_label(control_labels: Sequence[str]) -> str:
    """Return the label that the contrast controls carry in a test: the control label(s)."""
    return " | ".join(control_labels)


def permutation_distance_test(
    adata: AnnData,
    *,
    groupby: str,
    contrast: str,
    obsm_key: str,
    metric: str = "edistance",
    n_perms: int = 1000,
    strata_key: str | None = None,
    seed: int = 0,
    show_progressbar: bool = False,
) -> pd.DataFrame:
    """``pt.tl.DistanceTest`` of every group of ``adata`` against ``contrast``.

    With ``strata_key``, the labels are permuted within strata instead, on pertpy's metric
    (``from_precomputed``), with ``n_perms`` seeded permutations and the permutation p-value
    ``(1 + #{permuted >= observed}) / (1 + n_perms)``; the adjusted p-values use pertpy's
    correction.
    """
    test = pt.tl.DistanceTest(metric, n_perms=n_perms, obsm_key=obsm_key)
    if strata_key is None:
        return test(adata, groupby=groupby, contrast=contrast, show_progressbar=show_progressbar)
    table = _stratified_test(
        adata, test, groupby, contrast, obsm_key, strata_key, seed, show_progressbar
    )
    tested = table.index != contrast
    significant_adj, adjusted, _, _ = multipletests(
        table.loc[tested, "pvalue"].to_numpy(), alpha=test.padj_threshold, method=test.correction
    )
    table["significant"] = table["pvalue"] < test.padj_threshold
    table["pvalue_adj"] = 1.0
    table.loc[tested, "pvalue_adj"] = adjusted
    table["significant_adj"] = False
    table.loc[tested, "significant_adj"] = significant_adj
    return table


def check_strata_key(obs: pd.DataFrame, strata_key: str) -> None:
    """Raise a KeyError naming the fix if ``strata_key`` is not a column of ``obs``."""
    if strata_key not in obs:
        raise MissingKeyError(
            f"strata_key {strata_key!r} is not a column of adata.obs (columns: "
            f"{list(obs.columns)}). Pass the obs column of the batches to permute within, e.g. "
            "the replicate."
        )


def _stratified_test(
    adata, test, groupby, contrast, obsm_key, strata_key, seed, show_progressbar
) -> pd.DataFrame:
    """Distance and permutation p-value of each group, labels permuted within strata.

    Written here because pertpy's ``DistanceTest`` permutes across all cells; the distance
    itself is pertpy's metric (``from_precomputed``).
    """
    check_strata_key(adata.obs, strata_key)
    metric = test.distance.metric_fct
    if not metric.accepts_precomputed:
        raise InvalidValueError(
            f"Permutations within strata need a metric that accepts precomputed distances; "
            f"{test.metric!r} does not. Use metric='edistance', or strata_key=None."
        )
    labels = adata.obs[groupby].astype(str).to_numpy()
    strata = adata.obs[strata_key].astype(str).to_numpy()
    embedding = np.asarray(adata.obsm[obsm_key])
    rng = np.random.default_rng(seed)
    rows = {}
    groups = sorted(set(labels) - {contrast})
    for group in track(groups, description="Distance test", disable=not show_progressbar):
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
