"""Which targets had an effect: a permutation test on cells the model was not trained on.

A mixin of :class:`~pertpy_contrastive.ContrastiveVAE`. The salient encoder is trained to
reconstruct the perturbed training cells, so it fits their noise, while the controls' salient
latents are only pulled towards 0: on training cells a target and the controls differ even when
the target does nothing. On Papalexi every non-targeting guide trained as a pseudo-target
then tests significant (docs/benchmark_papalexi_calibration.md).
The validation cells were seen by no gradient. To the trained encoder, a null target's held-out
cells and the held-out controls are draws from one distribution, so the labels are exchangeable
and the permutation p-value is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from ._constants import CellGroup


class CallingMixin:
    """Target-level testing of a trained :class:`~pertpy_contrastive.ContrastiveVAE`."""

    def distance_test(
        self,
        indices: Sequence[int] | None = None,
        *,
        metric: str = "edistance",
        n_perms: int = 1000,
        show_progressbar: bool = False,
        strata_key: str | None = None,
        **kwargs,
    ) -> pd.DataFrame:
        """Test each target against the controls in the salient latent of held-out cells.

        ``pt.tl.DistanceTest`` (E-distance, permutations) on the salient latent of the cells
        the model was not trained on: by default its validation cells (``train_size`` of
        :meth:`train`). Use these p-values to decide which targets had an effect. On training
        cells (e.g. ``obsm['X_contrastive_salient']`` of every cell) the test is not calibrated:
        the encoder fitted those cells, and null targets test significant. Power grows with the
        held-out cells per target (``n_cells``); train with a smaller ``train_size`` (e.g. 0.75)
        to test more cells, or test every cell on the cross-fitted salient latent
        (:func:`pertpy_contrastive.tl.cross_fitted_salient`).

        Parameters
        ----------
        indices
            Cells of the model's AnnData to test, which training must not have used; default
            ``model.validation_indices``.
        metric, n_perms, show_progressbar, **kwargs
            Passed to ``pt.tl.DistanceTest``.
        strata_key
            obs column (of the model's AnnData) to permute the labels within, e.g. the
            replicate, when targets and controls are spread over it unequally; see
            :func:`pertpy_contrastive.tl.distance_test`.

        Returns
        -------
        pertpy's table (``distance``, ``pvalue``, ``significant``, ``pvalue_adj``,
        ``significant_adj``) indexed by target, with ``n_cells``, the cells tested per group.
        """
        # tl imports the model; importing it at module level would be circular.
        from .tl._distance import check_strata_key, distance_test

        self._check_if_trained(warn=False)
        if indices is None:
            indices = self.validation_indices
        if indices is None or len(indices) == 0:
            raise ValueError(
                "The model has no held-out cells to test: it was trained with train_size=1, "
                "so every cell's salient latent was fitted. Retrain with train_size < 1 (e.g. "
                "0.75), or pass indices= of cells that training did not use."
            )
        indices = np.sort(np.asarray(indices))
        overlap = np.intersect1d(indices, np.asarray(self.train_indices))
        if len(overlap) > 0:
            raise ValueError(
                f"{len(overlap)} of the indices are training cells (e.g. {overlap[:5].tolist()}); "
                "their salient latents fit their noise and the test would not be calibrated. "
                "Pass only cells outside model.train_indices."
            )
        perturbation_key = self.get_setup_arg("perturbation_key")
        control = self.get_setup_arg("control")
        indices = indices[self.cell_groups[indices] != CellGroup.EXCLUDED]
        labels = self.adata.obs[perturbation_key].iloc[indices].astype(str).to_numpy()
        obs = pd.DataFrame({perturbation_key: labels}, index=self.adata.obs_names[indices])
        if strata_key is not None:
            check_strata_key(self.adata.obs, strata_key)
            obs[strata_key] = self.adata.obs[strata_key].iloc[indices].to_numpy()
        tested = AnnData(
            obs=obs, obsm={"X_salient": self.get_latent_representation(indices=indices)}
        )
        if control not in set(labels):
            raise ValueError(
                f"None of the held-out cells is a control ({control!r}), so there is nothing to "
                "test against. Retrain with a smaller train_size, or pass indices= that "
                "include controls."
            )
        table = distance_test(
            tested,
            groupby=perturbation_key,
            contrast=control,
            obsm_key="X_salient",
            metric=metric,
            n_perms=n_perms,
            show_progressbar=show_progressbar,
            strata_key=strata_key,
            **kwargs,
        )
        table["n_cells"] = pd.Series(labels).value_counts().reindex(table.index).to_numpy()
        return table
