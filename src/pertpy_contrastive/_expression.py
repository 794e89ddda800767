"""Expression outputs of a trained model: background-removed expression and perturbation effects.

A mixin of :class:`~pertpy_contrastive.ContrastiveVAE`, kept apart from training and registration.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.metadata import version
from typing import Literal

import numpy as np
import torch
from anndata import AnnData
from mudata import MuData

from ._constants import GROUP_KEY, INFERENCE_BATCH_SIZE, NORMALISED_LIBRARY_SIZE, CellGroup
from ._data import resolve_modality
from ._responders import dense_counts, response_latent

# Cell-reference pairs decoded at once: bounds memory at about this many x n_genes floats.
_PAIRS_PER_CHUNK = 8_192
_LOG_EPS = 1e-8


def check_finite_latent(latent: np.ndarray) -> None:
    """Refuse to hand out latents with NaN or infinite values."""
    if not np.isfinite(latent).all():
        raise FloatingPointError(
            "The model produced non-finite latents. Retrain with a lower learning rate "
            "or likelihood='nb'."
        )


class ExpressionMixin:
    """Decoded expression of a trained :class:`~pertpy_contrastive.ContrastiveVAE`."""

    def _provenance(self, arguments: dict) -> dict:
        """Record what produced the outputs, as h5ad can store it (JSON strings keep ``None``)."""
        return {
            "package_version": version("pertpy-contrastive"),
            "epochs_trained": self.epochs_trained,
            "write_outputs": json.dumps(arguments, sort_keys=True),
            "model": json.dumps(self.init_params_["non_kwargs"], sort_keys=True),
            "setup_anndata": json.dumps(
                self.adata_manager.registry["setup_args"], sort_keys=True, default=str
            ),
        }

    @torch.inference_mode()
    def _posterior_means(self, adata, indices) -> dict[str, torch.Tensor]:
        """Posterior means of z and s, with each cell's covariates, in one encoding pass."""
        parts = {"z": [], "s": [], "batch": [], "cat": [], "cont": []}
        for tensors in self._make_data_loader(
            adata=adata, indices=indices, batch_size=INFERENCE_BATCH_SIZE
        ):
            inputs, _ = self.module._get_fn_args_from_batch(tensors)
            posterior = self.module.encode(*inputs.encoder_inputs)
            parts["z"].append(posterior["background"][0])
            parts["s"].append(posterior["salient"][0])
            parts["batch"].append(inputs.batch_index)
            parts["cat"].append(inputs.cat_covs)
            parts["cont"].append(inputs.cont_covs)
        return {key: torch.cat(values) for key, values in parts.items()}

    def _reference_indices(self, adata, reference_indices, n_reference_cells, seed) -> np.ndarray:
        """Return the reference cells: those given, or a sample of controls."""
        if reference_indices is None:
            groups = self.get_anndata_manager(adata).get_from_registry(GROUP_KEY).ravel()
            controls = np.flatnonzero(groups == CellGroup.BACKGROUND)
            if len(controls) == 0:
                raise ValueError(
                    "These data have no control cells to form the reference background. Pass "
                    "reference_indices=<cells whose background to use>."
                )
            rng = np.random.default_rng(seed)
            reference_indices = rng.choice(
                controls, size=min(n_reference_cells, len(controls)), replace=False
            )
        return np.sort(np.asarray(reference_indices))

    @torch.inference_mode()
    def _background_removed_counts(
        self, adata, indices, reference_indices, library_size, cells=None
    ) -> np.ndarray:
        """Observed counts with each cell's background exchanged for the reference's.

        ``x_ng * r_g / p_ng``, then normalised to ``library_size``: ``p_ng`` is the cell's
        background proportion (decoded at s = 0, calibrated on controls as for the responder
        calls) and ``r_g`` the reference cells' mean background proportion. ``cells`` is the
        ``CalibratedBackground`` of ``adata`` if already computed.
        """
        if cells is None:
            _, cells = self._calibrated_background(adata, "rna")
        proportions = cells.background / cells.background.sum(1, keepdim=True)
        reference = proportions[reference_indices].mean(0)
        rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        removed = dense_counts(cells.counts[rows]) * reference / proportions[rows]
        totals = removed.sum(1, keepdim=True).clamp(min=torch.finfo(removed.dtype).tiny)
        return (removed / totals * library_size).numpy().astype(np.float32)

    @torch.inference_mode()
    def _denoised(self, cells, reference, library_size) -> np.ndarray:
        n_reference = len(reference["z"])
        chunk = max(1, _PAIRS_PER_CHUNK // n_reference)
        rows = []
        for start in range(0, len(cells["s"]), chunk):
            salient = cells["s"][start : start + chunk]
            n_cells = len(salient)
            # Every (cell, reference) pair: salient from the cell, the rest from the reference.
            proportions = self.module.expression_proportions(
                reference["z"].repeat(n_cells, 1),
                salient.repeat_interleave(n_reference, dim=0),
                reference["batch"].repeat(n_cells, 1),
                reference["cat"].repeat(n_cells, 1),
                reference["cont"].repeat(n_cells, 1),
            )
            rows.append(proportions.reshape(n_cells, n_reference, -1).mean(dim=1))
        return (torch.cat(rows) * library_size).cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def _effect(self, cells) -> np.ndarray:
        covariates = (cells["batch"], cells["cat"], cells["cont"])
        with_salient = self.module.expression_proportions(cells["z"], cells["s"], *covariates)
        without = self.module.expression_proportions(
            cells["z"], torch.zeros_like(cells["s"]), *covariates
        )
        effect = torch.log(with_salient + _LOG_EPS) - torch.log(without + _LOG_EPS)
        return effect.cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def get_denoised_expression(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        reference_indices: Sequence[int] | None = None,
        n_reference_cells: int = 50,
        library_size: float = NORMALISED_LIBRARY_SIZE,
        seed: int = 0,
        source: Literal["counts", "decoder"] = "counts",
        modality: str = "rna",
    ) -> np.ndarray:
        """Background-removed expression: each cell's expression on a common background.

        - ``source="counts"`` (default; for DE tests): the cell's observed counts, each gene
          rescaled by the reference's background over the cell's own (both decoded with the
          salient latent at 0 and calibrated on controls). The perturbation effect and the
          counting noise stay, as in the counts; the background's variation (cell cycle,
          subclones, batch) leaves. ``pt.tl.WilcoxonTest`` on its log ranks the true DE genes
          of the simulated screens about as well as on log-normalised counts, not better
          (docs/benchmarks.md); for DE use :meth:`differential_expression`.
        - ``source="decoder"``: the model's decode of the cell's salient latent with the
          background latent and covariates of the reference cells, averaged over them. Smooth,
          for plots; its values are model decodes, not measurements, and a rank test on them
          calls any consistent shift while it misses most true DE genes (docs/benchmarks.md).

        The reference is a random sample of ``n_reference_cells`` control cells by default, so
        every cell is shown on the same average control background; pass ``reference_indices``
        for a fixed reference (e.g. the controls of one replicate).

        Parameters
        ----------
        adata
            Data to use; defaults to the data the model was set up with. With
            ``source="counts"`` it needs its controls (they calibrate the background).
        indices
            Cells to return; default all.
        reference_indices
            Cells whose background forms the reference.
        n_reference_cells
            Number of control cells sampled when ``reference_indices`` is not given.
        library_size
            Total of each output row (library normalisation, like ``sc.pp.normalize_total``).
        seed
            Seed of the reference sample.
        source
            ``"counts"`` or ``"decoder"``, see above.
        modality
            Modality when ``adata`` is a MuData.

        Returns
        -------
        Dense float32 array ``(n_cells, n_genes)``, each row summing to ``library_size``.
        """
        if source not in ("counts", "decoder"):
            raise ValueError(f'source={source!r}: pass "counts" or "decoder".')
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(None if adata is None else resolve_modality(adata, modality))
        reference = self._reference_indices(adata, reference_indices, n_reference_cells, seed)
        if source == "counts":
            return self._background_removed_counts(adata, indices, reference, library_size)
        return self._denoised(
            self._posterior_means(adata, indices),
            self._posterior_means(adata, reference),
            library_size,
        )

    @torch.inference_mode()
    def get_perturbation_effect(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        modality: str = "rna",
    ) -> np.ndarray:
        """Per-cell perturbation effect: log fold change of decoding with s against s = 0.

        Both decodes use the cell's own background latent and covariates, so the effect is the
        change the salient latent makes to that cell's expected expression (natural log).

        Returns
        -------
        Dense float32 array ``(n_cells, n_genes)``.
        """
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(None if adata is None else resolve_modality(adata, modality))
        return self._effect(self._posterior_means(adata, indices))

    def write_outputs(
        self,
        adata: AnnData | MuData | None = None,
        *,
        prefix: str = "contrastive",
        threshold: float = 0.5,
        n_reference_cells: int = 50,
        seed: int = 0,
        overwrite: bool = False,
        modality: str = "rna",
    ) -> AnnData:
        """Write latents, responder calls, background-removed expression and perturbation effects.

        Writes, for every cell:

        - ``obsm['X_<prefix>_salient']`` and ``obsm['X_<prefix>_background']``: posterior means;
        - ``obsm['X_<prefix>_response']``: the salient latent weighted by the responder
          probability (``get_latent_representation(kind="response")``; 0 for controls, NaN rows
          for unscored cells), to rank targets with ``pt.tl.Distance(..., obsm_key=...)``
          (test them with :meth:`distance_test`, on held-out cells);
        - ``layers['<prefix>_denoised']``: :meth:`get_denoised_expression` (observed counts on
          the reference background), dense float32, rows summing to 1e4, for
          ``pt.tl.WilcoxonTest`` / ``TTest.compare_groups(layer=...)`` (log-transform it
          first, as you would normalised counts);
        - ``layers['<prefix>_effect']``: :meth:`get_perturbation_effect`;
        - ``obs['<prefix>_p_perturbed']``: :meth:`get_responder_probability` (0 for controls,
          NaN for cells whose label is not a trained target);
        - ``obs['<prefix>_class']`` and ``obs['<prefix>_class_global']``: Mixscape's vocabulary,
          ``"<target> KO"`` / ``"<target> NP"`` / ``"NT"`` and ``"KO"`` / ``"NP"`` / ``"NT"``,
          KO when the probability exceeds ``threshold`` (missing for unscored cells);
        - ``uns['<prefix>_responder_fractions']``: :meth:`get_responder_fractions` per target;
        - ``uns['<prefix>']``: provenance: the package version, the epochs trained, and as JSON
          strings the arguments of this call, of the model and of ``setup_anndata``.

        Nothing is written unless all keys are free, or ``overwrite=True``.

        Parameters
        ----------
        adata
            Data to write to (AnnData, or MuData whose ``modality`` gets the outputs); defaults
            to the data the model was set up with.
        prefix
            Prefix of the keys written.
        threshold
            Responder probability above which a perturbed cell is called KO.
        n_reference_cells, seed
            Reference sample of :meth:`get_denoised_expression`; ``seed`` also seeds the
            cross-fitting folds of :meth:`get_responder_probability`.
        overwrite
            Replace existing keys of the same names.
        modality
            Modality when ``adata`` is a MuData.

        Returns
        -------
        The AnnData written to.
        """
        target = self.adata if adata is None else resolve_modality(adata, modality)
        keys = {
            "obsm": {kind: f"X_{prefix}_{kind}" for kind in ("salient", "background", "response")},
            "layers": {"denoised": f"{prefix}_denoised", "effect": f"{prefix}_effect"},
            "obs": {name: f"{prefix}_{name}" for name in ("p_perturbed", "class", "class_global")},
            "uns": {"fractions": f"{prefix}_responder_fractions", "provenance": prefix},
        }
        taken = [
            f"{attribute}[{key!r}]"
            for attribute, named in keys.items()
            for key in named.values()
            if key in getattr(target, attribute)
        ]
        if taken and not overwrite:
            raise KeyError(
                f"{', '.join(taken)} already exist. Pass overwrite=True to replace them, or "
                "another prefix=."
            )
        self._check_if_trained(warn=False)
        self._validate_anndata(target)
        # One encoding pass serves the latents, the effect layer, the background-removed layer
        # and the responder calls.
        cells = self._posterior_means(target, None)
        _, calibrated = self._calibrated_background(target, modality, posterior_means=cells)
        latents = {"salient": cells["s"].cpu().numpy(), "background": cells["z"].cpu().numpy()}
        for latent in latents.values():
            check_finite_latent(latent)
        reference = self._reference_indices(target, None, n_reference_cells, seed)
        outputs = {
            "obsm": {keys["obsm"][kind]: latent for kind, latent in latents.items()},
            "layers": {
                keys["layers"]["denoised"]: self._background_removed_counts(
                    target, None, reference, library_size=NORMALISED_LIBRARY_SIZE, cells=calibrated
                ),
                keys["layers"]["effect"]: self._effect(cells),
            },
        }
        evidence = self._responder_evidence(target, calibrated, seed=seed)
        probability = evidence.probability
        outputs["obsm"][keys["obsm"]["response"]] = response_latent(latents["salient"], probability)
        target_class, global_class = self._responder_calls(target, probability, threshold)
        outputs["obs"] = {
            keys["obs"]["p_perturbed"]: probability,
            keys["obs"]["class"]: target_class,
            keys["obs"]["class_global"]: global_class,
        }
        outputs["uns"] = {
            keys["uns"]["fractions"]: self._responder_fractions(
                target, evidence, "target", 0.95, threshold
            ),
            keys["uns"]["provenance"]: self._provenance(
                {"threshold": threshold, "n_reference_cells": n_reference_cells, "seed": seed}
            ),
        }
        # Written only once everything is computed, so a failure leaves the data as it was.
        for attribute, values in outputs.items():
            for key, value in values.items():
                getattr(target, attribute)[key] = value
        return target
