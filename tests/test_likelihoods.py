"""The zero-aware count likelihoods equal scvi-tools' dense formulas, values and gradients."""

import pytest
import torch
from _helpers import setup
from pyro import poutine
from scvi.distributions._negative_binomial import log_nb_positive, log_zinb_positive

import pertpy_contrastive as pc
from pertpy_contrastive._constants import CellGroup
from pertpy_contrastive._likelihoods import (
    NegativeBinomial,
    ZeroInflatedNegativeBinomial,
    count_distribution,
    log_prob_up_to_count_terms,
)


def _inputs(shape, per_gene_theta=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mu = torch.rand(shape, generator=generator, dtype=torch.float64) * 5 + 0.01
    theta_shape = shape[-1:] if per_gene_theta else shape
    theta = torch.rand(theta_shape, generator=generator, dtype=torch.float64) * 3 + 0.05
    gate_logits = torch.randn(shape, generator=generator, dtype=torch.float64)
    # About 60% zeros, and one gene whose counts in every other cell lie above the lgamma
    # table's cap, so that they take the direct path while its other counts are tabulated.
    counts = torch.poisson(mu * torch.rand(shape, generator=generator, dtype=torch.float64))
    counts[..., ::2, 0] = 40.0
    for tensor in (mu, theta, gate_logits):
        tensor.requires_grad_(True)
    return counts, mu, theta, gate_logits


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
@pytest.mark.parametrize(
    ("shape", "per_gene_theta"),
    [((64, 30), True), ((64, 30), False), ((2, 16, 30), True), ((4, 30), True)],
)
def test_zero_aware_log_prob_equals_dense_formula(likelihood, shape, per_gene_theta):
    counts, mu, theta, gate_logits = _inputs(shape, per_gene_theta)
    assert (counts == 0).float().mean() > 0.3
    if likelihood == "nb":
        ours = NegativeBinomial(mu, theta).log_prob(counts)
        reference = log_nb_positive(counts, mu, theta.expand(shape)).sum(-1)
    else:
        ours = ZeroInflatedNegativeBinomial(mu, theta, gate_logits).log_prob(counts)
        reference = log_zinb_positive(counts, mu, theta.expand(shape), gate_logits).sum(-1)
    assert ours.shape == shape[:-1]
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-9)
    parameters = (mu, theta, gate_logits) if likelihood == "zinb" else (mu, theta)
    ours_grad = torch.autograd.grad(ours.sum(), parameters)
    reference_grad = torch.autograd.grad(reference.sum(), parameters)
    for ours_part, reference_part in zip(ours_grad, reference_grad, strict=True):
        torch.testing.assert_close(ours_part, reference_part, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("likelihood", ["poisson", "nb", "zinb"])
def test_log_prob_up_to_count_terms_differs_by_a_term_free_of_the_mean(likelihood):
    counts, mu, theta, gate_logits = _inputs((64, 30))

    def both(mean, gate):
        full = count_distribution(likelihood, mean, theta, gate).log_prob(counts)
        return full, log_prob_up_to_count_terms(likelihood, mean, theta, gate, counts)

    full, partial = both(mu, gate_logits)
    other_full, other_partial = both(mu.detach() * 2.5 + 0.3, gate_logits.detach() - 1.0)
    # The dropped terms are the same whatever the mean and the gate ...
    torch.testing.assert_close(full - partial, other_full - other_partial)
    assert not torch.allclose(full, other_full)
    # ... so the gradients in the mean and the gate are the full likelihood's.
    parameters = (mu, gate_logits) if likelihood == "zinb" else (mu,)
    expected = torch.autograd.grad(full.sum(), parameters)
    for ours, reference in zip(
        torch.autograd.grad(partial.sum(), parameters), expected, strict=True
    ):
        torch.testing.assert_close(ours, reference)


def test_all_zero_and_float32_counts():
    counts, mu, theta, _ = _inputs((8, 5))
    zeros = torch.zeros_like(counts)
    expected = (theta * (torch.log(theta + 1e-8) - torch.log(theta + mu + 1e-8))).sum(-1)
    torch.testing.assert_close(NegativeBinomial(mu, theta).log_prob(zeros), expected)
    single = NegativeBinomial(mu.float(), theta.float()).log_prob(counts.float())
    assert single.dtype == torch.float32
    torch.testing.assert_close(
        single.double(), NegativeBinomial(mu, theta).log_prob(counts), rtol=1e-5, atol=1e-4
    )


def test_event_is_one_cell_and_samples_have_the_mean():
    mu = torch.full((4000, 3), 2.0)
    theta = torch.tensor([0.5, 2.0, 20.0])
    for distribution in (
        count_distribution("nb", mu, theta, torch.zeros_like(mu)),
        count_distribution("zinb", mu, theta, torch.full_like(mu, -2.0)),
        count_distribution("poisson", mu, theta, torch.zeros_like(mu)),
    ):
        assert distribution.batch_shape == (4000,)
        assert distribution.event_shape == (3,)
        samples = distribution.sample()
        assert samples.shape == (4000, 3)
        torch.testing.assert_close(samples.mean(0), distribution.mean.mean(0), rtol=0.1, atol=0.0)
        assert distribution.expand((2, 4000)).log_prob(samples).shape == (2, 4000)


def test_model_counts_site_equals_dense_formula(screen):
    """The module's count site, through Pyro, is scvi-tools' ZINB summed over each cell's genes."""
    setup(screen, batch_key="batch")
    model = pc.ContrastiveVAE(screen, n_hidden=16)
    module = model.module.double().eval()
    tensors = next(iter(model._make_data_loader(adata=screen, batch_size=256)))
    tensors = {key: value.double() for key, value in tensors.items()}
    args, kwargs = module._get_fn_args_from_batch(tensors)
    guide_trace = poutine.trace(module.guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    model_trace.compute_log_prob()
    site = model_trace.nodes["counts"]
    z = guide_trace.nodes["background"]["value"]
    # Target cells and contrast controls are decoded with s, background controls at s = 0.
    decoded_with_salient = torch.isin(
        args.group, torch.tensor([CellGroup.TARGET, CellGroup.CONTRAST])
    )
    assert decoded_with_salient.any() and (args.group == CellGroup.CONTRAST).any()
    s = guide_trace.nodes["salient"]["value"] * decoded_with_salient.unsqueeze(-1)
    rate, gate_logits = module._decode(
        z, s, args.cont_covs, args.x.sum(-1, keepdim=True).log(), (args.batch_index,)
    )
    theta = module.log_inverse_dispersion.exp().expand(rate.shape)
    reference = log_zinb_positive(args.x, rate, theta, gate_logits).sum(-1)
    torch.testing.assert_close(site["log_prob"], reference, rtol=1e-10, atol=1e-8)
