"""Which cells responded: the responder posterior, Mixscape-style calls and responder fractions.

A mixin of :class:`~pertpy_contrastive.ContrastiveVAE`, kept apart from training and the
expression outputs. The responder mixture itself is in ``_responder_mixture.py``; here it runs on
the background that the trained VAE reads in each cell, calibrated on the contrast controls
(``_background.py``), which training treated as it treated perturbed cells, so that an escaper
and a contrast control are alike in everything training did to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scipy import special, stats
from scvi.utils import track

from . import _responder_mixture as mixture
from ._background import CalibratedBackground
from ._constants import (
    GROUP_KEY,
    RESPONDER_FOLDS,
    RESPONDER_GENE_FDR,
    TARGET_KEY,
    CellGroup,
)
from ._data import InvalidValueError

CONTROL_CLASS = "NT"
"""Class of control cells, as in pertpy's Mixscape."""

CONTROL_GROUPS = (CellGroup.BACKGROUND, CellGroup.CONTRAST)


@dataclass(frozen=True)
class ResponderEvidence:
    """Per-cell output of the responder mixture over a whole AnnData (arrays of ``n_obs``)."""

    log_ratio: np.ndarray
    """Cross-fitted log-likelihood ratio of response; NaN for cells not scored."""
    control_p_value: np.ndarray
    """P-value of the ratio among the controls' under the same effect; NaN if not scored."""
    log_odds: np.ndarray
    """Posterior log odds: ``-inf`` for controls and for cells of targets without a detectable
    response, NaN for cells whose label is not a trained target."""
    effect_genes: dict[str, np.ndarray]
    """Per target label, the genes of its detectable response (a boolean mask over genes)."""

    @property
    def probability(self) -> np.ndarray:
        return special.expit(self.log_odds)


class ResponderMixin:
    """Responder outputs of a trained :class:`~pertpy_contrastive.ContrastiveVAE`."""

    @torch.inference_mode()
    def get_responder_probability(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        gene_fdr: float = RESPONDER_GENE_FDR,
        n_folds: int = RESPONDER_FOLDS,
        use_target_gene: bool = True,
        seed: int = 0,
        modality: str = "rna",
        progress_bar: bool = True,
    ) -> np.ndarray:
        """Posterior probability that each cell responded to its perturbation, P(y = 1 | x).

        Each target's cells are a two-branch mixture on the background the model reads in
        them (``_responder_mixture.py``): escapers are expressed like their background,
        responders shift a sparse set of genes by the target's log fold changes. The effect is
        fitted on the other ``n_folds - 1`` folds of the target's cells, so that a cell's noise
        cannot make it look like a responder. The responder fraction, the prior, is the share
        of the target's cells whose evidence stands out from the controls' under the same
        effect (escapers express like controls). A cell's perturbation label enters only as
        the index of its target's effect and fraction; the encoders do not see it. The mixture is fitted on the cells of
        ``adata``, so a target needs cells there.

        Parameters
        ----------
        adata
            Data to score; defaults to the data the model was set up with. It needs controls
            (they calibrate the background).
        indices
            Cells to return; default all. The mixture is still fitted on all cells.
        gene_fdr
            Benjamini-Hochberg level at which a gene enters a target's effect. A target with
            no such gene has no detectable response: its cells get probability 0.
        n_folds
            Folds of the cross-fitting (at least 2).
        use_target_gene
            Let the target's own gene (when the label is a gene of ``adata``) count as evidence,
            like any other gene (the default): in CRISPRi screens the knockdown of the target
            is often the whole effect. ``False`` rests the calls on the downstream response
            alone, so that the target gene's mRNA in cells called KO against NP checks them
            independently; a knockdown without any downstream effect is then not called a
            response. :meth:`get_responder_fractions` reports whether the target's gene is
            among the effect genes.
        seed
            Seed of the fold assignment (the result is reproducible).
        modality
            Modality when ``adata`` is a MuData.
        progress_bar
            Show a progress bar over the targets.

        Returns
        -------
        Array ``(n_cells,)``: 0 for controls, NaN for cells whose label is not a trained target
        (no guide, several targets, or a label absent from training), P(y = 1 | x) otherwise.
        """
        adata, cells = self._calibrated_background(adata, modality)
        evidence = self._responder_evidence(
            adata, cells, gene_fdr, n_folds, use_target_gene, seed, progress_bar
        )
        probability = evidence.probability
        return probability if indices is None else probability[np.asarray(indices)]

    def _responder_evidence(
        self,
        adata: AnnData,
        cells: CalibratedBackground,
        gene_fdr=RESPONDER_GENE_FDR,
        n_folds=RESPONDER_FOLDS,
        use_target_gene=True,
        seed=0,
        progress_bar=False,
    ) -> ResponderEvidence:
        """Compute the responder mixture's evidence for every cell of decoded ``cells``."""
        labels = self.adata_manager.get_state_registry(TARGET_KEY)["target_labels"]
        evidence = ResponderEvidence(
            log_ratio=np.full(adata.n_obs, np.nan),
            control_p_value=np.full(adata.n_obs, np.nan),
            log_odds=np.full(adata.n_obs, np.nan),
            effect_genes={},
        )
        evidence.log_odds[np.isin(cells.groups, CONTROL_GROUPS)] = -np.inf
        rng = np.random.default_rng(seed)
        targets = track(
            list(enumerate(labels)), description="Responder calls", disable=not progress_bar
        )
        for index, label in targets:
            members = cells.of_target(index)
            if len(members) == 0:
                continue
            allowed = torch.as_tensor(use_target_gene | (adata.var_names != label))
            target = mixture.cross_fitted_evidence(
                cells.counts_of(members),
                cells.background(members),
                cells.dispersion,
                allowed,
                gene_fdr,
                n_folds,
                rng,
                cells.control_cells,
            )
            evidence.log_ratio[members] = target.log_ratio
            evidence.control_p_value[members] = target.control_p_value
            evidence.log_odds[members] = target.log_odds
            evidence.effect_genes[label] = target.effect_genes
        return evidence

    def _responder_calls(self, adata: AnnData, probability: np.ndarray, threshold: float):
        """Mixscape-style classes from responder probabilities."""
        labels = adata.obs[self.get_setup_arg("perturbation_key")].astype("string")
        groups = self.get_anndata_manager(adata).get_from_registry(GROUP_KEY).ravel()
        scored = ~np.isnan(probability)
        is_control = np.isin(groups, CONTROL_GROUPS)
        responded = scored & ~is_control & (np.nan_to_num(probability) > threshold)
        global_class = np.full(len(labels), None, dtype=object)
        global_class[scored & ~is_control] = "NP"
        global_class[responded] = "KO"
        global_class[is_control] = CONTROL_CLASS
        target_class = global_class.copy()
        perturbed = scored & ~is_control
        target_class[perturbed] = labels.to_numpy()[perturbed] + " " + global_class[perturbed]
        return (
            pd.Categorical(target_class),
            pd.Categorical(global_class, categories=[CONTROL_CLASS, "NP", "KO"]),
        )

    def get_responder_fractions(
        self,
        adata: AnnData | MuData | None = None,
        by: Literal["target", "guide"] = "target",
        level: float = 0.95,
        threshold: float = 0.5,
        seed: int = 0,
        modality: str = "rna",
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Fraction of each target's (or guide's) cells that responded, with an interval.

        The fraction is the mean responder probability of the group's cells (with a uniform
        prior, ``(1 + sum_n p_n) / (2 + n)``). The interval allows for weak evidence, where the
        data barely tell "a few cells shifted a lot" from "many shifted a little": its lower end
        is the share of cells that stand out from the controls (Storey's estimate at its
        confidence limit), its upper end the limit of the mixture likelihood's fraction, which
        leans high (``_responder_mixture.fraction_bounds``). Cells without a detectable
        response (their target, or their fold's effect, has no effect gene) count as
        non-responders. Different guides against one gene differ in efficiency:
        ``by="guide"`` shows which guides worked.

        Parameters
        ----------
        adata
            Data to summarise; defaults to the data the model was set up with.
        by
            ``"target"`` (the perturbation label) or ``"guide"`` (the ``guide_key`` given to
            :meth:`setup_anndata`).
        level
            Coverage of the interval.
        threshold
            Probability above which a cell is counted in ``n_called``.
        seed
            Seed of the cross-fitting folds, as in :meth:`get_responder_probability`.
        modality
            Modality when ``adata`` is a MuData.
        progress_bar
            Show a progress bar over the targets.

        Returns
        -------
        DataFrame indexed by target or guide, with columns ``target``, ``n_cells``,
        ``responder_fraction``, ``ci_low``, ``ci_high``, ``n_called`` (cells above
        ``threshold``), ``n_effect_genes`` (genes of the target's detectable response) and
        ``target_gene_in_effect`` (whether the target's own gene is one of them, i.e. counted
        as evidence of response).
        """
        if by not in ("target", "guide"):
            raise InvalidValueError(f"by must be 'target' or 'guide', got {by!r}.")
        if by == "guide" and self.get_setup_arg("guide_key") is None:
            raise InvalidValueError(
                "The model was set up without guide_key, so guides are unknown. Pass "
                "guide_key=<obs column of each cell's guide> to ContrastiveVAE.setup_anndata "
                "(pp.perturbation_labels writes one with guide_key_added=...)."
            )
        adata, cells = self._calibrated_background(adata, modality)
        evidence = self._responder_evidence(adata, cells, seed=seed, progress_bar=progress_bar)
        return self._responder_fractions(adata, evidence, by, level, threshold)

    def _responder_fractions(self, adata, evidence, by, level, threshold) -> pd.DataFrame:
        """:meth:`get_responder_fractions` from already computed evidence."""
        perturbation_key = self.get_setup_arg("perturbation_key")
        guide_key = self.get_setup_arg("guide_key")
        groups = self.get_anndata_manager(adata).get_from_registry(GROUP_KEY).ravel()
        probability = evidence.probability
        in_group = ~np.isnan(probability) & (groups == CellGroup.TARGET)
        group_labels = adata.obs[guide_key if by == "guide" else perturbation_key].astype(str)
        target_labels = adata.obs[perturbation_key].astype(str).to_numpy()
        candidates = np.flatnonzero(in_group)
        candidate_groups = pd.Series(group_labels.to_numpy()[candidates])
        members_by_group = candidate_groups.groupby(candidate_groups, sort=True).indices
        rows = {}
        for group, positions in members_by_group.items():
            members = candidates[positions]
            cell_probability = probability[members]
            scored = ~np.isnan(evidence.control_p_value[members])
            n_cells, responded = len(members), float(cell_probability.sum())
            if scored.any():
                low, high = mixture.fraction_bounds(
                    evidence.log_ratio[members][scored],
                    evidence.control_p_value[members][scored],
                    level,
                )
                # Unscored cells count as non-responders, as in the point estimate.
                share = scored.mean()
                low, high = low * share, high * share
            else:
                low = high = 0.0
            # Never narrower than the spread of the cells' own probabilities.
            spread = stats.beta(1 + responded, 1 + n_cells - responded)
            spread_low, spread_high = spread.interval(level)
            target = target_labels[members[0]]
            effect_genes = evidence.effect_genes.get(target, np.zeros(adata.n_vars, bool))
            rows[group] = {
                "target": target,
                "n_cells": n_cells,
                "responder_fraction": spread.mean(),
                "ci_low": min(low, spread_low),
                "ci_high": max(high, spread_high),
                "n_called": int((cell_probability > threshold).sum()),
                "n_effect_genes": int(effect_genes.sum()),
                "target_gene_in_effect": bool(effect_genes[adata.var_names == target].any()),
            }
        columns = [
            "target",
            "n_cells",
            "responder_fraction",
            "ci_low",
            "ci_high",
            "n_called",
            "n_effect_genes",
            "target_gene_in_effect",
        ]
        summary = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
        summary.index.name = by
        return summary
