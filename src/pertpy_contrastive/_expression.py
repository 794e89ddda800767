"""Expression outputs of a trained model: background-removed expression and perturbation effects.

A mixin of :class:`~pertpy_contrastive.ContrastiveVAE`, kept apart from training and registration.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scvi.utils import track

from ._background import select_cells
from ._constants import GROUP_KEY, INFERENCE_BATCH_SIZE, NORMALISED_LIBRARY_SIZE, CellGroup
from ._data import ExistingFileError, InvalidValueError, MissingKeyError, resolve_modality
from ._files import written_whole

ROLE_NAMES = {
    CellGroup.BACKGROUND: "background control",
    CellGroup.CONTRAST: "contrast control",
    CellGroup.TARGET: "perturbed",
    CellGroup.EXCLUDED: "excluded",
}
"""What ``obs['<prefix>_role']`` calls each :class:`~pertpy_contrastive.CellGroup`."""

# Cell-reference pairs decoded at once: bounds memory at about this many x n_genes floats.
_PAIRS_PER_CHUNK = 8_192
_LOG_EPS = 1e-8


def _proportions(background: torch.Tensor) -> torch.Tensor:
    return background / background.sum(1, keepdim=True)


@dataclass(frozen=True)
class _LayerPlan:
    """Where :meth:`ExpressionMixin.write_outputs` puts the two dense layers, and which part."""

    dense: bool
    """Whether the layers are computed at all (``dense_layers``)."""
    file: str | Path | None = None
    """The new h5ad file the layers are streamed into; ``None``: into the AnnData."""
    rows: np.ndarray | None = None
    """Positions of the file's cells."""
    genes: np.ndarray | None = None
    """Positions of the file's genes."""
    n_cells: int | None = None
    """Number of cells selected with ``cell_indices``; ``None``: all."""
    n_genes: int | None = None
    """Number of genes selected with ``gene_list``; ``None``: all."""

    @property
    def in_adata(self) -> bool:
        return self.dense and self.file is None

    @property
    def streamed(self) -> bool:
        return self.dense and self.file is not None


def _layer_plan(adata, dense_layers, layers_file, gene_list, cell_indices, overwrite) -> _LayerPlan:
    """Return where the layers go and the cells and genes of the file, once checked."""
    if layers_file is None:
        if gene_list is not None or cell_indices is not None:
            given = " and ".join(
                name
                for name, value in (("gene_list", gene_list), ("cell_indices", cell_indices))
                if value is not None
            )
            raise InvalidValueError(
                f"{given} given without layers_file=. gene_list and cell_indices select the "
                "layers written to layers_file=; a layer of the AnnData covers every cell and "
                "gene. Pass layers_file=<new .h5ad path>, or get_denoised_expression(indices=...) "
                "for an array."
            )
        return _LayerPlan(dense=dense_layers)
    if not dense_layers:
        raise InvalidValueError(
            "layers_file= streams the dense layers; it needs dense_layers=True."
        )
    if Path(layers_file).exists() and not overwrite:
        raise ExistingFileError(
            f"{layers_file} exists. Pass overwrite=True to replace it, or another layers_file=."
        )
    rows = _layer_rows(adata, cell_indices)
    genes = np.arange(adata.n_vars) if gene_list is None else _layer_genes(adata, gene_list)
    return _LayerPlan(
        dense=dense_layers,
        file=layers_file,
        rows=rows,
        genes=genes,
        n_cells=None if cell_indices is None else len(rows),
        n_genes=None if gene_list is None else len(genes),
    )


def _layer_rows(adata, cell_indices) -> np.ndarray:
    """Return the positions of the layers file's cells, checked: ``cell_indices``, or all."""
    rows = np.arange(adata.n_obs) if cell_indices is None else np.asarray(cell_indices)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0:
        raise InvalidValueError("cell_indices must be a non-empty sequence of cell positions.")
    if rows.min() < 0 or rows.max() >= adata.n_obs or len(np.unique(rows)) != len(rows):
        raise InvalidValueError(
            f"cell_indices must be distinct positions between 0 and {adata.n_obs - 1}."
        )
    return rows


def _layer_genes(adata, gene_list) -> np.ndarray:
    """Return the positions of the genes ``gene_list`` names, checked to be in ``adata``."""
    gene_list = [gene_list] if isinstance(gene_list, str) else list(gene_list)
    missing = [gene for gene in gene_list if gene not in adata.var_names]
    if missing or not gene_list:
        raise InvalidValueError(
            f"gene_list has genes absent from var_names: {missing[:10]}. Pass names of "
            "adata.var_names."
            if missing
            else "gene_list is empty."
        )
    return adata.var_names.get_indexer(gene_list)


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
            # "completed", "stopped early" or "interrupted" (Ctrl-C kept a partial model).
            "training": str(self.training_status),
            "target_calls_test": (
                f"pt.tl.DistanceTest('edistance', n_perms={arguments['n_perms']}) of each "
                "target against the contrast controls, on the salient latent of every cell"
            ),
            "write_outputs": json.dumps(arguments, sort_keys=True),
            "model": json.dumps(self.init_params_["non_kwargs"], sort_keys=True),
            "setup_anndata": json.dumps(
                self.adata_manager.registry["setup_args"], sort_keys=True, default=str
            ),
        }

    def _reference_indices(self, adata, reference_indices, n_reference_cells, seed) -> np.ndarray:
        """Return the reference cells: those given, or a sample of contrast controls."""
        if reference_indices is None:
            groups = self.get_anndata_manager(adata).get_from_registry(GROUP_KEY).ravel()
            controls = np.flatnonzero(groups == CellGroup.CONTRAST)
            if len(controls) == 0:
                raise InvalidValueError(
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
        self, adata, indices, reference_indices, library_size, cells=None, genes=None
    ) -> np.ndarray:
        """Observed counts with each cell's background exchanged for the reference's.

        ``x_ng * r_g / p_ng``, then normalised to ``library_size``: ``p_ng`` is the cell's
        background proportion (decoded at s = 0, calibrated on controls as for the responder
        calls) and ``r_g`` the reference cells' mean background proportion. ``cells`` is the
        ``CalibratedBackground`` of ``adata`` if already computed; ``genes`` (positions) selects
        the columns returned, normalised as in the full matrix.
        """
        if cells is None:
            _, cells = self._calibrated_background(adata, "rna")
        rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        genes = slice(None) if genes is None else np.asarray(genes)
        reference = _proportions(cells.background(reference_indices)).mean(0)
        n_genes = len(reference) if isinstance(genes, slice) else len(genes)
        # Filled in place, not concatenated from chunks: that would hold the layer twice.
        layer = np.empty((len(rows), n_genes), dtype=np.float32)
        for start in range(0, len(rows), INFERENCE_BATCH_SIZE):
            chunk = rows[start : start + INFERENCE_BATCH_SIZE]
            removed = cells.counts_of(chunk) * reference
            removed /= _proportions(cells.background(chunk))
            totals = removed.sum(1, keepdim=True).clamp(min=torch.finfo(removed.dtype).tiny)
            layer[start : start + len(chunk)] = (removed[:, genes] / totals * library_size).numpy()
        return layer

    @torch.inference_mode()
    def _denoised(self, cells, reference, library_size) -> np.ndarray:
        n_reference = len(reference["z"])
        chunk = max(1, _PAIRS_PER_CHUNK // n_reference)
        layer = np.empty((len(cells["s"]), self.summary_stats.n_vars), dtype=np.float32)
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
            mean_proportions = proportions.reshape(n_cells, n_reference, -1).mean(dim=1)
            layer[start : start + n_cells] = (mean_proportions * library_size).cpu().numpy()
        return layer

    @torch.inference_mode()
    def _effect(self, cells, genes=None) -> np.ndarray:
        """Log fold change of decoding with s against s = 0, in chunks of cells."""
        n_genes = self.summary_stats.n_vars if genes is None else len(genes)
        genes = slice(None) if genes is None else torch.as_tensor(np.asarray(genes))
        layer = np.empty((len(cells["s"]), n_genes), dtype=np.float32)
        for start in range(0, len(cells["s"]), INFERENCE_BATCH_SIZE):
            part = select_cells(cells, slice(start, start + INFERENCE_BATCH_SIZE))
            covariates = (part["batch"], part["cat"], part["cont"])
            with_salient = self.module.expression_proportions(part["z"], part["s"], *covariates)
            without = self.module.expression_proportions(
                part["z"], torch.zeros_like(part["s"]), *covariates
            )
            effect = torch.log(with_salient[:, genes] + _LOG_EPS)
            effect -= torch.log(without[:, genes] + _LOG_EPS)
            layer[start : start + len(effect)] = effect.cpu().numpy()
        return layer

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

        The reference is a random sample of ``n_reference_cells`` contrast controls by default,
        so every cell is shown on the same average control background; pass
        ``reference_indices`` for a fixed reference (e.g. the controls of one replicate).

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
            raise InvalidValueError(f'source={source!r}: pass "counts" or "decoder".')
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

    def _stream_layers(
        self, path, target, cells, calibrated, reference, names, rows, genes, progress_bar
    ) -> None:
        """Write the two dense layers of cells ``rows`` and genes ``genes`` into a new h5ad file.

        h5py datasets filled a chunk of cells at a time, in anndata's on-disk format for a dense
        array, rather than an AnnData built in memory: the layers may not fit in memory, and
        anndata has no writer that appends rows to an array.
        """
        shell = AnnData(
            obs=pd.DataFrame(index=target.obs_names[rows]),
            var=pd.DataFrame(index=target.var_names[genes]),
        )
        with written_whole(path) as partial:
            shell.write_h5ad(partial)
            self._fill_layers(
                partial, target, cells, calibrated, reference, names, rows, genes, progress_bar
            )

    def _fill_layers(
        self, path, target, cells, calibrated, reference, names, rows, genes, progress_bar
    ) -> None:
        """Fill the two layers of the h5ad file at ``path``, a chunk of cells at a time."""
        chunks = range(0, len(rows), INFERENCE_BATCH_SIZE)
        with h5py.File(path, "a") as store:
            layers = {}
            for name in (names["denoised"], names["effect"]):
                layers[name] = store["layers"].create_dataset(
                    name,
                    shape=(len(rows), len(genes)),
                    dtype="float32",
                    chunks=(max(1, min(len(rows), INFERENCE_BATCH_SIZE)), max(1, len(genes))),
                )
                layers[name].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            for start in track(chunks, description="Writing layers", disable=not progress_bar):
                part = rows[start : start + INFERENCE_BATCH_SIZE]
                stop = start + len(part)
                layers[names["denoised"]][start:stop] = self._background_removed_counts(
                    target, part, reference, NORMALISED_LIBRARY_SIZE, calibrated, genes
                )
                layers[names["effect"]][start:stop] = self._effect(select_cells(cells, part), genes)

    def write_outputs(
        self,
        adata: AnnData | MuData | None = None,
        *,
        prefix: str = "contrastive",
        threshold: float = 0.5,
        n_reference_cells: int = 50,
        n_perms: int = 1000,
        seed: int = 0,
        overwrite: bool = False,
        modality: str = "rna",
        dense_layers: bool = True,
        layers_file: str | Path | None = None,
        gene_list: Sequence[str] | None = None,
        cell_indices: Sequence[int] | None = None,
        progress_bar: bool = True,
    ) -> AnnData:
        """Write latents, target calls, responder calls and background-removed expression.

        Writes, for every cell:

        - ``obsm['X_<prefix>_salient']`` and ``obsm['X_<prefix>_background']``: posterior means;
        - ``obs['<prefix>_role']``: ``"perturbed"``, ``"contrast control"`` (trained as the
          perturbed cells were; the controls every test compares with), ``"background
          control"`` (trained without the salient latent; no test may use them) or
          ``"excluded"``;
        - ``uns['<prefix>_target_calls']``: :meth:`distance_test`, the E-distance permutation
          test of each target against the contrast controls on the salient latent of every
          cell: the p-values to report;
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
        - ``uns['<prefix>']``: provenance: the package version, the epochs trained, the test
          behind the target calls, and as JSON strings the arguments of this call, of the
          model and of ``setup_anndata``.

        Nothing is written unless all keys are free, or ``overwrite=True``.

        To run pertpy's test yourself, leave out the background controls:
        ``pt.tl.DistanceTest("edistance", obsm_key="X_<prefix>_salient")(adata[adata.obs[
        "<prefix>_role"] != "background control"], groupby=<perturbation key>,
        contrast=<control label>)``.

        The two layers are dense: at 1 million cells x 8,000 genes each is 32 GB. For large data
        pass ``dense_layers=False`` to skip them, or ``layers_file=`` to stream them, a chunk of
        cells at a time and with a progress bar, into a new h5ad file (``obs_names``, ``var_names``
        and the two layers, under the same keys), optionally for ``gene_list`` and
        ``cell_indices`` only; read it back with ``anndata.read_h5ad(path, backed="r")``.
        Everything else is written into the AnnData as above.

        Parameters
        ----------
        adata
            Data to write to (AnnData, or MuData whose ``modality`` gets the outputs); defaults
            to the data the model was set up with.
        prefix
            Prefix of the keys written.
        threshold
            Responder probability above which a perturbed cell is called KO.
        n_reference_cells
            Reference sample of :meth:`get_denoised_expression`.
        n_perms
            Permutations of the target calls' test.
        seed
            Seed of the reference sample, of the responder calls' cross-fitting folds.
        overwrite
            Replace existing keys of the same names.
        modality
            Modality when ``adata`` is a MuData.
        dense_layers
            Compute the two dense layers.
        layers_file
            Path of a new ``.h5ad`` file to stream the dense layers into, instead of ``adata``.
            An existing file is replaced only with ``overwrite=True``.
        gene_list, cell_indices
            Genes (names) and cells (positions) of the layers in ``layers_file``; default all.
        progress_bar
            Show progress bars (responder calls, target calls, streamed layers).

        Returns
        -------
        The AnnData written to.
        """
        target = self.adata if adata is None else resolve_modality(adata, modality)
        layers = _layer_plan(target, dense_layers, layers_file, gene_list, cell_indices, overwrite)
        keys = _free_output_keys(target, prefix, layers.in_adata, overwrite)
        arguments = _output_arguments(threshold, n_reference_cells, n_perms, seed, layers)
        outputs = self._outputs(target, keys, layers, arguments, modality, progress_bar)
        # Written only once everything is computed (the layers file aside), so a failure leaves
        # the data as it was.
        _write_into(target, outputs)
        return target

    def _outputs(self, target, keys, layers, arguments, modality, progress_bar) -> dict:
        """Compute what :meth:`write_outputs` writes into ``target``; stream the layers file."""
        self._check_if_trained(warn=False)
        self._validate_anndata(target)
        # One encoding pass serves the latents, the effect layer, the background-removed layer
        # and the responder calls.
        cells = self._posterior_means(target, None)
        _, calibrated = self._calibrated_background(target, modality, posterior_means=cells)
        reference = self._reference_indices(
            target, None, arguments["n_reference_cells"], arguments["seed"]
        )
        outputs = self._cell_outputs(
            target, keys, cells, calibrated, reference, arguments, progress_bar
        )
        if layers.streamed:
            self._stream_layers(
                Path(layers.file),
                target,
                cells,
                calibrated,
                reference,
                keys["layers"],
                layers.rows,
                layers.genes,
                progress_bar,
            )
        return outputs

    def _cell_outputs(
        self, target, keys, cells, calibrated, reference, arguments, progress_bar
    ) -> dict:
        """Everything :meth:`write_outputs` writes into the AnnData, by attribute and key."""
        latents = {"salient": cells["s"].cpu().numpy(), "background": cells["z"].cpu().numpy()}
        for latent in latents.values():
            check_finite_latent(latent)
        outputs = {"obsm": {keys["obsm"][kind]: latent for kind, latent in latents.items()}}
        if arguments["dense_layers"] and arguments["layers_file"] is None:
            outputs["layers"] = {
                keys["layers"]["denoised"]: self._background_removed_counts(
                    target, None, reference, NORMALISED_LIBRARY_SIZE, cells=calibrated
                ),
                keys["layers"]["effect"]: self._effect(cells),
            }
        evidence = self._responder_evidence(
            target, calibrated, seed=arguments["seed"], progress_bar=progress_bar
        )
        probability = evidence.probability
        target_class, global_class = self._responder_calls(
            target, probability, arguments["threshold"]
        )
        roles = pd.Categorical(
            [ROLE_NAMES[CellGroup(group)] for group in calibrated.groups],
            categories=list(ROLE_NAMES.values()),
        )
        outputs["obs"] = {
            keys["obs"]["p_perturbed"]: probability,
            keys["obs"]["class"]: target_class,
            keys["obs"]["class_global"]: global_class,
            keys["obs"]["role"]: roles,
        }
        outputs["uns"] = {
            keys["uns"]["target_calls"]: self.distance_test(
                target, n_perms=arguments["n_perms"], progress_bar=progress_bar
            ),
            keys["uns"]["fractions"]: self._responder_fractions(
                target, evidence, "target", 0.95, arguments["threshold"]
            ),
            keys["uns"]["provenance"]: self._provenance(arguments),
        }
        return outputs


def _output_keys(prefix: str) -> dict[str, dict[str, str]]:
    """Return the keys :meth:`ExpressionMixin.write_outputs` writes, by attribute and output."""
    return {
        "obsm": {kind: f"X_{prefix}_{kind}" for kind in ("salient", "background")},
        "layers": {"denoised": f"{prefix}_denoised", "effect": f"{prefix}_effect"},
        "obs": {
            name: f"{prefix}_{name}" for name in ("p_perturbed", "class", "class_global", "role")
        },
        "uns": {
            "target_calls": f"{prefix}_target_calls",
            "fractions": f"{prefix}_responder_fractions",
            "provenance": prefix,
        },
    }


def _free_output_keys(
    target: AnnData, prefix: str, with_layers: bool, overwrite: bool
) -> dict[str, dict[str, str]]:
    """Return the keys written into ``target``, once checked to be free (or ``overwrite``).

    Checked before anything is computed, so that a taken key costs no time.
    """
    keys = _output_keys(prefix)
    taken = [
        f"{attribute}[{key!r}]"
        for attribute, named in keys.items()
        if attribute != "layers" or with_layers
        for key in named.values()
        if key in getattr(target, attribute)
    ]
    if taken and not overwrite:
        raise MissingKeyError(
            f"{', '.join(taken)} already exist. Pass overwrite=True to replace them, or "
            "another prefix=."
        )
    return keys


def _output_arguments(threshold, n_reference_cells, n_perms, seed, layers: _LayerPlan) -> dict:
    """Return the arguments of :meth:`ExpressionMixin.write_outputs` its provenance records."""
    return {
        "threshold": threshold,
        "n_reference_cells": n_reference_cells,
        "n_perms": n_perms,
        "seed": seed,
        "dense_layers": layers.dense,
        "layers_file": None if layers.file is None else str(layers.file),
        "n_layer_genes": layers.n_genes,
        "n_layer_cells": layers.n_cells,
    }


def _write_into(target: AnnData, outputs: dict[str, dict]) -> None:
    """Write ``outputs`` (values by attribute and key) into ``target``."""
    for attribute, values in outputs.items():
        for key, value in values.items():
            getattr(target, attribute)[key] = value
