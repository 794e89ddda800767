"""The responder mixture on the model's background (``_responder_mixture.py``), on planted data."""

import numpy as np
import torch
from scipy import special
from sklearn.metrics import roc_auc_score

from pertpy_contrastive import _responder_mixture as mixture

N_CELLS, N_GENES, N_EFFECT_GENES = 600, 300, 12


def _planted(effect_size: float, seed: int = 0, n_controls: int = 1000):
    """NB counts around a known background; 60% of cells shift the first genes by the effect.

    Returns the target's counts, background, dispersion and true responders, and controls.
    """
    # torch.distributions sample from the global generator: seed it, and restore it after.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        proportions = torch.distributions.Dirichlet(torch.full((N_GENES,), 2.0)).sample()
        background = 3000.0 * proportions.double().expand(N_CELLS, N_GENES)
        dispersion = torch.full((N_GENES,), 5.0, dtype=torch.float64)
        responded = torch.rand(N_CELLS) < 0.6
        effect = torch.zeros(N_GENES, dtype=torch.float64)
        effect[:N_EFFECT_GENES] = effect_size
        mean = background * torch.where(responded[:, None], effect.exp(), 1.0)
        counts = torch.poisson(torch.distributions.Gamma(dispersion, dispersion / mean).sample())
        control_background = background[:1].expand(n_controls, N_GENES)
        control_rate = torch.distributions.Gamma(dispersion, dispersion / control_background)
        controls = mixture.control_cells(
            torch.poisson(control_rate.sample()), control_background, dispersion
        )
    return counts, background, dispersion, responded, controls


def test_log_likelihood_ratio_is_the_difference_of_the_branches():
    counts, background, dispersion, _, _ = _planted(0.8)
    effect = torch.linspace(-1.0, 1.0, N_GENES, dtype=torch.float64)

    def log_likelihood(mean, total_count):
        nb = torch.distributions.NegativeBinomial(
            total_count, logits=mean.log() - total_count.log()
        )
        return nb.log_prob(counts).sum(-1)

    expected = log_likelihood(background * effect.exp(), dispersion) - log_likelihood(
        background, dispersion
    )
    actual = mixture.log_likelihood_ratio(counts, background, dispersion, effect)
    torch.testing.assert_close(actual, expected)
    # Genes without an effect add nothing; they are skipped.
    sparse_effect = effect * (torch.arange(N_GENES) % 3 == 0)
    expected = log_likelihood(background * sparse_effect.exp(), dispersion) - log_likelihood(
        background, dispersion
    )
    torch.testing.assert_close(
        mixture.log_likelihood_ratio(counts, background, dispersion, sparse_effect), expected
    )
    # The huge dispersion used for a Poisson likelihood gives the Poisson ratio.
    poisson = torch.full_like(dispersion, mixture.POISSON_DISPERSION)
    expected = (
        torch.distributions.Poisson(background * effect.exp()).log_prob(counts)
        - torch.distributions.Poisson(background).log_prob(counts)
    ).sum(-1)
    torch.testing.assert_close(
        mixture.log_likelihood_ratio(counts, background, poisson, effect), expected
    )


def test_null_fraction_is_storeys_estimate():
    rng = np.random.default_rng(0)
    assert abs(mixture.null_fraction(rng.uniform(size=20_000)) - 1.0) < 0.03
    mixed = np.concatenate([rng.uniform(0, 1e-3, 8_000), rng.uniform(size=12_000)])
    assert abs(mixture.null_fraction(mixed) - 0.6) < 0.03


def test_weak_effects_do_not_inflate_the_responder_fraction():
    """With a weak effect, the mixture's own maximum-likelihood fraction came out at 0.74-0.81 for
    a true 0.6 (every cell shifted a little fits almost as well); against the controls it holds.
    """
    for seed in range(3):
        counts, background, dispersion, responded, controls = _planted(0.3, seed=seed)
        allowed = torch.ones(N_GENES, dtype=torch.bool)
        log_odds = mixture.cross_fitted_evidence(
            counts, background, dispersion, allowed, 0.05, 5, np.random.default_rng(seed), controls
        ).log_odds
        probability = special.expit(log_odds)
        assert abs(probability.mean() - responded.double().mean().item()) < 0.08
        assert roc_auc_score(responded.numpy(), probability) > 0.8


def test_fraction_interval_covers_the_true_fraction_when_evidence_is_weak():
    """At a log fold change of 0.2, Storey's estimate alone falls short of the true 0.6; the
    interval's ends err outward, so it covers. With a strong effect the interval stays narrow."""
    allowed = torch.ones(N_GENES, dtype=torch.bool)
    for effect_size, widest in ((0.2, 1.0), (0.8, 0.2)):
        for seed in range(3):
            counts, background, dispersion, responded, controls = _planted(effect_size, seed=seed)
            evidence = mixture.cross_fitted_evidence(
                counts,
                background,
                dispersion,
                allowed,
                0.05,
                5,
                np.random.default_rng(seed),
                controls,
            )
            low, high = mixture.fraction_bounds(evidence.log_ratio, evidence.control_p_value, 0.95)
            assert low <= responded.double().mean().item() <= high
            assert high - low < widest


def test_planted_effect_is_found_and_its_responders_called():
    counts, background, dispersion, responded, controls = _planted(0.8)
    allowed = torch.ones(N_GENES, dtype=torch.bool)
    effect, _ = mixture.fit_responder_effect(counts, background, dispersion, allowed, 0.05)
    selected = effect != 0
    assert selected[:N_EFFECT_GENES].all() and selected[N_EFFECT_GENES:].sum() <= 2
    torch.testing.assert_close(
        effect[:N_EFFECT_GENES],
        torch.full((N_EFFECT_GENES,), 0.8, dtype=torch.float64),
        atol=0.15,
        rtol=0,
    )
    log_odds = mixture.cross_fitted_evidence(
        counts, background, dispersion, allowed, 0.05, 5, np.random.default_rng(0), controls
    ).log_odds
    probability = special.expit(log_odds)
    assert roc_auc_score(responded.numpy(), probability) > 0.95
    assert abs(probability.mean() - responded.double().mean().item()) < 0.05


def test_no_effect_means_no_responders():
    """A null target: no gene passes, so the responder branch is the escaper branch; P = 0."""
    for seed in range(3):
        counts, background, dispersion, _, controls = _planted(0.0, seed=seed)
        allowed = torch.ones(N_GENES, dtype=torch.bool)
        log_odds = mixture.cross_fitted_evidence(
            counts, background, dispersion, allowed, 0.05, 5, np.random.default_rng(seed), controls
        ).log_odds
        assert np.mean(special.expit(log_odds) < 0.5) > 0.95


def test_disallowed_genes_never_enter_the_effect():
    counts, background, dispersion, _, _ = _planted(0.8)
    allowed = torch.ones(N_GENES, dtype=torch.bool)
    allowed[:N_EFFECT_GENES] = False
    effect, _ = mixture.fit_responder_effect(counts, background, dispersion, allowed, 0.05)
    assert (effect[:N_EFFECT_GENES] == 0).all()


def test_null_targets_get_called_cells_at_most_at_the_gene_fdr():
    """The target-level gate: under the global null, any cell is called in at most ~gene_fdr
    of the targets, not once per fold's chance of a spurious gene."""
    allowed = torch.ones(N_GENES, dtype=torch.bool)
    n_targets, with_calls = 60, 0
    for seed in range(n_targets):
        counts, background, dispersion, _, controls = _planted(0.0, seed=seed, n_controls=200)
        log_odds = mixture.cross_fitted_evidence(
            counts, background, dispersion, allowed, 0.05, 5, np.random.default_rng(seed), controls
        ).log_odds
        with_calls += bool(np.isfinite(log_odds).any())
    # Binomial(60, 0.05): 8 or more has probability below 0.01.
    assert with_calls <= 7
