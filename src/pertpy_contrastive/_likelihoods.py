"""Count likelihoods: negative binomial and zero-inflated NB with a gene-wise dispersion.

Written here rather than taken from Pyro or scvi-tools because of speed. Both libraries broadcast
the gene-wise inverse dispersion theta to the full cell-by-gene shape before ``lgamma(theta)``, so
the forward pass evaluates ``lgamma`` and the backward pass ``digamma`` (the most expensive kernel
of a training step) on n_cells x n_genes values instead of n_genes. Pyro's logits parametrisation
also adds two ``logsigmoid`` passes. The formulas are scvi-tools' ``log_nb_positive`` /
``log_zinb_positive``; the sampler is the usual gamma-Poisson mixture.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions import constraints

Likelihood = Literal["zinb", "nb", "poisson"]
LIKELIHOODS = ("zinb", "nb", "poisson")

_EPS = 1e-8


class NegativeBinomial(dist.TorchDistribution):
    """Negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    Parameters
    ----------
    mu
        Mean, shape ``(..., n_genes)``.
    theta
        Inverse dispersion, shape ``(n_genes,)`` or broadcastable to ``mu``; kept unbroadcast so
        that ``lgamma(theta)`` is evaluated once per gene.
    """

    arg_constraints: ClassVar = {"mu": constraints.positive, "theta": constraints.positive}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, validate_args: bool = False):
        self.mu = mu
        self.theta = theta
        super().__init__(batch_shape=mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def _log_prob_terms(self, value: torch.Tensor):
        """Return ``theta * log(theta / (theta + mu))`` and the log-probability."""
        log_theta_mu = torch.log(self.theta + self.mu + _EPS)
        log_zero_term = self.theta * (torch.log(self.theta + _EPS) - log_theta_mu)
        log_prob = (
            log_zero_term
            + value * (torch.log(self.mu + _EPS) - log_theta_mu)
            + torch.lgamma(value + self.theta)
            - torch.lgamma(self.theta)
            - torch.lgamma(value + 1)
        )
        return log_zero_term, log_prob

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._log_prob_terms(value)[1]

    @torch.no_grad()
    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        theta = self.theta.expand(shape)
        rate = torch.distributions.Gamma(theta, theta / self.mu.expand(shape)).sample()
        return torch.poisson(rate)

    def expand(self, batch_shape, _instance=None):
        return type(self)(self.mu.expand(torch.Size(batch_shape)), self.theta)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """Negative binomial mixed with a point mass at zero of probability ``sigmoid(gate_logits)``."""

    arg_constraints: ClassVar = {
        "mu": constraints.positive,
        "theta": constraints.positive,
        "gate_logits": constraints.real,
    }

    def __init__(self, mu, theta, gate_logits, validate_args: bool = False):
        self.gate_logits = gate_logits
        super().__init__(mu, theta, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(-self.gate_logits) * self.mu

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        log_zero_term, nb_log_prob = self._log_prob_terms(value)
        log_gate = -F.softplus(-self.gate_logits)
        # log(gate + (1 - gate) NB(0)) = log(gate) + log(1 + exp(log NB(0) - gate_logits)), and
        # log(1 - gate) = log(gate) - gate_logits: two softplus passes instead of three.
        zero = log_gate + F.softplus(log_zero_term - self.gate_logits)
        return torch.where(value == 0, zero, log_gate - self.gate_logits + nb_log_prob)

    @torch.no_grad()
    def sample(self, sample_shape=()) -> torch.Tensor:
        counts = super().sample(sample_shape)
        gate = torch.sigmoid(self.gate_logits).expand(counts.shape)
        return torch.where(torch.bernoulli(gate).bool(), torch.zeros_like(counts), counts)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return type(self)(
            self.mu.expand(batch_shape), self.theta, self.gate_logits.expand(batch_shape)
        )


def count_distribution(
    likelihood: Likelihood, mean: torch.Tensor, theta: torch.Tensor, gate_logits: torch.Tensor
) -> dist.TorchDistribution:
    """Per cell and gene count distribution with the given mean.

    Counts were validated at setup, so per-step support checks are left off.
    """
    if likelihood == "poisson":
        return dist.Poisson(mean, validate_args=False)
    if likelihood == "nb":
        return NegativeBinomial(mean, theta)
    return ZeroInflatedNegativeBinomial(mean, theta, gate_logits)
