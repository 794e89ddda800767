"""The responder mixture on the model's background (``_responder_mixture.py``), on planted data."""

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pertpy_contrastive import _responder_mixture as mixture

N_CELLS, N_GENES, N_EFFECT_GENES = 600, 300, 12


def _planted(effect_size: float, seed: int = 0):
    """NB counts around a known background; 60% of cells shift the first genes by the effect."""
    generator = torch.Generator().manual_seed(seed)
    proportions = torch.distributions.Dirichlet(torch.full((N_GENES,), 2.0)).sample()
    background = 3000.0 * proportions.double().expand(N_CELLS, N_GENES)
    dispersion = torch.full((N_GENES,), 5.0, dtype=torch.float64)
    responded = torch.rand(N_CELLS, generator=generator) < 0.6
    effect = torch.zeros(N_GENES, dtype=torch.float64)
    effect[:N_EFFECT_GENES] = effect_size
    mean = background * torch.where(responded[:, None], effect.exp(), 1.0)
    rate = torch.distributions.Gamma(dispersion, dispersion / mean).sample()
    counts = torch.poisson(rate, generator=generator)
    return counts, background, dispersion, responded


def test_log_likelihood_ratio_is_the_difference_of_the_branches():
    counts, background, dispersion, _ = _planted(0.8)
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
    # The huge dispersion used for a Poisson likelihood gives the Poisson ratio.
    poisson = torch.full_like(dispersion, mixture.POISSON_DISPERSION)
    expected = (
        torch.distributions.Poisson(background * effect.exp()).log_prob(counts)
        - torch.distributions.Poisson(background).log_prob(counts)
    ).sum(-1)
    torch.testing.assert_close(
        mixture.log_likelihood_ratio(counts, background, poisson, effect), expected
    )


def test_responder_fraction_is_the_mixture_maximum():
    """The fraction maximises the mixture likelihood, with y summed out in probability space."""
    counts, background, dispersion, _ = _planted(0.8)
    effect = torch.zeros(N_GENES, dtype=torch.float64)
    effect[:N_EFFECT_GENES] = 0.8
    log_ratio = mixture.log_likelihood_ratio(counts, background, dispersion, effect)
    fraction = mixture.responder_fraction(log_ratio)

    def mixture_log_likelihood(pi):  # log of pi p1 + (1 - pi) p0, relative to p0
        return torch.log(pi * log_ratio.exp() + (1.0 - pi)).sum()

    best = mixture_log_likelihood(torch.tensor(fraction, dtype=torch.float64))
    for nearby in (fraction - 0.02, fraction + 0.02):
        assert mixture_log_likelihood(torch.tensor(nearby, dtype=torch.float64)) < best


def test_planted_effect_is_found_and_its_responders_called():
    counts, background, dispersion, responded = _planted(0.8)
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
    log_odds = mixture.cross_fitted_log_odds(
        counts, background, dispersion, allowed, 0.05, 5, np.random.default_rng(0)
    )
    probability = torch.sigmoid(log_odds).numpy()
    assert roc_auc_score(responded.numpy(), probability) > 0.95
    assert abs(probability.mean() - responded.double().mean().item()) < 0.05


def test_no_effect_means_no_responders():
    """A null target: no gene passes, so the responder branch is the escaper branch; P = 0."""
    for seed in range(3):
        counts, background, dispersion, _ = _planted(0.0, seed=seed)
        allowed = torch.ones(N_GENES, dtype=torch.bool)
        log_odds = mixture.cross_fitted_log_odds(
            counts, background, dispersion, allowed, 0.05, 5, np.random.default_rng(seed)
        )
        assert (torch.sigmoid(log_odds) < 0.5).float().mean() > 0.95


def test_disallowed_genes_never_enter_the_effect():
    counts, background, dispersion, _ = _planted(0.8)
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
        counts, background, dispersion, _ = _planted(0.0, seed=seed)
        log_odds = mixture.cross_fitted_log_odds(
            counts, background, dispersion, allowed, 0.05, 5, np.random.default_rng(seed)
        )
        with_calls += bool((log_odds > -torch.inf).any())
    # Binomial(60, 0.05): 8 or more has probability below 0.01.
    assert with_calls <= 7
