"""The generative model, its amortised guide and the training objective, in Pyro.

Generative model, for cell n with covariates c_n (batch, categorical, continuous):

    z_n ~ Normal(0, I)                  background latent, every cell
    s_n ~ Normal(0, I)                  salient latent, every cell
    u_n = 0 for a background control, 1 for every other cell (targets and contrast controls)
    l_n = total counts of n (observed), or l_n ~ LogNormal(mu_batch, sigma_batch)
    rho_n = softmax(f(z_n, u_n s_n, c_n))   decoder: per-gene proportions
    x_ng ~ ZINB / NB / Poisson(mean = l_n * rho_ng, gene-wise inverse dispersion theta_g)

Background controls are decoded without s, so z must explain all the variation that controls
show, and what only perturbed cells show is left to s. Contrast controls (half the controls,
``CellGroup.CONTRAST``) are decoded with s, exactly as perturbed cells are: whatever training
does to a perturbed cell's s, it does to theirs. A target without an effect and the contrast
controls are then two samples of one population, in training as in the outputs, and a
permutation test between them is exact on every cell (docs/model.md, "What may be tested").

Guide: q(z_n | x_n, c_n) q(s_n | x_n, c_n) [q(l_n | x_n, c_n)], encoders on log1p of the counts
scaled to the data's median depth. The encoders do not see the perturbation label, so a cell's
salient latent reflects its expression, not its guide.

Objective (``loss_terms``): the negative ELBO, reported as its reconstruction and KL parts, and
one penalty. Guides are assigned at random, so the background states of perturbed cells follow
the controls' distribution: the squared MMD between the background latents of background
controls and of the cells decoded with s keeps perturbation effects out of z.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from scvi import REGISTRY_KEYS
from scvi.module.base import PyroBaseModuleClass, auto_move_data
from scvi.nn import DecoderSCVI, Encoder
from torch import nn

from ._constants import (
    BACKGROUND_MMD_WEIGHT,
    CELL_WEIGHT_KEY,
    GROUP_KEY,
    CellGroup,
)
from ._data import InvalidValueError
from ._likelihoods import LIKELIHOODS, Likelihood, count_distribution

_MMD_KERNEL_WIDTHS = (0.25, 1.0, 4.0)  # squared widths per latent dimension
_LATENT_SITES = ("background", "salient", "log_library")


class ModelInputs(NamedTuple):
    """Positional arguments of the model and the guide, read from one minibatch."""

    x: torch.Tensor
    group: torch.Tensor
    batch_index: torch.Tensor
    cat_covs: torch.Tensor
    cont_covs: torch.Tensor

    @property
    def encoder_inputs(self) -> tuple[torch.Tensor, ...]:
        """The arguments of :meth:`ContrastivePyroModule.encode`: all but the group."""
        return self.x, self.batch_index, self.cat_covs, self.cont_covs


def decoded_with_salient(group: torch.Tensor) -> torch.Tensor:
    """Whether each cell is decoded with its salient latent: targets and contrast controls."""
    return (group == CellGroup.TARGET) | (group == CellGroup.CONTRAST)


class ContrastivePyroModule(PyroBaseModuleClass):
    """Pyro model and guide of :class:`~pertpy_contrastive.ContrastiveVAE`.

    Parameters
    ----------
    n_genes
        Number of genes.
    n_background
        Dimension of the background latent z.
    n_salient
        Dimension of the salient latent s.
    n_batch
        Number of batches (1 when no batch key is registered).
    n_cats_per_cov
        Number of categories of each extra categorical covariate.
    n_continuous_cov
        Number of continuous covariates.
    n_hidden
        Width of the hidden layers of encoders and decoder.
    n_layers
        Number of hidden layers of encoders and decoder.
    dropout_rate
        Dropout in the encoders.
    likelihood
        Count likelihood: ``"zinb"``, ``"nb"`` or ``"poisson"``.
    use_observed_library
        Use each cell's total count as its library size; otherwise the library size is latent,
        with a per-batch log-normal prior.
    library_log_means, library_log_vars
        Per-batch prior mean and variance of the log library size (latent library only).
    background_mmd_weight
        Weight of the per-step squared MMD between the background latents of the background
        controls and of the cells decoded with s (0 turns it off).
    encoder_library_size
        Total that each cell's counts are scaled to before the encoders' ``log1p``; the model
        passes the median total count of its data (see ``encode``).
    """

    def __init__(
        self,
        n_genes: int,
        n_background: int = 10,
        n_salient: int = 10,
        n_batch: int = 1,
        n_cats_per_cov: tuple[int, ...] = (),
        n_continuous_cov: int = 0,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        likelihood: Likelihood = "zinb",
        use_observed_library: bool = True,
        library_log_means: torch.Tensor | None = None,
        library_log_vars: torch.Tensor | None = None,
        background_mmd_weight: float = BACKGROUND_MMD_WEIGHT,
        encoder_library_size: float = 1e4,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise InvalidValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
        self.n_background = n_background
        self.n_salient = n_salient
        self.likelihood = likelihood
        self.use_observed_library = use_observed_library
        self.background_mmd_weight = background_mmd_weight
        # A buffer, so that a saved model keeps the value it was trained with.
        self.register_buffer("encoder_library_size", torch.tensor(float(encoder_library_size)))

        covariate_sizes = [n_batch, *n_cats_per_cov]
        network = {
            "n_cat_list": covariate_sizes,
            "n_layers": n_layers,
            "n_hidden": n_hidden,
            "inject_covariates": True,
            "use_batch_norm": True,
            "use_layer_norm": False,
        }
        n_encoder_input = n_genes + n_continuous_cov
        self.background_encoder = Encoder(
            n_encoder_input, n_background, dropout_rate=dropout_rate, **network
        )
        self.salient_encoder = Encoder(
            n_encoder_input, n_salient, dropout_rate=dropout_rate, **network
        )
        if not use_observed_library:
            if library_log_means is None or library_log_vars is None:
                raise InvalidValueError("A latent library size needs library_log_means and _vars.")
            self.register_buffer("library_log_means", torch.as_tensor(library_log_means).float())
            self.register_buffer("library_log_vars", torch.as_tensor(library_log_vars).float())
            self.library_encoder = Encoder(n_encoder_input, 1, dropout_rate=dropout_rate, **network)
        self.decoder = DecoderSCVI(n_background + n_salient + n_continuous_cov, n_genes, **network)
        # DecoderSCVI's per-cell dispersion head is never used (theta is per gene). Frozen, so
        # that DDP, which needs a gradient for every trained parameter, accepts the module.
        self.decoder.px_r_decoder.requires_grad_(False)
        # Gene-wise inverse dispersion theta_g (log), a point estimate kept in the state dict.
        self.log_inverse_dispersion = nn.Parameter(torch.zeros(n_genes))

    @property
    def device(self) -> torch.device:
        return self.log_inverse_dispersion.device

    @staticmethod
    def _get_fn_args_from_batch(tensors: dict[str, torch.Tensor]) -> tuple[ModelInputs, dict]:
        """Model/guide arguments from a minibatch of scvi-tools' registry tensors."""
        x = tensors[REGISTRY_KEYS.X_KEY]
        # Absent covariates become zero-width tensors, so that model and guide take tensors only
        # and need no branches.
        no_covariates = x.new_zeros((x.shape[0], 0))
        args = ModelInputs(
            x=x,
            group=tensors[GROUP_KEY].reshape(-1).long(),
            batch_index=tensors[REGISTRY_KEYS.BATCH_KEY].long(),
            cat_covs=tensors.get(REGISTRY_KEYS.CAT_COVS_KEY, no_covariates).long(),
            cont_covs=tensors.get(REGISTRY_KEYS.CONT_COVS_KEY, no_covariates).float(),
        )
        cell_weight = tensors.get(CELL_WEIGHT_KEY)
        return args, {"cell_weight": None if cell_weight is None else cell_weight.reshape(-1)}

    # -- generative model ---------------------------------------------------------------------

    @auto_move_data
    def model(self, x, group, batch_index, cat_covs, cont_covs, cell_weight=None):
        """Sample the generative model p(x, z, s, l | covariates).

        Parameters are this nn.Module's own, optimised by torch on the differentiable ELBO; no
        pyro.module call, so the global param store holds nothing and models do not collide.
        Controls and targets are drawn at different rates; ``cell_weight`` rescales each cell so
        that the minibatch ELBO is an unbiased estimate of the training set's mean per cell.
        """
        n_cells = x.shape[0]
        with pyro.plate("cells", n_cells), poutine.scale(scale=_scale(cell_weight)):
            z = pyro.sample("background", _standard_normal(x, n_cells, self.n_background))
            s = pyro.sample("salient", _standard_normal(x, n_cells, self.n_salient))
            if self.use_observed_library:
                log_library = x.sum(-1, keepdim=True).log()
            else:
                batch = batch_index.reshape(-1)
                prior = dist.Normal(
                    self.library_log_means[batch].unsqueeze(-1),
                    self.library_log_vars[batch].sqrt().unsqueeze(-1),
                )
                log_library = pyro.sample("log_library", prior.to_event(1))
            used_salient = s * decoded_with_salient(group).unsqueeze(-1)
            rate, gate_logits = self._decode(
                z,
                used_salient,
                cont_covs,
                log_library,
                _categorical_covariates(batch_index, cat_covs),
            )
            counts = count_distribution(
                self.likelihood, rate, self.log_inverse_dispersion.exp(), gate_logits
            )
            pyro.sample("counts", counts, obs=x)

    def expression_proportions(self, z, s, batch_index, cat_covs, cont_covs) -> torch.Tensor:
        """Decode per-gene proportions rho = softmax(f(z, s, c)), free of library size."""
        covariates = _categorical_covariates(batch_index, cat_covs)
        rate, _ = self._decode(z, s, cont_covs, z.new_zeros((z.shape[0], 1)), covariates)
        return rate

    def _decode(self, z, s, cont_covs, log_library, covariates):
        """Rates and zero-inflation logits (DecoderSCVI's layers, without its unused theta head).

        Under mixed precision the layers run in 16 bits, and the softmax and what follows in
        float32: the count likelihood's logs and sums over genes need its precision.
        """
        hidden = self.decoder.px_decoder(torch.cat([z, s, cont_covs], dim=-1), *covariates)
        linear, softmax = self.decoder.px_scale_decoder
        proportions = softmax(_full_precision(linear(hidden)))
        gate_logits = _full_precision(self.decoder.px_dropout_decoder(hidden))
        return log_library.exp() * proportions, gate_logits

    # -- guide --------------------------------------------------------------------------------

    @auto_move_data
    def guide(self, x, group, batch_index, cat_covs, cont_covs, cell_weight=None):
        """Sample the amortised mean-field guide q(z | x) q(s | x) [q(l | x)]."""
        self._sample_posterior(self.encode(x, batch_index, cat_covs, cont_covs), cell_weight)

    def _sample_posterior(self, posterior: dict[str, tuple], cell_weight) -> None:
        n_cells = posterior["background"][0].shape[0]
        with pyro.plate("cells", n_cells), poutine.scale(scale=_scale(cell_weight)):
            for site in _LATENT_SITES:
                if site in posterior:
                    pyro.sample(site, dist.Normal(*posterior[site]).to_event(1))

    def encode(self, x, batch_index, cat_covs, cont_covs) -> dict[str, tuple]:
        """Posterior ``(loc, scale)`` of each latent from counts and covariates."""
        # Scaled to the data's median depth, not to a fixed 1e4: log1p(x * 1e4 / l) of a nonzero
        # count is about log(x) + log(1e4 / l), so at low depth every expressed gene carries
        # -log l, and the salient latent learnt depth (docs/design_notes.md).
        depth_scale = self.encoder_library_size / x.sum(-1, keepdim=True).clamp(min=1.0)
        encoder_input = _with_continuous((x * depth_scale).log1p_(), cont_covs)
        covariates = _categorical_covariates(batch_index, cat_covs)
        posterior = {
            "background": _loc_scale(self.background_encoder, encoder_input, covariates),
            "salient": _loc_scale(self.salient_encoder, encoder_input, covariates),
        }
        if not self.use_observed_library:
            # The library encoder must see depth, so it reads unnormalised log counts.
            library_input = _with_continuous(torch.log1p(x), cont_covs)
            posterior["log_library"] = _loc_scale(self.library_encoder, library_input, covariates)
        return posterior

    # -- objective ----------------------------------------------------------------------------

    def loss_terms(self, inputs: ModelInputs, cell_weight=None) -> dict[str, torch.Tensor]:
        """Compute the terms of one step's objective, each a mean per cell (a scalar).

        ``reconstruction_loss`` and ``kl_local`` are the two parts of the negative ELBO, the
        ELBO as scvi-tools reports it; ``background_mmd`` is the penalty (weighted; absent at
        weight 0). The training plan weighs ``kl_local`` during the KL warm-up and sums the
        terms.

        The guide is traced once and the model replayed on its samples, as
        ``pyro.infer.Trace_ELBO`` does (every site is reparametrised); the penalty reads the
        same posterior, so nothing passes between guide and model outside the traces.
        """
        posterior = self.encode(*inputs.encoder_inputs)
        guide_trace = poutine.trace(self._sample_posterior).get_trace(posterior, cell_weight)
        replayed = poutine.replay(self.model, trace=guide_trace)
        model_trace = poutine.trace(replayed).get_trace(*inputs, cell_weight=cell_weight)
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        kl_local = sum(
            guide_trace.nodes[site]["log_prob_sum"] - model_trace.nodes[site]["log_prob_sum"]
            for site in _LATENT_SITES
            if site in posterior
        )
        terms = {
            "reconstruction_loss": -model_trace.nodes["counts"]["log_prob_sum"],
            "kl_local": kl_local,
        }
        if self.background_mmd_weight > 0:
            # One value per step, not per cell: any difference between the two groups'
            # background latents is perturbation effect that belongs in s.
            terms["background_mmd"] = self.background_mmd_weight * _mmd(
                posterior["background"][0],
                inputs.group == CellGroup.BACKGROUND,
                decoded_with_salient(inputs.group),
            )
        return terms


def _with_continuous(values: torch.Tensor, cont_covs: torch.Tensor) -> torch.Tensor:
    """``values`` with the continuous covariates as extra columns; no copy when there are none."""
    if cont_covs.shape[-1] == 0:
        return values
    return torch.cat([values, cont_covs], dim=-1)


def _categorical_covariates(batch_index, cat_covs) -> tuple[torch.Tensor, ...]:
    """Batch and extra categorical codes as the ``(n_cells, 1)`` columns scvi.nn layers take."""
    return (batch_index, *(column.unsqueeze(-1) for column in cat_covs.unbind(-1)))


def _mmd(latent: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Squared MMD between the ``first`` and ``second`` cells' ``latent`` (0 if either is absent).

    Written with group weights over the whole step rather than boolean indexing, so that shapes
    stay static. In float32 under mixed precision: a difference of kernel means is lost in 16
    bits.
    """
    with torch.autocast(latent.device.type, enabled=False):
        weights = torch.stack([first, second]).to(latent.dtype)
        counts = weights.sum(-1, keepdim=True)
        weights = weights / counts.clamp(min=1.0)
        moments = weights @ _gaussian_kernel(latent) @ weights.T
    both_present = (counts > 0).all().to(latent.dtype)
    return both_present * (moments[0, 0] + moments[1, 1] - 2.0 * moments[0, 1])


def _gaussian_kernel(latent: torch.Tensor) -> torch.Tensor:
    """Return a sum of Gaussian kernels whose widths scale with the latent dimension."""
    squared_distances = torch.cdist(latent, latent).square()
    return sum(
        torch.exp(-squared_distances / (2.0 * width * latent.shape[-1]))
        for width in _MMD_KERNEL_WIDTHS
    )


def _scale(cell_weight):
    return 1.0 if cell_weight is None else cell_weight


def _standard_normal(like: torch.Tensor, n_cells: int, dim: int) -> dist.TorchDistribution:
    zeros = like.new_zeros((n_cells, dim))
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def _full_precision(values: torch.Tensor) -> torch.Tensor:
    """``values`` in float32 if autocast made them 16-bit; otherwise as they are."""
    if values.dtype in (torch.float16, torch.bfloat16):
        return values.float()
    return values


def _loc_scale(encoder: Encoder, encoder_input, covariates) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the posterior's location and scale, in float32 under mixed precision too (KL)."""
    loc, variance, _ = encoder(encoder_input, *covariates)
    return _full_precision(loc), _full_precision(variance).sqrt()
