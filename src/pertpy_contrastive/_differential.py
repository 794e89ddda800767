"""Which genes changed: model-based differential expression of a target's responders.

For target t, each gene's log fold change is that of the responder mixture
(``_responder_mixture.py``): a negative-binomial regression of the target's counts on an
intercept, with each cell's own background as offset (the cell decoded as a control, calibrated
on controls) and each cell weighted by its responder posterior. This is the counterfactual
comparison: every responder against itself without the perturbation. The background's
variation (cell cycle, subclones, depth, batch) leaves the comparison instead of adding noise
to it, and escapers do not dilute it.

Uncertainty is the regression's Wald standard error plus that of the control-fitted offset,
scaled by an empirical null over the target's genes (the counts vary around a decoded
background more than the negative binomial says). The Wald p-values test LFC = 0. The
responder calls decide whether a target responded at all with the same test
(``_responder_mixture.mean_shift_wald_test``), the compositional shift kept.

The posterior of each gene's LFC uses a prior fitted across the target's genes (adaptive
shrinkage, Stephens 2017): a mixture of a point mass at 0 and centred normals on a grid of
scales, its weights fitted by EM on the estimates and their standard errors. Most genes of a
screen do not change, and a flat prior would call every noisy estimate a likely change; with
the fitted prior, scvi-tools' "change" quantities, ``proba_de`` = P(|LFC| > delta) and the
posterior expected FDR, hold their nominal rates.

scvi-tools' ``DifferentialComputation`` does not fit: it compares Monte Carlo samples of the
decoder's normalised expression between two sets of cells, whereas this LFC is a regression
of each cell's counts on its own counterfactual. Its FDR rule (``_fdr_de_prediction``) is
reused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scipy import special, stats
from scvi.model.base._de_core import _fdr_de_prediction
from scvi.utils import track

from . import _responder_mixture as mixture
from ._background import CalibratedBackground
from ._calling import contrast_label
from ._constants import DE_DELTA, DE_FDR_TARGET, TARGET_KEY
from ._data import InvalidValueError, as_label_list

_SCORING_STEPS = 25
_PRIOR_SCALES = np.array([0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
"""Standard deviations (log2) of the prior's components; the first is the point mass at 0."""
_PRIOR_EM_STEPS = 200
_NULL_PSEUDOCOUNT = 10.0
"""Dirichlet pseudo-count on the point mass, which leans the prior to "no change" (as ashr)."""
_INTERVAL_LEVEL = 0.95
_MIN_RESPONDERS = 1.0
"""Fewer expected responders than this: no responder to estimate an effect from."""


class DifferentialExpressionMixin:
    """Differential expression of a trained :class:`~pertpy_contrastive.ContrastiveVAE`."""

    @torch.inference_mode()
    def differential_expression(
        self,
        adata: AnnData | MuData | None = None,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | Sequence[str] | None = None,
        *,
        responders_only: bool = True,
        delta: float = DE_DELTA,
        fdr_target: float = DE_FDR_TARGET,
        probability: np.ndarray | None = None,
        modality: str = "rna",
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Genes whose expression a target changed in its responders, against the controls.

        Each gene's log2 fold change compares the target's responders with the same cells'
        background, the expression the model reads in them as controls: the counterfactual, on
        a common background (docs/model.md#differential-expression). Cells are grouped by the
        perturbation column the model was set up with; the arguments follow scvi-tools'
        ``differential_expression``.

        Parameters
        ----------
        adata
            Data to test (with the screen's controls); defaults to the data the model was set
            up with.
        groupby
            The perturbation column the model was set up with, or ``None`` (the same).
        group1
            Target(s) to test; default every trained target with cells in ``adata``.
        group2
            The control label(s) (the default). Other references are refused: the comparison
            is with each cell's own background, which the controls calibrate.
        responders_only
            Weight each cell by its responder probability (:meth:`get_responder_probability`);
            otherwise every cell of the target counts fully. A target without detectable
            responders then has no DE gene.
        delta
            Smallest absolute log2 fold change that counts as a change for ``proba_de``.
        fdr_target
            Posterior expected FDR of the genes flagged in ``is_de_fdr_<fdr_target>``.
        probability
            Responder probabilities of the cells of ``adata``, if already computed.
        modality
            Modality when ``adata`` is a MuData.
        progress_bar
            Show progress bars over the targets (responder calls, then the tests).

        Returns
        -------
        One row per gene and target (indexed by gene), in scvi-tools' naming:

        - ``lfc_mean``, ``lfc_std``, ``lfc_ci_low``, ``lfc_ci_high``: the log2 fold change,
          its standard deviation and 95% interval;
        - ``proba_de`` (``P(|LFC| > delta)``), ``proba_not_de``, ``bayes_factor`` (natural
          log) and ``is_de_fdr_<fdr_target>``;
        - ``p_value`` (Wald, H0: LFC = 0) and ``p_value_adj`` (Benjamini-Hochberg per target);
        - ``raw_mean1`` (mean count of the target's cells, weighted as tested), ``raw_mean2``
          (of the controls), ``n_cells1``, ``n_responders`` (the summed weights), ``delta``,
          ``group1``, ``group2`` and ``comparison``.

        Genes of a target with fewer than one expected responder get NaN fold changes,
        ``proba_de`` 0 and ``p_value`` 1.
        """
        self._check_comparison(groupby, group2)
        adata, cells = self._calibrated_background(adata, modality)
        tested = self._tested_targets(cells, group1)
        if responders_only and probability is None:
            evidence = self._responder_evidence(adata, cells, progress_bar=progress_bar)
            probability = evidence.probability
        elif responders_only and len(probability) != adata.n_obs:
            raise InvalidValueError(
                f"probability has {len(probability)} values for {adata.n_obs} cells. Pass the "
                "responder probabilities of these cells, get_responder_probability(adata), or "
                "leave probability unset."
            )
        return self._differential_expression(
            adata,
            cells,
            tested,
            probability if responders_only else None,
            delta,
            fdr_target,
            progress_bar,
        )

    def _check_comparison(self, groupby, group2) -> None:
        """Refuse a grouping or a reference other than the model's own."""
        perturbation_key = self.get_setup_arg("perturbation_key")
        if groupby is not None and groupby != perturbation_key:
            raise InvalidValueError(
                f"groupby={groupby!r}: the model compares the groups of the column it was set "
                f"up with, {perturbation_key!r}. Pass groupby={perturbation_key!r} or leave it "
                "unset."
            )
        controls = self.control_labels
        if group2 is not None and not set(as_label_list(group2)) <= set(controls):
            raise InvalidValueError(
                f"group2={group2!r}: the comparison is with each cell's own background, which "
                f"the controls ({controls}) calibrate. Leave group2 unset, or compare two "
                "targets through their separate comparisons with the controls."
            )

    def _tested_targets(self, cells: CalibratedBackground, group1) -> list[str]:
        """``group1`` as a list, checked against the trained targets with cells; default all."""
        labels = list(self.adata_manager.get_state_registry(TARGET_KEY)["target_labels"])
        tested = [label for index, label in enumerate(labels) if len(cells.of_target(index)) > 0]
        if group1 is None:
            return tested
        requested = [group1] if isinstance(group1, str) else list(group1)
        unknown = [label for label in requested if label not in tested]
        if unknown:
            raise InvalidValueError(
                f"group1 {unknown} are not trained targets with cells in these data "
                f"(column {self.get_setup_arg('perturbation_key')!r}). Trained targets with "
                f"cells: {tested}."
            )
        return requested

    def _differential_expression(
        self,
        adata,
        cells: CalibratedBackground,
        tested,
        probability,
        delta,
        fdr_target,
        progress_bar=False,
    ) -> pd.DataFrame:
        """:meth:`differential_expression` of validated ``tested`` targets on decoded ``cells``.

        ``probability`` weighs the cells; ``None`` counts every cell fully.
        """
        labels = list(self.adata_manager.get_state_registry(TARGET_KEY)["target_labels"])
        control = contrast_label(self.control_labels)
        controls = cells.control_cells
        tables = []
        for label in track(tested, description="Differential expression", disable=not progress_bar):
            members = cells.of_target(labels.index(label))
            counts = cells.counts_of(members)
            weights = torch.as_tensor(
                np.ones(len(members)) if probability is None else probability[members],
                dtype=torch.float64,
            )
            table = _gene_effect_table(
                counts,
                cells.background(members),
                cells.dispersion,
                weights,
                controls.information,
                delta,
                fdr_target,
            )
            table["raw_mean2"] = controls.counts.mean(0).numpy()
            table["group1"], table["group2"] = label, control
            table["comparison"] = f"{label} vs {control}"
            tables.append(table.set_index(adata.var_names.copy()))
        return pd.concat(tables)


def _gene_effect_table(
    counts, background, dispersion, weights, control_information, delta, fdr_target
) -> pd.DataFrame:
    """Compute the DE columns of one target's cells against their background."""
    n_responders = float(weights.sum())
    n_genes = counts.shape[1]
    columns = {"n_cells1": counts.shape[0], "n_responders": n_responders, "delta": delta}
    if n_responders < _MIN_RESPONDERS:
        table = pd.DataFrame(
            {
                "lfc_mean": np.nan,
                "lfc_std": np.nan,
                "lfc_ci_low": np.nan,
                "lfc_ci_high": np.nan,
                "proba_de": 0.0,
                "proba_not_de": 1.0,
                "bayes_factor": -np.inf,
                f"is_de_fdr_{fdr_target}": False,
                "p_value": 1.0,
                "p_value_adj": 1.0,
                "raw_mean1": np.nan,
                **columns,
            },
            index=range(n_genes),
        )
        return table
    start = torch.zeros(n_genes, dtype=torch.float64)
    effect = mixture.fit_gene_effects(
        counts, background, dispersion, weights, start, _SCORING_STEPS
    )
    information = mixture.fisher_information(background * effect.exp(), dispersion, weights)
    effect, standard_error, p_value, _ = mixture.mean_shift_wald_test(
        effect.numpy(),
        information.numpy(),
        control_information.numpy(),
        np.ones(n_genes, dtype=bool),
    )
    estimate, standard_error = effect / np.log(2.0), standard_error / np.log(2.0)
    lfc_mean, lfc_std, proba_de, ci_low, ci_high = _adaptive_shrinkage(
        estimate, standard_error, delta
    )
    table = pd.DataFrame(
        {
            "lfc_mean": lfc_mean,
            "lfc_std": lfc_std,
            "lfc_ci_low": ci_low,
            "lfc_ci_high": ci_high,
            "proba_de": proba_de,
            "proba_not_de": 1.0 - proba_de,
            "bayes_factor": np.log(proba_de + 1e-12) - np.log1p(-proba_de + 1e-12),
            "p_value": p_value,
            "p_value_adj": stats.false_discovery_control(p_value, method="bh"),
            "raw_mean1": (weights[:, None] * counts).sum(0).numpy() / n_responders,
            **columns,
        }
    )
    table.insert(
        table.columns.get_loc("p_value"),
        f"is_de_fdr_{fdr_target}",
        _fdr_de_prediction(table["proba_de"], fdr_target).to_numpy(),
    )
    return table


def _adaptive_shrinkage(estimate, standard_error, delta):
    """Posterior summaries of each gene's LFC under a prior fitted across the genes.

    The prior is ``sum_k w_k N(0, scale_k^2)`` over ``_PRIOR_SCALES`` (scale 0: the point
    mass); each estimate is ``N(LFC, standard_error^2)``. Returns the posterior mean, standard
    deviation, P(|LFC| > delta) and the ends of an equal-tailed 95% interval.
    """
    scales = _PRIOR_SCALES[None, :]
    se = standard_error[:, None]
    marginal_sd = np.sqrt(se**2 + scales**2)
    log_likelihood = stats.norm.logpdf(estimate[:, None], scale=marginal_sd)
    pseudocounts = np.zeros(len(_PRIOR_SCALES))
    pseudocounts[0] = _NULL_PSEUDOCOUNT - 1.0
    weights = np.full(len(_PRIOR_SCALES), 1.0 / len(_PRIOR_SCALES))
    for _ in range(_PRIOR_EM_STEPS):
        responsibility = _normalise_log(np.log(weights) + log_likelihood)
        weights = responsibility.sum(0) + pseudocounts
        weights = np.clip(weights / weights.sum(), 1e-12, None)
    responsibility = _normalise_log(np.log(weights) + log_likelihood)
    # Given component k, the LFC is normal: precision-weighted shrinkage of the estimate.
    shrinkage = scales**2 / marginal_sd**2
    component_mean = shrinkage * estimate[:, None]
    component_sd = np.sqrt(shrinkage) * se
    mean = (responsibility * component_mean).sum(1)
    second_moment = (responsibility * (component_sd**2 + component_mean**2)).sum(1)
    sd = np.sqrt(np.clip(second_moment - mean**2, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        above = stats.norm.sf((delta - component_mean) / component_sd)
        below = stats.norm.cdf((-delta - component_mean) / component_sd)
    changed = np.nan_to_num(above + below)  # the point mass never exceeds delta
    proba_de = (responsibility * changed).sum(1)
    tail = (1.0 - _INTERVAL_LEVEL) / 2.0
    ci_low = _mixture_quantile(responsibility, component_mean, component_sd, tail)
    ci_high = _mixture_quantile(responsibility, component_mean, component_sd, 1.0 - tail)
    return mean, sd, np.clip(proba_de, 0.0, 1.0), ci_low, ci_high


def _normalise_log(log_weights) -> np.ndarray:
    return np.exp(log_weights - special.logsumexp(log_weights, axis=1, keepdims=True))


def _mixture_quantile(responsibility, mean, sd, level, n_steps=60) -> np.ndarray:
    """Quantile ``level`` of each row's normal mixture (point masses where ``sd`` is 0)."""
    low = (mean - 10.0 * sd).min(1) - 1e-9
    high = (mean + 10.0 * sd).max(1) + 1e-9
    for _ in range(n_steps):
        middle = (low + high) / 2.0
        with np.errstate(divide="ignore", invalid="ignore"):
            cdf = np.where(
                sd > 0,
                stats.norm.cdf((middle[:, None] - mean) / sd),
                (middle[:, None] >= mean).astype(float),
            )
        below = (responsibility * cdf).sum(1) < level
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    # The point mass at 0 (sd 0, mean 0) is a jump of the CDF: where ``level`` falls inside
    # it, the quantile is exactly 0, which bisection only approaches.
    with np.errstate(divide="ignore", invalid="ignore"):
        below_zero = np.where(sd > 0, stats.norm.cdf(-mean / sd), (mean < 0).astype(float))
    mass_at_zero = (responsibility * ((sd == 0) & (mean == 0))).sum(1)
    cdf_below_zero = (responsibility * below_zero).sum(1)
    at_zero = (cdf_below_zero < level) & (level <= cdf_below_zero + mass_at_zero)
    return np.where(at_zero, 0.0, (low + high) / 2.0)
