"""Count likelihoods: negative binomial and zero-inflated NB with a gene-wise dispersion.

Written here rather than taken from Pyro or scvi-tools because of speed. Both libraries broadcast
the gene-wise inverse dispersion theta to the full cell-by-gene shape before ``lgamma(theta)``, so
the forward pass evaluates ``lgamma`` and the backward pass ``digamma`` (the most expensive kernel
of a training step) on n_cells x n_genes values instead of n_genes. Pyro's logits parametrisation
also adds two ``logsigmoid`` passes. And both evaluate ``lgamma(x + theta)`` at every count,
although for a zero it cancels against ``lgamma(theta)``: ``log NB(0) = theta log(theta / (theta +
mu))``. Here the ``lgamma`` terms are tabulated per gene and gathered at each count (see
``_TabulatedCountTerms``), and summed per cell, so a distribution's event is one cell's
genes and ``log_prob`` returns one value per cell. The formulas are scvi-tools'
``log_nb_positive`` / ``log_zinb_positive``; the sampler is the usual gamma-Poisson mixture.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions import constraints

Likelihood = Literal["zinb", "nb", "poisson"]
LIKELIHOODS = ("zinb", "nb", "poisson")

_EPS = 1e-8
_TABULATED_GENES = 0.95  # share of genes whose counts the lgamma table covers


class NegativeBinomial(dist.TorchDistribution):
    """Negative binomial counts of a cell's genes, with mean ``mu`` and inverse dispersion ``theta``.

    The event is the last axis (the genes): ``log_prob`` sums over it.

    Parameters
    ----------
    mu
        Mean, shape ``(..., n_genes)``.
    theta
        Inverse dispersion, shape ``(n_genes,)`` or broadcastable to ``mu``; kept unbroadcast so
        that ``lgamma(theta)`` is evaluated once per gene.
    """

    arg_constraints: ClassVar = {"mu": constraints.positive, "theta": constraints.positive}
    support = constraints.independent(constraints.nonnegative_integer, 1)
    has_rsample = False

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, validate_args: bool = False):
        self.mu = mu
        self.theta = theta
        super().__init__(
            batch_shape=mu.shape[:-1], event_shape=mu.shape[-1:], validate_args=validate_args
        )

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def _count_terms(self, value: torch.Tensor) -> torch.Tensor:
        """Per cell, the sum over genes of ``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``.

        Tabulated per gene (``_TabulatedCountTerms``) up to a cap, the largest count of most
        genes (``_TABULATED_GENES``). The few counts above it are evaluated directly, one by one
        rather than as whole columns: even a heavy gene has most of its counts below the cap.
        """
        n_genes = value.shape[-1]
        counts = value.reshape(-1, n_genes)
        if self.theta.dim() > 1 or counts.numel() == 0:
            # A cell-by-gene theta cannot be tabulated per gene.
            theta = self.theta.expand(value.shape).reshape(-1, n_genes)
            return _direct_count_terms(counts, theta).sum(-1).reshape(value.shape[:-1])
        theta = self.theta.expand(n_genes)
        gene_max = counts.amax(0)
        rank = max(1, math.ceil(_TABULATED_GENES * n_genes))
        cap = max(1, int(gene_max.kthvalue(rank).values))
        per_cell = _TabulatedCountTerms.apply(counts.long().clamp_(max=cap), theta, cap)
        (heavy,) = (gene_max > cap).nonzero(as_tuple=True)
        if len(heavy):
            # Above the cap: the direct terms, less the capped entry the table gave.
            heavy_counts = counts.index_select(1, heavy)
            over = heavy_counts > cap
            rows, columns = over.nonzero(as_tuple=True)
            excess_counts = heavy_counts[rows, columns]
            heavy_theta = theta[heavy][columns]
            direct = _direct_count_terms(excess_counts, heavy_theta)
            capped = _direct_count_terms(excess_counts.new_full((), cap), heavy_theta)
            per_cell = per_cell.index_add(0, rows, direct - capped)
        return per_cell.reshape(value.shape[:-1])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        dense = _DenseLogLikelihood.apply(value, self.mu, self.theta, None)
        return dense + self._count_terms(value)

    @torch.no_grad()
    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        theta = self.theta.expand(shape)
        rate = torch.distributions.Gamma(theta, theta / self.mu.expand(shape)).sample()
        return torch.poisson(rate)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return type(self)(self.mu.expand(shape), self.theta)


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
        dense = _DenseLogLikelihood.apply(value, self.mu, self.theta, self.gate_logits)
        return dense + self._count_terms(value)

    @torch.no_grad()
    def sample(self, sample_shape=()) -> torch.Tensor:
        counts = super().sample(sample_shape)
        gate = torch.sigmoid(self.gate_logits).expand(counts.shape)
        return torch.where(torch.bernoulli(gate).bool(), torch.zeros_like(counts), counts)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return type(self)(self.mu.expand(shape), self.theta, self.gate_logits.expand(shape))


class _TabulatedCountTerms(torch.autograd.Function):
    """Per cell, ``sum_g lgamma(x + theta_g) - lgamma(theta_g) - lgamma(x + 1)`` for x <= ``cap``.

    Counts are integers, and ``lgamma(k + theta) - lgamma(theta)`` is the sum of ``log(theta + j)``
    for j < k. So the term is tabulated per gene for k = 0 .. ``cap`` as a cumulative sum of logs,
    and gathered at each count: no ``lgamma`` on the counts. Its derivative in theta, the sum of
    ``1 / (theta + j)``, is tabulated the same way and gathered in the backward pass, so no
    ``digamma`` (on a CPU the most expensive kernel of a training step) either. Autograd of the
    gather would scatter-add into the table instead, a slower pass over the cells x genes values.
    Row 0 of both tables is 0, so a zero count costs one gather.
    """

    @staticmethod
    def forward(ctx, count_index, theta, cap):
        rising = torch.arange(cap, dtype=theta.dtype, device=theta.device).unsqueeze(-1) + theta
        ctx.save_for_backward(count_index, rising)
        ranks = torch.arange(cap + 1, dtype=theta.dtype, device=theta.device).unsqueeze(-1)
        table = _cumulative_table(torch.log(rising)) - torch.lgamma(ranks + 1)
        return table.gather(0, count_index).sum(-1)

    @staticmethod
    def backward(ctx, grad_cells):
        count_index, rising = ctx.saved_tensors
        derivative = _cumulative_table(rising.reciprocal()).gather(0, count_index)
        return None, grad_cells @ derivative, None


def _cumulative_table(terms: torch.Tensor) -> torch.Tensor:
    """Row k holds the sum of the first k rows of ``terms``; row 0 is 0.

    Summed in double precision: a row adds up to ``cap`` terms.
    """
    cumulative = terms.cumsum(0, dtype=torch.float64).to(terms.dtype)
    return torch.cat([cumulative.new_zeros(1, terms.shape[-1]), cumulative])


def _direct_count_terms(counts: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(counts + theta) - torch.lgamma(theta) - torch.lgamma(counts + 1)


class _DenseLogLikelihood(torch.autograd.Function):
    """Per cell, the (ZI)NB log-likelihood summed over genes, without the ``lgamma`` terms.

    With ``A = log(theta + mu)``, ``log NB(0) = theta (log theta - A)`` and the count term
    ``x (log mu - A)``. With a gate, ``gate_over_nb = gate_logits - log NB(0)``, and per gene

        log p = x (log mu - A) + log NB(0) - softplus(gate_logits) + [x = 0] softplus(gate_over_nb),

    which is ``log(gate + (1 - gate) NB(0))`` at a zero and ``log(1 - gate) + log NB(x)`` (less
    the ``lgamma`` terms) elsewhere. The gradients are written out in closed form: autograd of
    the same expression makes about three times as many passes over the cells x genes values,
    and on a CPU those passes, not the arithmetic, are the cost of a training step. The
    ``lgamma`` terms have their own function (``_TabulatedCountTerms``).
    """

    @staticmethod
    def forward(ctx, counts, mu, theta, gate_logits):
        # In-place where a temporary is not needed again: every fresh cells x genes tensor is a
        # fresh allocation, whose page faults cost a CPU step as much as the arithmetic.
        log_theta_mu = (theta + mu).add_(_EPS).log_()
        log_zero_term = torch.sub(torch.log(theta + _EPS), log_theta_mu).mul_(theta)
        log_prob = (mu + _EPS).log_().sub_(log_theta_mu).mul_(counts).add_(log_zero_term)
        if gate_logits is None:
            ctx.save_for_backward(counts, mu, theta, log_theta_mu)
            return log_prob.sum(-1)
        gate_over_nb = log_zero_term.neg_().add_(gate_logits)
        # 1 at a zero count, else 0 (counts are non-negative integers); a comparison would make
        # a bool tensor, whose kernels are slower here than two arithmetic passes.
        is_zero = counts.clamp(max=1.0).sub_(1.0).neg_()
        log_prob.sub_(F.softplus(gate_logits))
        log_prob.add_(F.softplus(gate_over_nb).mul_(is_zero))
        ctx.save_for_backward(counts, mu, theta, log_theta_mu, gate_logits, gate_over_nb, is_zero)
        return log_prob.sum(-1)

    @staticmethod
    def backward(ctx, grad_output):
        counts, mu, theta, log_theta_mu, *gate = ctx.saved_tensors
        grad = grad_output.unsqueeze(-1)
        # The share of log NB(0) in d log p: 1 at a nonzero count; at a zero, the posterior
        # probability that the zero came from the NB rather than from the gate, 1 - gate_share.
        if gate:
            gate_logits, gate_over_nb, is_zero = gate
            gate_share = torch.sigmoid(gate_over_nb).mul_(is_zero)
            # (x + theta (1 - gate_share)) / (theta + mu): the mean's pull on the denominator.
            pulled_by_mean = torch.mul(gate_share, -theta).add_(theta).add_(counts)
        else:
            pulled_by_mean = counts + theta
        pulled_by_mean.div_((theta + mu).add_(_EPS))
        grad_mu = grad_theta = grad_gate = None
        if ctx.needs_input_grad[1]:
            grad_mu = (mu + _EPS).reciprocal_().mul_(counts).sub_(pulled_by_mean).mul_(grad)
        if ctx.needs_input_grad[2]:
            log_ratio = torch.sub(torch.log(theta + _EPS) + theta / (theta + _EPS), log_theta_mu)
            if gate:
                log_ratio.addcmul_(log_ratio, gate_share, value=-1.0)
            grad_theta = log_ratio.sub_(pulled_by_mean).mul_(grad)
            grad_theta = grad_theta.sum_to_size(theta.shape)
        if gate and ctx.needs_input_grad[3]:
            grad_gate = torch.sigmoid(gate_logits).sub_(gate_share).mul_(-grad)
        return None, grad_mu, grad_theta, grad_gate


def count_distribution(
    likelihood: Likelihood, mean: torch.Tensor, theta: torch.Tensor, gate_logits: torch.Tensor
) -> dist.TorchDistribution:
    """Distribution of each cell's counts (event: the genes) with the given per-gene mean.

    Counts were validated at setup, so per-step support checks are left off.
    """
    if likelihood == "poisson":
        return dist.Poisson(mean, validate_args=False).to_event(1)
    if likelihood == "nb":
        return NegativeBinomial(mean, theta)
    return ZeroInflatedNegativeBinomial(mean, theta, gate_logits)


def log_prob_up_to_count_terms(
    likelihood: Likelihood,
    mean: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """Per cell, ``count_distribution(...).log_prob(counts)`` less the terms free of the mean.

    Those terms (``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``) depend on the counts and
    theta alone, so with theta held fixed they send no gradient; a term that is only trained
    through the mean and the gate skips them.
    """
    if likelihood == "poisson":
        return (torch.xlogy(counts, mean) - mean).sum(-1)
    gate_logits = gate_logits if likelihood == "zinb" else None
    return _DenseLogLikelihood.apply(counts, mean, theta, gate_logits)
