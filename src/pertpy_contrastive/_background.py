"""The background the model reads in each cell, calibrated on the contrast controls.

A mixin of :class:`~pertpy_contrastive.ContrastiveVAE`, and the one internal API of everything
that compares cells with their background: the responder calls (``_responders.py``), the
differential expression (``_differential.py``) and the background-removed layer
(``_expression.py``), and through them the calibration check (``tl/_calibration.py``). The
background of a cell is its counts decoded at its posterior mean background latent with the
salient latent at 0, at its own depth; a per-gene offset fitted on the contrast controls, which
training treated as it treated perturbed cells, calibrates it (``_responder_mixture.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from anndata import AnnData
from scipy import sparse
from scvi import REGISTRY_KEYS

from . import _responder_mixture as mixture
from ._constants import (
    GROUP_KEY,
    INFERENCE_BATCH_SIZE,
    MAX_REFERENCE_CONTROLS,
    TARGET_KEY,
    CellGroup,
)
from ._data import InvalidValueError, resolve_modality


@dataclass(frozen=True)
class CalibratedBackground:
    """Cells' counts beside the background the model reads in them, calibrated on controls.

    The background is decoded on demand, for the cells asked for, from each cell's posterior
    means: no step holds the background of every cell (n_cells x n_genes floats).
    """

    counts: np.ndarray | sparse.spmatrix
    posterior_means: dict[str, torch.Tensor]
    """``_posterior_means`` of every cell."""
    decode: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    """Background of cells at their own depth, from their posterior means (uncalibrated)."""
    offset: torch.Tensor
    """``o_g`` of ``_responder_mixture.py``: per-gene log correction fitted on controls."""
    dispersion: torch.Tensor
    groups: np.ndarray
    targets: np.ndarray
    controls: np.ndarray
    """The contrast controls, which calibrate the background."""
    control_counts: torch.Tensor
    """Counts of the reference controls (the contrast controls, all or ``MAX_REFERENCE_CONTROLS``
    of them), float64."""
    control_background: torch.Tensor
    """Calibrated background of the reference controls, decoded once for the offset fit."""

    def background(self, rows: np.ndarray) -> torch.Tensor:
        """``b_ng * exp(o_g)`` of ``_responder_mixture.py`` for cells ``rows``, float64."""
        return self.decode(select_cells(self.posterior_means, rows)) * self.offset.exp()

    def counts_of(self, rows: np.ndarray) -> torch.Tensor:
        """Return the counts of cells ``rows``, in that order, dense float64."""
        return _dense_counts(_read_rows(self.counts, rows))

    def of_target(self, index: int) -> np.ndarray:
        """Perturbed cells whose target has code ``index``."""
        return np.flatnonzero((self.targets == index) & (self.groups == CellGroup.TARGET))

    @cached_property
    def control_cells(self) -> mixture.ControlCells:
        """The controls, the reference of the responder calls and of the DE's offset variance."""
        return mixture.control_cells(self.control_counts, self.control_background, self.dispersion)


class CalibratedBackgroundMixin:
    """The calibrated background of a trained :class:`~pertpy_contrastive.ContrastiveVAE`."""

    def _calibrated_background(
        self, adata, modality, posterior_means=None
    ) -> tuple[AnnData, CalibratedBackground]:
        """Validate ``adata``; return it and its counts beside their calibrated background.

        Shared by the responder calls, the differential expression and the background-removed
        layer: each compares cells with the expression the model reads as their background.
        ``posterior_means`` (of :meth:`_posterior_means` on ``adata``) saves an encoding pass.
        """
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(None if adata is None else resolve_modality(adata, modality))
        manager = self.get_anndata_manager(adata)
        groups = manager.get_from_registry(GROUP_KEY).ravel()
        controls = np.flatnonzero(groups == CellGroup.CONTRAST)
        if len(controls) == 0:
            raise InvalidValueError(
                "These data have no contrast controls (half of the control cells), which "
                "calibrate the background of the responder calls and the differential "
                "expression. Use data that include the controls of the screen."
            )
        counts = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        if posterior_means is None:
            posterior_means = self._posterior_means(adata, None)
        dispersion = self._dispersion()
        reference = controls
        if len(controls) > MAX_REFERENCE_CONTROLS:
            rng = np.random.default_rng(0)
            reference = np.sort(rng.choice(controls, MAX_REFERENCE_CONTROLS, replace=False))
        control_counts = _dense_counts(counts[reference])
        control_background = self._background_means(select_cells(posterior_means, reference))
        offset = mixture.control_offset(control_counts, control_background, dispersion)
        return adata, CalibratedBackground(
            counts=counts,
            posterior_means=posterior_means,
            decode=self._background_means,
            offset=offset,
            dispersion=dispersion,
            groups=groups,
            targets=manager.get_from_registry(TARGET_KEY).ravel(),
            controls=controls,
            control_counts=control_counts,
            control_background=control_background * offset.exp(),
        )

    @torch.inference_mode()
    def _posterior_means(self, adata, indices) -> dict[str, torch.Tensor]:
        """Posterior means of z and s, with each cell's covariates, in one encoding pass.

        Written into arrays allocated once for all cells, not concatenated from a list of
        chunks: small chunk results kept alive between the freed count chunks fragment glibc's
        heap, and the resident memory grew with the cells (by 1.4 GB at 200,000 cells).
        """
        n_cells = adata.n_obs if indices is None else len(indices)
        means, start = {}, 0
        for tensors in self._make_data_loader(
            adata=adata, indices=indices, batch_size=INFERENCE_BATCH_SIZE
        ):
            inputs, _ = self.module._get_fn_args_from_batch(tensors)
            posterior = self.module.encode(*inputs.encoder_inputs)
            chunk = {
                "z": posterior["background"][0],
                "s": posterior["salient"][0],
                "batch": inputs.batch_index,
                "cat": inputs.cat_covs,
                "cont": inputs.cont_covs,
                "library": inputs.x.sum(-1),
            }
            if not means:
                means = {
                    key: value.new_empty((n_cells, *value.shape[1:]))
                    for key, value in chunk.items()
                }
            for key, value in chunk.items():
                means[key][start : start + len(value)] = value
            start += len(chunk["z"])
        return means

    @torch.inference_mode()
    def _background_means(self, means) -> torch.Tensor:
        """Cells' counts decoded at their posterior mean z and s = 0, at their own depth (float64).

        Decoded a minibatch of cells at a time: the decoder's cells x genes temporaries then stay
        at ``INFERENCE_BATCH_SIZE`` rows (the 20,000 reference controls at once peaked at 1.5 GB
        above the rest at 2,000 genes).
        """
        n_cells = len(means["z"])
        background = torch.empty((n_cells, self.summary_stats.n_vars), dtype=torch.float64)
        for start in range(0, n_cells, INFERENCE_BATCH_SIZE):
            part = select_cells(means, slice(start, start + INFERENCE_BATCH_SIZE))
            proportions = self.module.expression_proportions(
                part["z"], torch.zeros_like(part["s"]), part["batch"], part["cat"], part["cont"]
            ).cpu()
            library = part["library"].cpu().to(proportions.dtype).reshape(-1, 1)
            background[start : start + len(proportions)] = proportions * library
        return background

    def _dispersion(self) -> torch.Tensor:
        if self.module.likelihood == "poisson":
            return torch.full_like(
                self.module.log_inverse_dispersion, mixture.POISSON_DISPERSION, dtype=torch.float64
            ).cpu()
        return self.module.log_inverse_dispersion.detach().exp().double().cpu()


def select_cells(
    posterior_means: dict[str, torch.Tensor], rows: slice | Sequence[int] | np.ndarray
) -> dict[str, torch.Tensor]:
    """Return the posterior means (and covariates) of cells ``rows`` (a slice, or positions)."""
    if not isinstance(rows, slice):
        rows = torch.as_tensor(rows)
    return {key: value[rows] for key, value in posterior_means.items()}


def _read_rows(matrix, rows: np.ndarray):
    """Rows of an in-memory or backed (h5py) matrix; a backed one needs sorted indices."""
    order = np.argsort(rows, kind="stable")
    if (order == np.arange(len(rows))).all():
        return matrix[rows]
    sorted_rows = matrix[rows[order]]
    return sorted_rows[np.argsort(order, kind="stable")]


def _dense_counts(counts) -> torch.Tensor:
    return torch.as_tensor(
        counts.toarray() if sparse.issparse(counts) else np.asarray(counts), dtype=torch.float64
    )
