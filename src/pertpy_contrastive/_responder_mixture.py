"""The responder mixture: which cells of a target responded, given the model's background.

Generative model, for cell n with target t, on the background the trained VAE reads in the cell
(its counts decoded with the salient latent at 0, i.e. as a control):

    b_ng = l_n * rho_g(z_n, s = 0, c_n) * exp(o_g)     background mean of gene g in cell n
    y_n ~ Bernoulli(pi_t)                              did the knockout take?
    x_ng ~ NB(b_ng * exp(y_n * delta_tg), theta_g)     a responder's genes shift by delta_t

``o_g`` corrects the decoder's average error per gene, measured on controls (which carry no
effect): decoding a cell at its posterior mean and dropping zero inflation leave a gene-wise
bias that would otherwise look like an effect of every target. ``theta_g`` is the VAE's
dispersion. ``delta_t`` is sparse: a gene enters only if its Wald test passes Benjamini-Hochberg
at ``gene_fdr`` among the genes, so a target without a detectable response has no effect genes
and no responders. y is summed out exactly, by EM on the two-branch mixture (the M-step for
delta_t is a per-gene weighted negative-binomial regression with offset ``log b``).

Cross-fitting keeps a cell's call honest: delta_t is fitted on the other folds of the target's
cells, and each cell is scored with the effect of the folds that did not see it. A delta_t
fitted on a cell's own counts would fit its noise, and an escaper would look like a responder
(the failure of the in-VAE responder posterior, docs/benchmarks.md).

The responder fraction pi_t comes from the controls, not from the mixture likelihood. An
escaper expresses like a control, so scored with the same effect, the escapers' likelihood
ratios are distributed like the controls'; the share of a target's cells that score like
controls estimates 1 - pi_t (Storey's null fraction, on each cell's p-value against the
controls). The mixture's own maximum-likelihood fraction trades off against the size of a weak
effect ("everyone shifted a little" fits nearly as well as "some shifted more") and came out
too high: on the seed-0 model of the weak-effect calling screen, control cells scored as an
effect target's cells got a mean posterior of 0.18 to 0.76 (a one-off check, not a committed
benchmark; the benchmark's effect is in docs/benchmarks.md).

Hand-written rather than Pyro SVI: the M-step has a closed-form Fisher-scoring update per gene,
and exact zeros in delta_t need a test, not a shrinkage prior.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy import optimize, stats

_SCORING_STEPS = 8
_EM_STEPS = 15
_EM_SCORING_STEPS = 2  # per M-step, warm-started from the previous step's effect
_NULL_FRACTION_LAMBDA = 0.5  # Storey's tuning parameter, qvalue's classic choice
_MAX_ABS_EFFECT = 5.0
POISSON_DISPERSION = 1e12
"""Dispersion that makes the negative binomial a Poisson in double precision."""


class ControlCells(NamedTuple):
    """The controls' counts beside their calibrated background: the escapers' reference."""

    counts: torch.Tensor
    background: torch.Tensor
    information: torch.Tensor
    """Fisher information of the control-fitted offset ``o_g`` (see ``mean_shift_wald_test``)."""


def control_cells(counts, background, dispersion) -> ControlCells:
    weights = torch.ones(counts.shape[0], dtype=counts.dtype)
    return ControlCells(counts, background, fisher_information(background, dispersion, weights))


def negative_binomial_log_likelihood(counts, mean, dispersion) -> torch.Tensor:
    """Per-entry NB log-likelihood up to terms free of ``mean`` (they cancel in every ratio).

    Written with ``log1p(mean / dispersion)`` so that a huge dispersion gives the Poisson limit.
    """
    return counts * mean.log() - (counts + dispersion) * torch.log1p(mean / dispersion)


def fit_gene_effects(counts, background, dispersion, weights, effect, steps) -> torch.Tensor:
    """Weighted NB regression of each gene on an intercept with offset ``log background``.

    ``steps`` Fisher-scoring updates of the log fold changes, from ``effect``.
    """
    for _ in range(steps):
        mean = background * effect.exp()
        # theta / (mean + theta) is shared by the score and the information; in place, since at
        # the 20,000 reference controls every cells x genes temporary is 320 MB per 2,000 genes.
        shrinkage = (mean + dispersion).reciprocal_().mul_(dispersion)
        score = weights @ (counts - mean).mul_(shrinkage)
        information = (weights @ mean.mul_(shrinkage)).clamp(min=1e-8)
        effect = (effect + score / information).clamp(-_MAX_ABS_EFFECT, _MAX_ABS_EFFECT)
    return effect


def select_effect_genes(
    counts, background, dispersion, allowed, gene_fdr, control_information=None
):
    """Genes whose mean shift in all of a target's cells passes Benjamini-Hochberg.

    Returns ``(genes, overdispersion)``. The test (:func:`mean_shift_wald_test`) compares all
    the target's cells with their background, before any cell is weighed by its posterior:
    re-selecting genes on posterior-weighted cells would reinforce whichever noise the first
    weights favoured. It is the test of the unweighted ``differential_expression`` but for the
    compositional shift, which is kept: selection asks whether a target moved its cells at all,
    and a knockout that moves much of the panel (IFN-γ pathway knockouts on the Papalexi genes)
    moves the median gene too. Centring it away there hid the knocked-out gene's own signal
    (IFNGR2's mRNA was no lower in cells called KO than in cells called NP). The square of the
    empirical-null scale is the quasi-likelihood overdispersion that tempers the likelihood
    ratios of the mixture.
    """
    weights = torch.ones(counts.shape[0], dtype=counts.dtype)
    effect = _unweighted_effects(counts, background, dispersion)
    information = fisher_information(background * effect.exp(), dispersion, weights)
    if control_information is not None:
        control_information = control_information.numpy()
    _, _, p_values, null_scale = mean_shift_wald_test(
        effect.numpy(),
        information.numpy(),
        control_information,
        allowed.numpy(),
        remove_compositional_shift=False,
    )
    selected = stats.false_discovery_control(p_values, method="bh") <= gene_fdr
    return torch.from_numpy(selected), null_scale**2


def mean_shift_wald_test(
    effect, information, control_information, allowed, remove_compositional_shift=True
):
    """Wald test of each gene's log fold change against the cells' background (natural log).

    Returns ``(effect, standard_error, p_values, null_scale)``; genes outside ``allowed`` get
    p = 1 and do not enter the corrections below.

    - The background is decoded at the cell's observed depth, which a responder's effect genes
      inflate (or deflate): every other gene then looks shifted by the same amount. As with
      DESeq2's median-of-ratios, most genes are taken to be unchanged, and their median effect,
      that compositional shift, is removed (``remove_compositional_shift``).
    - The background carries the control-fitted offset ``o_g``; its variance
      (``1 / control_information``) enters the standard error. A gene nearly absent from the
      controls has an uncertain offset, and a few counts in a small target would otherwise
      look like a strong effect (a false hit of a non-targeting pseudo-target on Papalexi).
    - Empirical null (Efron 2004): most genes have no effect, so the spread of the bulk of the
      statistics measures how much more the counts vary around the decoded background than
      the negative binomial says (the background is itself an estimate). The standard errors
      are scaled by it (never shrunk).
    """
    variance = 1.0 / information
    if control_information is not None:
        variance = variance + 1.0 / control_information
    standard_error = np.sqrt(variance)
    if remove_compositional_shift:
        effect = effect - np.median(effect[allowed])
    wald = effect / standard_error
    null_scale = max(1.0, stats.median_abs_deviation(wald[allowed], scale="normal"))
    standard_error = standard_error * null_scale
    p_values = 2.0 * stats.norm.sf(np.abs(effect) / standard_error)
    p_values[~allowed] = 1.0
    return effect, standard_error, p_values, null_scale


def fisher_information(mean, dispersion, weights) -> torch.Tensor:
    # One cells x genes temporary: at the 20,000 reference controls, each is 320 MB per 2,000
    # genes.
    per_cell = (mean + dispersion).reciprocal_().mul_(mean).mul_(dispersion)
    return (weights @ per_cell).clamp(min=1e-8)


def log_likelihood_ratio(counts, background, dispersion, effect, overdispersion=1.0):
    """``log p(x | y = 1) - log p(x | y = 0)`` per cell, for a target's effect.

    Divided by the quasi-likelihood ``overdispersion`` (see ``select_effect_genes``). Only the
    genes with an effect enter, since the two branches are equal on the others: an effect
    touches few genes, and every reference control is scored for every fold of every target.
    """
    genes = effect != 0
    counts, background = counts[:, genes], background[:, genes]
    dispersion, effect = dispersion[genes], effect[genes]
    responded = negative_binomial_log_likelihood(counts, background * effect.exp(), dispersion)
    escaped = negative_binomial_log_likelihood(counts, background, dispersion)
    return (responded - escaped).sum(-1) / overdispersion


def fit_responder_effect(
    counts, background, dispersion, allowed, gene_fdr, control_information=None
):
    """EM for one target's effect ``delta_t``, summing y out exactly; 0 off its effect genes.

    Returns ``(delta_t, overdispersion)``.

    Starts from "every cell responded", so that the first effect is the target's mean shift,
    diluted by its escapers; each E-step then weighs cells by their posterior.
    """
    genes, overdispersion = select_effect_genes(
        counts, background, dispersion, allowed, gene_fdr, control_information
    )
    effect = torch.zeros(counts.shape[1], dtype=counts.dtype)
    if not genes.any():
        return effect, overdispersion
    counts, background = counts[:, genes], background[:, genes]
    gene_dispersion = dispersion[genes]
    weights = torch.ones(counts.shape[0], dtype=counts.dtype)
    selected_effect = torch.zeros(counts.shape[1], dtype=counts.dtype)
    for _ in range(_EM_STEPS):
        selected_effect = fit_gene_effects(
            counts, background, gene_dispersion, weights, selected_effect, _EM_SCORING_STEPS
        )
        fraction = float(weights.mean().clamp(1e-3, 1.0 - 1e-3))
        log_ratio = log_likelihood_ratio(
            counts, background, gene_dispersion, selected_effect, overdispersion
        )
        weights = torch.sigmoid(_logit(fraction) + log_ratio)
    effect[genes] = selected_effect
    return effect, overdispersion


def null_fraction(p_values) -> float:
    """Storey's (2002) estimate of the share of cells drawn from the null (the controls).

    Null p-values are uniform, responders' pile up near 0: above ``lambda`` nearly all cells are
    null ones, ``(1 - lambda)`` of them.
    """
    above = float(np.mean(p_values > _NULL_FRACTION_LAMBDA))
    return min(1.0, above / (1.0 - _NULL_FRACTION_LAMBDA))


class TargetEvidence(NamedTuple):
    """Per-cell evidence of response of one target's cells; NaN where a cell was not scored."""

    log_ratio: np.ndarray
    """Cross-fitted ``log p(x | y = 1) - log p(x | y = 0)``, tempered by the overdispersion."""
    control_p_value: np.ndarray
    """Share of the controls whose ratio, under the same effect, is at least the cell's."""
    effect_genes: np.ndarray
    """Genes that pass the target-level test in all the target's cells (a boolean mask)."""

    @property
    def log_odds(self) -> np.ndarray:
        """Posterior log odds of response: the fraction's prior log odds plus the ratio.

        ``-inf`` for cells without a score: the target, or the effect fitted without the
        cell's fold, showed no effect gene.
        """
        scored = ~np.isnan(self.control_p_value)
        log_odds = np.full(len(scored), -np.inf)
        if scored.any():
            fraction = np.clip(1.0 - null_fraction(self.control_p_value[scored]), 1e-3, 1.0 - 1e-3)
            log_odds[scored] = _logit(fraction) + self.log_ratio[scored]
        return log_odds


def cross_fitted_evidence(
    counts, background, dispersion, allowed, gene_fdr, n_folds, rng, controls: ControlCells
) -> TargetEvidence:
    """Evidence of response for one target's cells, each from held-out effects.

    No cell is scored where the other folds show no effect gene, nor in a target whose cells,
    all together, show none: the target has no detectable response. That target-level gate is
    one Benjamini-Hochberg test, which under the global null finds a gene with probability at
    most ``gene_fdr``; without it each fold's selection is another chance, and a null target
    gets called cells about ``n_folds`` times as often (negative controls of the Papalexi
    check, ``benchmarks/papalexi.py``).

    Each cell's likelihood ratio gets a p-value among the ``controls``' ratios under the same
    effect: the responder fraction is estimated from them (module docstring).
    """
    n_cells = counts.shape[0]
    folds = rng.permutation(n_cells) % max(2, min(n_folds, n_cells))
    responding_genes, _ = select_effect_genes(
        counts, background, dispersion, allowed, gene_fdr, controls.information
    )
    evidence = TargetEvidence(
        np.full(n_cells, np.nan), np.full(n_cells, np.nan), responding_genes.numpy()
    )
    if not responding_genes.any():
        return evidence
    for fold in np.unique(folds):
        held_out = folds == fold
        effect, overdispersion = fit_responder_effect(
            counts[~held_out],
            background[~held_out],
            dispersion,
            allowed,
            gene_fdr,
            controls.information,
        )
        if not effect.any():
            continue
        log_ratio = log_likelihood_ratio(
            counts[held_out], background[held_out], dispersion, effect, overdispersion
        ).numpy()
        control_ratio = np.sort(
            log_likelihood_ratio(
                controls.counts, controls.background, dispersion, effect, overdispersion
            ).numpy()
        )
        at_least_as_high = len(control_ratio) - np.searchsorted(
            control_ratio, log_ratio, side="left"
        )
        evidence.log_ratio[held_out] = log_ratio
        evidence.control_p_value[held_out] = (1 + at_least_as_high) / (1 + len(control_ratio))
    return evidence


def fraction_bounds(log_ratio, control_p_value, level) -> tuple[float, float]:
    """Bound the responder fraction of scored cells, allowing for weak evidence.

    When the effect is weak, the data barely tell "a few cells shifted a lot" from "many
    shifted a little", and no single estimate is unbiased; the two ends err in opposite
    directions, each outward:

    - The lower end is Storey's null fraction at its upper confidence limit (Clopper-Pearson
      on the count of p-values above ``lambda``). Responders whose evidence is weak land above
      ``lambda`` too and count as null, so this end is low.
    - The upper end is the profile-likelihood limit of the fraction in the two-branch mixture
      of the cells' likelihood ratios (the exact E-step of ``fit_responder_effect``, with the
      effect fixed). That likelihood rewards "everyone shifted a little", so this end is high.

    On the weak-effect simulated screen the point estimate alone (Storey's) fell short of the
    true fraction for every interval that missed (docs/benchmarks.md).
    """
    tail = (1.0 - level) / 2.0
    n_cells = len(control_p_value)
    above = int(np.sum(control_p_value > _NULL_FRACTION_LAMBDA))
    above_upper = stats.beta.ppf(1.0 - tail, above + 1, n_cells - above) if above < n_cells else 1.0
    low = max(0.0, 1.0 - above_upper / (1.0 - _NULL_FRACTION_LAMBDA))

    def log_likelihood(fraction):
        with np.errstate(divide="ignore"):
            return np.logaddexp(np.log1p(-fraction), np.log(fraction) + log_ratio).sum()

    # Concave in the fraction: one maximum, and the limit is the root beyond it.
    best = optimize.minimize_scalar(
        lambda f: -log_likelihood(f), bounds=(0.0, 1.0), method="bounded"
    ).x
    drop = stats.chi2.ppf(level, 1) / 2.0
    threshold = log_likelihood(best) - drop
    if log_likelihood(1.0) >= threshold:
        high = 1.0
    else:
        high = optimize.brentq(lambda f: log_likelihood(f) - threshold, best, 1.0)
    return low, max(low, high)


def control_offset(counts, background, dispersion) -> torch.Tensor:
    """Per-gene log correction ``o_g`` of the background, fitted on control cells."""
    return _unweighted_effects(counts, background, dispersion)


def _unweighted_effects(counts, background, dispersion) -> torch.Tensor:
    weights = torch.ones(counts.shape[0], dtype=counts.dtype)
    start = torch.zeros(counts.shape[1], dtype=counts.dtype)
    return fit_gene_effects(counts, background, dispersion, weights, start, _SCORING_STEPS)


def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))
