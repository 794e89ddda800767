"""The generative model and its amortised guide, in Pyro.

Generative model, for cell n with covariates c_n (batch, categorical, continuous) and, for a
cell with a targeting guide, its target t_n:

    z_n ~ Normal(0, I)                                  background latent, every cell
    y_n ~ Bernoulli(pi_t)                               responder: did the knockout take? (targets)
    s_n ~ Normal(mu_t, sigma^2 I) if y_n = 1, else N(0, I)  salient latent, every cell ...
    s'_n = s_n if y_n = 1, else 0                       ... used by responders only
    l_n = total counts of n (observed), or l_n ~ LogNormal(mu_batch, sigma_batch)
    rho_n = softmax(f(z_n, s'_n, c_n))                  decoder: per-gene proportions
    x_ng ~ ZINB / NB / Poisson(mean = l_n * rho_ng, gene-wise dispersion theta_g)

Controls have y_n = 0. pi_t (the target's responder fraction) and mu_t (the centre of its
responders' salient latents, shrunk towards 0 by a Normal(0, I) prior) are point estimates;
sigma is ``responder_salient_scale``, small so that a responder's s stays near its target's
centre and cannot fit the cell's noise (the training plan anneals it from 1). y_n
is summed out exactly, a log-sum-exp over the two branches, never sampled (Pyro's
TraceEnum_ELBO would do the sum, but it accepts only scalar poutine.scale, and every cell here
carries its own minibatch weight). With ``responder=False`` every target cell is a responder
(y_n = 1, prior N(0, I)): the plain contrastive VAE, unless a fixed q(y_n = 1) is passed as
``responder_weight`` (responder refinement: the responder mixture's posterior after a first
training run), which weighs the two reconstructions. With ``salient_effect="additive"`` the
decoder reads z only, and s shifts the log proportions linearly: rho = softmax(f(z, c) + W s'),
with unit-norm rows of W.

Guide: q(z_n | x_n, c_n) q(s_n | x_n, c_n) [q(l_n | x_n, c_n)], encoders on log1p of the
counts scaled to the data's median depth. With ``salient_cross_fitting``, q(s | x) has two
encoders, and each cell's salient latent is read by the one that never trained on it (see
``_salient_loc_scale``). The encoders do not see the perturbation label
(unless ``salient_encoder_sees_group``), so a cell's salient latent reflects its expression,
not its guide. The label enters only the responder branch, as the index of pi_t and mu_t.
q(s | x) is the posterior of the responder branch; a non-responder's s is never decoded, so its
posterior is its prior and the escaper branch carries no salient term (see
``_branch_log_likelihoods``). A control is decoded without s, so the ELBO pulls its q(s | x) to
the prior, centred on 0; an opt-in Wasserstein penalty pulls it further, to the point mass at 0.
With ``counterfactual_controls``, a control's counts are also scored with its own s through the
decoder held fixed, a term that trains the salient encoder only, so that it reads every cell alike
(with ``"decoder"``, it trains the decoder too, so that the decoder fits every cell's noise alike;
``counterfactual_share`` decodes a random share of each step's cells, to save time). During
responder refinement a target cell gets this term too, weighted by 1 - q(y = 1), as it gets a
control's reconstruction.
A per-step MMD between controls' and perturbed cells' background latents keeps perturbation
effects out of z; an opt-in HSIC penalty between perturbed cells' s and z keeps background out
of s; with ``background_from_controls`` (set by the responder model) only controls
train the background encoder, which keeps them out of each perturbed cell's z.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from scvi import REGISTRY_KEYS
from scvi.module.base import PyroBaseModuleClass, auto_move_data
from scvi.nn import DecoderSCVI, Encoder
from torch import nn

from ._constants import (
    BACKGROUND_MMD_WEIGHT,
    CELL_WEIGHT_KEY,
    COUNTERFACTUAL_CONTROLS,
    GROUP_KEY,
    INDEPENDENCE_WEIGHT,
    LEGACY_ENCODER_LIBRARY_SIZE,
    RESPONDER_WEIGHT_KEY,
    TARGET_KEY,
    CellGroup,
)
from ._likelihoods import LIKELIHOODS, Likelihood, count_distribution, log_prob_up_to_count_terms

_TINY = 1e-30
SALIENT_EFFECTS = ("nonlinear", "additive")
COUNTERFACTUAL_CONTROLS_MODES = (False, True, "decoder")
SalientEffect = Literal["nonlinear", "additive"]
_MMD_KERNEL_WIDTHS = (0.25, 1.0, 4.0)  # squared widths per latent dimension


class ModelInputs(NamedTuple):
    """Positional arguments of the model and the guide, read from one minibatch."""

    x: torch.Tensor
    group: torch.Tensor
    batch_index: torch.Tensor
    cat_covs: torch.Tensor
    cont_covs: torch.Tensor
    target: torch.Tensor

    @property
    def encoder_inputs(self) -> tuple[torch.Tensor, ...]:
        """The arguments of :meth:`ContrastivePyroModule.encode`: all but the target."""
        return self.x, self.group, self.batch_index, self.cat_covs, self.cont_covs


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
    n_targets
        Number of perturbation targets (the responder prior has one pi_t and mu_t each).
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
    wasserstein_weight
        Weight of the penalty that pulls controls' q(s) to the point mass at 0 (off at 0).
    background_mmd_weight
        Weight of the per-step squared MMD between the background latents of the step's controls
        and perturbed cells, which keeps perturbation effects out of z.
    salient_encoder_sees_group
        Give the salient encoder each cell's group (control / perturbed / excluded). Off by default.
    responder
        Model whether each target cell responded (the y_n above); otherwise all target cells
        use their salient latent.
    responder_salient_scale
        sigma above; ``None`` learns one per target.
    salient_effect
        ``"nonlinear"``: s enters the decoder network; ``"additive"``: a shift of the log
        proportions along unit-norm gene directions.
    background_from_controls
        Train the background encoder on controls only: a perturbed cell's loss sends it no
        gradient, so its z cannot be trained to explain the cell's perturbation.
    encoder_library_size
        Total that each cell's counts are scaled to before the encoders' ``log1p``; the model
        passes the median total count of its data (see ``encode``).
    independence_weight
        Weight of the per-step HSIC between the perturbed cells' salient and background
        latents (off at 0).
    salient_cross_fitting
        Two salient encoders, each trained on one half of the cells and reading the other half
        (the halves are the parity of each cell's total count).
    counterfactual_controls
        ``True``: controls also train the salient encoder; each control's counts are
        reconstructed from its own salient latent through the decoder held fixed (see
        ``model``). ``"decoder"``: the same term trains the decoder too. ``False``: off.
    counterfactual_share
        Share of each step's cells that the counterfactual pass decodes (a random subset; its
        controls are scored, each weighted by the inverse of the share, so that the term's
        expectation is the same).
    """

    def __init__(
        self,
        n_genes: int,
        n_background: int = 10,
        n_salient: int = 10,
        n_batch: int = 1,
        n_targets: int = 1,
        n_cats_per_cov: tuple[int, ...] = (),
        n_continuous_cov: int = 0,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        likelihood: Likelihood = "zinb",
        use_observed_library: bool = True,
        library_log_means: torch.Tensor | None = None,
        library_log_vars: torch.Tensor | None = None,
        wasserstein_weight: float = 0.0,
        background_mmd_weight: float = BACKGROUND_MMD_WEIGHT,
        salient_encoder_sees_group: bool = False,
        responder: bool = False,
        responder_salient_scale: float | None = 0.25,
        salient_effect: SalientEffect = "nonlinear",
        background_from_controls: bool = False,
        encoder_library_size: float = LEGACY_ENCODER_LIBRARY_SIZE,
        independence_weight: float = INDEPENDENCE_WEIGHT,
        salient_cross_fitting: bool = False,
        counterfactual_controls: bool | Literal["decoder"] = COUNTERFACTUAL_CONTROLS,
        counterfactual_share: float = 1.0,
    ):
        super().__init__()
        if counterfactual_controls not in COUNTERFACTUAL_CONTROLS_MODES:
            raise ValueError(
                f"counterfactual_controls must be one of {COUNTERFACTUAL_CONTROLS_MODES}, got "
                f"{counterfactual_controls!r}."
            )
        if not 0.0 < counterfactual_share <= 1.0:
            raise ValueError(
                f"counterfactual_share must be in (0, 1], got {counterfactual_share!r}."
            )
        if salient_effect not in SALIENT_EFFECTS:
            raise ValueError(
                f"salient_effect must be one of {SALIENT_EFFECTS}, got {salient_effect!r}."
            )
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
        self.n_background = n_background
        self.n_salient = n_salient
        self.likelihood = likelihood
        self.use_observed_library = use_observed_library
        self.wasserstein_weight = wasserstein_weight
        self.background_mmd_weight = background_mmd_weight
        self.salient_encoder_sees_group = salient_encoder_sees_group
        self.responder = responder
        self.responder_salient_scale = responder_salient_scale
        self.salient_effect = salient_effect
        self.background_from_controls = background_from_controls
        self.independence_weight = independence_weight
        self.salient_cross_fitting = salient_cross_fitting
        self.counterfactual_controls = counterfactual_controls
        self.counterfactual_share = counterfactual_share
        # A buffer, so that a saved model keeps the value it was trained with.
        self.register_buffer("encoder_library_size", torch.tensor(float(encoder_library_size)))

        covariate_sizes = [n_batch, *n_cats_per_cov]
        network = {
            "n_layers": n_layers,
            "n_hidden": n_hidden,
            "inject_covariates": True,
            "use_batch_norm": True,
            "use_layer_norm": False,
        }
        n_encoder_input = n_genes + n_continuous_cov
        self.background_encoder = Encoder(
            n_encoder_input,
            n_background,
            n_cat_list=covariate_sizes,
            dropout_rate=dropout_rate,
            **network,
        )
        salient_network = {
            "n_input": n_encoder_input,
            "n_output": n_salient,
            "n_cat_list": covariate_sizes
            + ([len(CellGroup)] if salient_encoder_sees_group else []),
            "dropout_rate": dropout_rate,
            **network,
        }
        self.salient_encoder = Encoder(**salient_network)
        if salient_cross_fitting:
            self.second_salient_encoder = Encoder(**salient_network)
        if not use_observed_library:
            if library_log_means is None or library_log_vars is None:
                raise ValueError("A latent library size needs library_log_means and _vars.")
            self.register_buffer("library_log_means", torch.as_tensor(library_log_means).float())
            self.register_buffer("library_log_vars", torch.as_tensor(library_log_vars).float())
            self.library_encoder = Encoder(
                n_encoder_input, 1, n_cat_list=covariate_sizes, dropout_rate=dropout_rate, **network
            )
        additive = salient_effect == "additive"
        self.decoder = DecoderSCVI(
            n_background + (0 if additive else n_salient) + n_continuous_cov,
            n_genes,
            n_cat_list=covariate_sizes,
            **network,
        )
        # DecoderSCVI's per-cell dispersion head is never used (theta is per gene). Frozen, so
        # that DDP, which needs a gradient for every trained parameter, accepts the module.
        self.decoder.px_r_decoder.requires_grad_(False)
        # Gene-wise inverse dispersion theta_g (log), a point estimate kept in the state dict.
        self.log_inverse_dispersion = nn.Parameter(torch.zeros(n_genes))
        self._register_load_state_dict_pre_hook(_load_legacy_state)
        if additive:
            # log rho = f(z, c) + W s: each salient direction is a fixed direction of log fold
            # changes over the genes (unit norm, see _decode).
            self.salient_loadings = nn.Parameter(0.01 * torch.randn(n_salient, n_genes))
        if responder:
            # logit(pi_t) starts at 0 (half the cells respond) and mu_t at the prior's centre.
            self.responder_logits = nn.Parameter(torch.zeros(n_targets))
            self.target_salient_loc = nn.Parameter(torch.zeros(n_targets, n_salient))
            if responder_salient_scale is None:
                self.target_salient_log_scale = nn.Parameter(torch.zeros(n_targets))

    @property
    def device(self) -> torch.device:
        return self.log_inverse_dispersion.device

    @staticmethod
    def _get_fn_args_from_batch(tensors: dict[str, torch.Tensor]) -> tuple[ModelInputs, dict]:
        """Model/guide arguments from a minibatch of scvi-tools' registry tensors."""
        x = tensors[REGISTRY_KEYS.X_KEY]
        # Absent covariates become zero-width tensors, so that model and guide take tensors only
        # (as JIT tracing requires) and need no branches.
        no_covariates = x.new_zeros((x.shape[0], 0))
        args = ModelInputs(
            x=x,
            group=tensors[GROUP_KEY].reshape(-1).long(),
            batch_index=tensors[REGISTRY_KEYS.BATCH_KEY].long(),
            cat_covs=tensors.get(REGISTRY_KEYS.CAT_COVS_KEY, no_covariates).long(),
            cont_covs=tensors.get(REGISTRY_KEYS.CONT_COVS_KEY, no_covariates).float(),
            target=tensors[TARGET_KEY].reshape(-1).long(),
        )
        kwargs = {}
        for name, key in (
            ("cell_weight", CELL_WEIGHT_KEY),
            ("responder_weight", RESPONDER_WEIGHT_KEY),
        ):
            values = tensors.get(key)
            kwargs[name] = None if values is None else values.reshape(-1)
        return args, kwargs

    # -- generative model ---------------------------------------------------------------------

    @auto_move_data
    def model(
        self,
        x,
        group,
        batch_index,
        cat_covs,
        cont_covs,
        target,
        cell_weight=None,
        kl_weight=1.0,
        n_obs=None,
        all_respond=False,
        salient_scale=None,
        responder_weight=None,
    ):
        """Sample the generative model p(x, z, s, l | covariates), with y summed out.

        ``all_respond=True`` fixes y = 1 for every target cell (the plain contrastive VAE). The
        training plan uses it for the first epochs: until the decoder has learnt to use s, the
        responder branch explains no cell better than the escaper branch, and a model that
        starts with the mixture collapses to "nobody responded".

        ``responder_weight`` (plain model only) is a fixed q(y = 1) per cell, the responder
        mixture's posterior during responder refinement: a target cell's reconstruction is then
        ``w log p(x | z, s) + (1 - w) log p(x | z, 0)``, so a non-responder is decoded like a
        control and its s cannot fit its noise.
        """
        # Parameters are this nn.Module's own, optimised by torch on the differentiable ELBO; no
        # pyro.module call, so the global param store holds nothing and models do not collide.
        n_cells = x.shape[0]
        is_target = group == CellGroup.TARGET
        covariates = _categorical_covariates(batch_index, cat_covs)
        if self.responder and n_obs:
            # mu_t is global: its prior enters the per-cell mean ELBO once, divided by the
            # number of training cells, like any global term of a minibatch estimate.
            prior = dist.Normal(0.0, 1.0).log_prob(self.target_salient_loc).sum()
            pyro.factor("target_salient_loc_prior", prior / n_obs)
        # Controls and targets are drawn at different rates; cell_weight rescales each cell so
        # the minibatch ELBO is an unbiased estimate of the training-set ELBO (per cell).
        with pyro.plate("cells", n_cells), poutine.scale(scale=_scale(cell_weight)):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("background", _standard_normal(x, n_cells, self.n_background))
                # The prior of s given y = 0; a responder's prior N(mu_t, sigma^2 I) enters the
                # responder branch as the density ratio (see _branch_log_likelihoods).
                s = pyro.sample("salient", _standard_normal(x, n_cells, self.n_salient))
            if self.use_observed_library:
                log_library = x.sum(-1, keepdim=True).log()
            else:
                prior_loc = self.library_log_means[batch_index.reshape(-1)].unsqueeze(-1)
                prior_scale = self.library_log_vars[batch_index.reshape(-1)].sqrt().unsqueeze(-1)
                log_library = pyro.sample(
                    "log_library", dist.Normal(prior_loc, prior_scale).to_event(1)
                )
            if self.counterfactual_controls:
                self._score_controls_counterfactually(
                    x,
                    z,
                    s,
                    group,
                    cont_covs,
                    log_library,
                    covariates,
                    cell_weight,
                    responder_weight,
                )
            if not self.responder and responder_weight is None:
                # Every target cell responds; controls carry no perturbation (s' = 0).
                used_salient = s * is_target.unsqueeze(-1)
                rate, gate_logits = self._decode(
                    z, used_salient, cont_covs, log_library, covariates
                )
                counts = count_distribution(
                    self.likelihood, rate, self.log_inverse_dispersion.exp(), gate_logits
                )
                pyro.sample("counts", counts, obs=x)
                return
            if not self.responder:
                unperturbed, perturbed = self._log_likelihoods_without_and_with_salient(
                    x, z, s, log_library, covariates, cont_covs, is_target
                )
                # The expectation over y ~ Bernoulli(w) of log p(x | z, y s). s keeps its full KL
                # term in both branches, as a control's does: a non-responder is treated exactly
                # like a control, so the ELBO pulls its q(s | x) to the prior. (Summing over y
                # would let q(y) reward a loose escaper branch; here q(y) is fixed.)
                weight = responder_weight[is_target]
                refined = weight * perturbed + (1.0 - weight) * unperturbed[is_target]
                marginal = unperturbed.index_put((is_target.nonzero(as_tuple=True)[0],), refined)
                pyro.factor("counts", marginal)
                return
            unperturbed, escaped, responded = self._branch_log_likelihoods(
                x,
                z,
                s,
                log_library,
                covariates,
                cont_covs,
                is_target,
                target,
                self._salient_posterior(x, group, batch_index, cat_covs, cont_covs),
                salient_scale,
                kl_weight,
            )
            if all_respond:
                target_log_likelihood = responded - F.logsigmoid(
                    self.responder_logits[target[is_target]]
                )
            else:
                target_log_likelihood = torch.logaddexp(escaped, responded)
            # log p(x | z, s) with y summed out: log(pi p1 + (1 - pi) p0) for target cells,
            # log p0 for controls.
            marginal = unperturbed.index_put(
                (is_target.nonzero(as_tuple=True)[0],), target_log_likelihood
            )
            pyro.factor("counts", marginal)

    def _score_controls_counterfactually(
        self, x, z, s, group, cont_covs, log_library, covariates, cell_weight, responder_weight
    ):
        """Score controls' counts as if they were perturbed, decoded with their own s.

        A control is decoded at s = 0, so the ELBO alone pulls its q(s | x) to the prior and the
        salient encoder learns to recognise the training controls: they sit near 0 while
        held-out controls and perturbed cells do not. This term, called inside the model's cell
        plate, scores each control's counts decoded with its own s and z held fixed, so that it
        trains the salient encoder only. The encoder then reads every cell alike and has
        nothing to gain from telling training controls apart; the decoder still learns the
        controls at s = 0 (docs/benchmarks.md, "Controls read as perturbed").

        With ``"decoder"`` the term trains the decoder too. The decoder otherwise learns the s
        pathway from perturbed training cells alone and fits their noise through it; trained
        on the controls' s as well, it fits every training cell's noise alike, so a perturbed
        training cell no longer sits apart from a control (docs/benchmarks.md, "The decoder's
        half"). z stays detached: the controls' z is trained by the ELBO to explain them at
        s = 0. With "decoder" this is a training pass of the decoder, so its inputs update the
        batch-norm running statistics too, as the ELBO's pass does.

        Every cell of the step goes through the decoder's hidden layer, so that batch
        normalisation sees the whole population (a pass over the controls alone normalised them
        apart from the perturbed cells, and training escapers sat further from training
        controls: docs/benchmarks.md, "The decoder's half"); only the controls among them go on
        through the output layers over the genes, the pass's main cost, and are scored. With
        ``counterfactual_share`` below 1, a random share of the step's cells goes through,
        and each control scored is weighted by the inverse of the share, which keeps the term's
        expectation: the pass's cost grows with the rows it decodes.

        During responder refinement (``responder_weight`` given), a target cell is a control
        with probability 1 - q(y = 1), and it gets the control's term with that weight too. A
        non-responder is then trained exactly like a control. Without it, the decoder fits the
        noise of controls through s but not that of training non-responders, whose s the ELBO
        pulls to the prior: the salient latent collapsed, and training non-targeting cells
        still sat apart from training controls (docs/benchmarks.md, "Refinement trains
        non-responders like controls").
        """
        n_cells = x.shape[0]
        if n_cells < 2:
            return
        n_decoded = max(2, round(self.counterfactual_share * n_cells))
        if n_decoded >= n_cells:
            decoded = torch.arange(n_cells, device=x.device)
        else:
            decoded = torch.randperm(n_cells, device=x.device)[:n_decoded]
        like_control = (group == CellGroup.BACKGROUND).to(x.dtype)
        if responder_weight is not None:
            is_target = group == CellGroup.TARGET
            like_control = torch.where(is_target, 1.0 - responder_weight, like_control)
        like_control = like_control[decoded]
        scored = like_control > 0
        if not scored.any():
            return
        rate, gate_logits = self._decode(
            z.detach()[decoded],
            s[decoded],
            cont_covs[decoded],
            log_library[decoded],
            [covariate[decoded] for covariate in covariates],
            frozen=self.counterfactual_controls != "decoder",
            rows=scored,
        )
        # theta is held fixed, so the count-only terms of the likelihood would add a constant.
        counterfactual = log_prob_up_to_count_terms(
            self.likelihood,
            rate,
            self.log_inverse_dispersion.detach().exp(),
            gate_logits,
            x[decoded[scored]],
        )
        inverse_share = n_cells / decoded.numel()
        per_cell = x.new_zeros(n_cells).index_put(
            (decoded[scored],), counterfactual * like_control[scored] * inverse_share
        )
        pyro.factor("control_counterfactual", per_cell)
        # Not part of the ELBO: logged apart, as what it adds to the step's loss (the guide,
        # which Trace_ELBO runs first, has just reset the step's terms).
        added = -(_scale(cell_weight) * per_cell).sum().detach()
        self.last_penalties = {**self.last_penalties, "control_counterfactual": added}

    def _salient_posterior(self, x, group, batch_index, cat_covs, cont_covs):
        """``(loc, scale)`` of q(s | x): the guide's for these very counts if it ran, else anew.

        The escaper branch of the model needs the density of the guide's s (see
        ``_branch_log_likelihoods``). Re-encoding inside the model would draw new dropout masks,
        so within a step the model reuses what the guide computed. Trace_ELBO passes the same
        tensors to guide and model, so the guide's result is matched by the identity of ``x``.
        """
        guide_counts, posterior = self.__dict__.pop("_guide_salient_posterior", (None, None))
        if guide_counts is not x:
            posterior = self.encode(x, group, batch_index, cat_covs, cont_covs, fitting=True)
            posterior = posterior["salient"]
        return posterior

    def _branch_log_likelihoods(
        self,
        x,
        z,
        s,
        log_library,
        covariates,
        cont_covs,
        cells,
        target,
        salient_posterior,
        salient_scale=None,
        kl_weight=1.0,
    ):
        """Log-likelihoods of every cell without s, and the two responder branches of ``cells``.

        Returns ``log p(x | z, s' = 0)`` for every cell, and for the selected cells
        ``log(1 - pi_t) + log q(s | x) - log N(s; 0, I) + log p(x | z, 0)`` and
        ``log pi_t + log N(s; mu_t, sigma^2 I) - log N(s; 0, I) + log p(x | z, s)``.

        The sample site of s contributes ``log N(s; 0, I) - log q(s | x)`` outside the sum over
        y, so in total the responder branch is the single-sample ELBO of y = 1 with the prior
        N(mu_t, sigma^2 I), and the escaper branch is ``log(1 - pi_t) p(x | z, 0)`` exactly: the
        guide's s belongs to the responder branch only (a non-responder's s is never decoded,
        so its posterior is its prior). Without the q term the escaper branch would pay
        KL(q(s | x) || N(0, I)) for an s it does not use, and the model could win evidence for
        "responded" by concentrating every target cell's q(s | x) on one point. The density
        terms carry the KL warm-up weight of the sample sites they complete; unweighted, the
        ratio N(s; mu_t, I) / N(s; 0, I) = exp(s . mu_t - |mu_t|^2 / 2) would reward s and mu_t
        for growing together while the warm-up weight is small.
        """
        unperturbed, perturbed = self._log_likelihoods_without_and_with_salient(
            x, z, s, log_library, covariates, cont_covs, cells
        )
        logit = self.responder_logits[target[cells]]
        loc = self.target_salient_loc[target[cells]]
        if self.responder_salient_scale is None:
            scale = self.target_salient_log_scale[target[cells]].exp().unsqueeze(-1)
        else:
            scale = self.responder_salient_scale if salient_scale is None else salient_scale
        responder_prior = dist.Normal(loc, scale).to_event(1)
        standard = _standard_normal(s, int(cells.sum()), self.n_salient)
        log_prior_ratio = responder_prior.log_prob(s[cells]) - standard.log_prob(s[cells])
        guide_salient = dist.Normal(*(v[cells] for v in salient_posterior)).to_event(1)
        unused_salient = guide_salient.log_prob(s[cells]) - standard.log_prob(s[cells])
        escaped = F.logsigmoid(-logit) + kl_weight * unused_salient + unperturbed[cells]
        responded = F.logsigmoid(logit) + kl_weight * log_prior_ratio + perturbed
        return unperturbed, escaped, responded

    def _log_likelihoods_without_and_with_salient(
        self, x, z, s, log_library, covariates, cont_covs, cells
    ):
        """``log p(x | z, s' = 0)`` of every cell, and ``log p(x | z, s)`` of the selected ``cells``."""
        n_cells = x.shape[0]
        # One decoder pass over every cell at s = 0 and the selected cells at their own s, so
        # that batch normalisation sees both.
        stacked = [
            torch.cat([values, values[cells]])
            for values in (x, z, log_library, cont_covs, *covariates)
        ]
        x_both, z_both, library_both, cont_both, *covariates_both = stacked
        s_both = torch.cat([torch.zeros_like(s), s[cells]])
        rate, gate_logits = self._decode(z_both, s_both, cont_both, library_both, covariates_both)
        counts = count_distribution(
            self.likelihood, rate, self.log_inverse_dispersion.exp(), gate_logits
        )
        log_likelihood = counts.log_prob(x_both)
        return log_likelihood[:n_cells], log_likelihood[n_cells:]

    def expression_proportions(self, z, s, batch_index, cat_covs, cont_covs) -> torch.Tensor:
        """Decode per-gene proportions rho = softmax(f(z, s, c)), free of library size."""
        covariates = _categorical_covariates(batch_index, cat_covs)
        rate, _ = self._decode(z, s, cont_covs, z.new_zeros((z.shape[0], 1)), covariates)
        return rate

    def _decode(self, z, s, cont_covs, log_library, covariates, frozen=False, rows=None):
        """Rates and zero-inflation logits.

        ``frozen`` sends no gradient into the decoder. ``rows`` (a mask or indices) returns
        those rows' rates only: the hidden layer still runs over every row, so that batch
        normalisation normalises them with the whole step, but the output layers over the
        genes, the costly part, run on the returned rows alone.
        """
        # DecoderSCVI.forward, called layer by layer so that the output layers can skip rows.
        decoder = self.decoder
        layers = [decoder.px_decoder, decoder.px_scale_decoder, decoder.px_dropout_decoder]
        loadings = getattr(self, "salient_loadings", None)
        if frozen:
            layers = [_frozen(layer) for layer in layers]
            loadings = None if loadings is None else loadings.detach()
        hidden_layer, proportions_layer, gate_layer = layers
        additive = self.salient_effect == "additive"
        decoder_input = torch.cat([z, cont_covs] if additive else [z, s, cont_covs], dim=-1)
        hidden = hidden_layer(decoder_input, *covariates)
        if rows is not None:
            hidden, s, log_library = hidden[rows], s[rows], log_library[rows]
        proportions = proportions_layer(hidden)
        if additive:
            # Unit-norm directions: s then carries the size of the effect (in log fold change),
            # so the responder prior's scale is on the same scale as the effects and cannot be
            # undercut by rescaling the loadings.
            loadings = F.normalize(loadings, dim=-1)
            logits = proportions.clamp(min=_TINY).log() + s @ loadings
            proportions = torch.softmax(logits, dim=-1)
        return log_library.exp() * proportions, gate_layer(hidden)

    # -- guide --------------------------------------------------------------------------------

    @auto_move_data
    def guide(
        self,
        x,
        group,
        batch_index,
        cat_covs,
        cont_covs,
        target,
        cell_weight=None,
        kl_weight=1.0,
        n_obs=None,
        all_respond=False,
        salient_scale=None,
        responder_weight=None,
    ):
        """Sample the amortised mean-field guide q(z | x) q(s | x) [q(l | x)]."""
        n_cells = x.shape[0]
        posterior = self.encode(x, group, batch_index, cat_covs, cont_covs, fitting=True)
        if self.responder:
            self._guide_salient_posterior = (x, posterior["salient"])
        background = posterior["background"]
        if self.background_from_controls:
            # Only controls train the background encoder: a perturbed cell's z is what the
            # controls' encoder reads in it, so no gradient can teach z to explain an effect.
            is_control = (group == CellGroup.BACKGROUND).unsqueeze(-1)
            background = tuple(torch.where(is_control, v, v.detach()) for v in background)
        # What each penalty in use adds to this step's loss, scaled as the ELBO scales it, so
        # that the training plan can log the ELBO and the penalties apart.
        penalties = {}
        with pyro.plate("cells", n_cells), poutine.scale(scale=_scale(cell_weight)):
            with poutine.scale(scale=kl_weight):
                pyro.sample("background", dist.Normal(*background).to_event(1))
                pyro.sample("salient", dist.Normal(*posterior["salient"]).to_event(1))
                # Opt-in: the squared 2-Wasserstein distance ||mu||^2 + sum(sigma^2) from a
                # control's q(s | x) to the point mass at 0. A guide factor adds to log q, so a
                # positive value raises the loss.
                if self.wasserstein_weight > 0:
                    salient_loc, salient_scale = posterior["salient"]
                    distance = (salient_loc.square() + salient_scale.square()).sum(-1)
                    is_background = (group == CellGroup.BACKGROUND).to(distance.dtype)
                    wasserstein = self.wasserstein_weight * distance * is_background
                    pyro.factor("background_salient_wasserstein", wasserstein, has_rsample=True)
                    scaled = kl_weight * _scale(cell_weight) * wasserstein
                    penalties["salient_wasserstein"] = scaled.sum()
            if not self.use_observed_library:
                pyro.sample("log_library", dist.Normal(*posterior["log_library"]).to_event(1))
        # Guides are assigned at random, so perturbed cells' background states follow the
        # controls' distribution. A step pairs controls and targets of one batch; any difference
        # between their background latents is perturbation effect that belongs in s, and the
        # maximum mean discrepancy penalises it. One value per step: it is not scaled per cell.
        mmd = self.background_mmd_weight * _group_mmd(posterior["background"][0], group)
        pyro.factor("background_mmd", mmd, has_rsample=True)
        if self.background_mmd_weight > 0:
            penalties["background_mmd"] = mmd
        # For the same reason a perturbed cell's effect is independent of its background state:
        # the opt-in HSIC penalises dependence between perturbed cells' s and z. z is held
        # fixed, so that the penalty moves s and not z.
        if self.independence_weight > 0:
            is_target = group == CellGroup.TARGET
            hsic = self.independence_weight * _hsic(
                posterior["salient"][0][is_target], posterior["background"][0][is_target].detach()
            )
            pyro.factor("salient_background_hsic", hsic, has_rsample=True)
            penalties["salient_background_hsic"] = hsic
        self.last_penalties = {name: value.detach() for name, value in penalties.items()}

    def encode(
        self, x, group, batch_index, cat_covs, cont_covs, fitting: bool = False
    ) -> dict[str, tuple]:
        """Posterior ``(loc, scale)`` of each latent from counts and covariates.

        ``fitting`` is for the ELBO's guide: with ``salient_cross_fitting`` each cell's salient
        latent then comes from the encoder that trains on it, otherwise (every output) from the
        encoder that does not.
        """
        # Scaled to the data's median depth, not to a fixed 1e4: log1p(x * 1e4 / l) of a nonzero
        # count is about log(x) + log(1e4 / l), so at low depth every expressed gene carries
        # -log l, and the salient latent learnt depth (log-library R^2 0.13 against 0.02 at the
        # median, Papalexi data, docs/benchmarks.md).
        depth_scale = self.encoder_library_size / x.sum(-1, keepdim=True).clamp(min=1.0)
        encoder_input = _with_continuous((x * depth_scale).log1p_(), cont_covs)
        covariates = _categorical_covariates(batch_index, cat_covs)
        salient_covariates = covariates
        if self.salient_encoder_sees_group:
            salient_covariates = (*covariates, group.unsqueeze(-1))
        posterior = {
            "background": _loc_scale(self.background_encoder, encoder_input, covariates),
            "salient": self._salient_loc_scale(x, encoder_input, salient_covariates, fitting),
        }
        if not self.use_observed_library:
            # The library encoder must see depth, so it reads unnormalised log counts.
            library_input = _with_continuous(torch.log1p(x), cont_covs)
            posterior["log_library"] = _loc_scale(self.library_encoder, library_input, covariates)
        return posterior

    @staticmethod
    def cross_fitting_half(x: torch.Tensor) -> torch.Tensor:
        """Each cell's half under ``salient_cross_fitting``: the parity of its total count.

        Outputs read a cell of half k with encoder k, which trained on the other half.
        """
        return torch.remainder(x.sum(-1).round(), 2).long()

    def _salient_loc_scale(self, x, encoder_input, covariates, fitting):
        """q(s | x), cross-fitted when ``salient_cross_fitting`` is on.

        For a perturbed training cell, a salient latent read by an encoder that trained on it
        is spare capacity that fits the cell's counting noise, which controls (decoded at
        s = 0) do not get: null perturbed cells then sit apart from controls in every output
        (docs/benchmarks.md, "Calibration of the salient latent"). Cross-fitting splits the
        cells in two halves by the parity of their total count, a coin that carries no biology
        and that every data loader sees alike without a stored index. Encoder k trains on the
        half with parity 1 - k and reads the half with parity k, so no output comes from an
        encoder that trained on the cell (the shared decoder did, and keeps the two encoders in
        one salient space).
        """
        if not self.salient_cross_fitting:
            return _loc_scale(self.salient_encoder, encoder_input, covariates)
        parity = self.cross_fitting_half(x)
        encoder_of_cell = 1 - parity if fitting else parity
        loc = scale = None
        for index, encoder in enumerate((self.salient_encoder, self.second_salient_encoder)):
            rows = (encoder_of_cell == index).nonzero(as_tuple=True)[0]
            if self.training and rows.numel() < 2:
                # Batch normalisation needs two cells in training: read the whole minibatch and
                # keep this half's rows (an empty half still gives DDP a gradient).
                half = tuple(v[rows] for v in _loc_scale(encoder, encoder_input, covariates))
            else:
                half = _loc_scale(encoder, encoder_input[rows], tuple(c[rows] for c in covariates))
            if loc is None:
                loc = half[0].new_zeros((x.shape[0], half[0].shape[-1]))
                scale = torch.ones_like(loc)
            loc = loc.index_put((rows,), half[0])
            scale = scale.index_put((rows,), half[1])
        return loc, scale


def _with_continuous(values: torch.Tensor, cont_covs: torch.Tensor) -> torch.Tensor:
    """``values`` with the continuous covariates as extra columns; no copy when there are none."""
    if cont_covs.shape[-1] == 0:
        return values
    return torch.cat([values, cont_covs], dim=-1)


def _categorical_covariates(batch_index, cat_covs) -> tuple[torch.Tensor, ...]:
    """Batch and extra categorical codes as the ``(n_cells, 1)`` columns scvi.nn layers take."""
    return (batch_index, *(column.unsqueeze(-1) for column in cat_covs.unbind(-1)))


def _group_mmd(latent: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Squared MMD between the control and the target cells' ``latent`` (0 if either is absent).

    Written with group weights over the whole step rather than boolean indexing, so that shapes
    stay static.
    """
    in_group = [group == CellGroup.BACKGROUND, group == CellGroup.TARGET]
    weights = torch.stack(in_group).to(latent.dtype)
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


def _hsic(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Biased HSIC estimate between paired samples (0 with fewer than 2 cells)."""
    n_cells = first.shape[0]
    if n_cells < 2:
        return first.new_zeros(())
    # Standardised, so that shrinking a latent cannot lower the statistic.
    first = (first - first.mean(0)) / first.std(0).clamp(min=1e-4)
    second = (second - second.mean(0)) / second.std(0).clamp(min=1e-4)
    centring = torch.eye(n_cells, dtype=first.dtype, device=first.device) - 1.0 / n_cells
    first_centred = centring @ _gaussian_kernel(first) @ centring
    return (first_centred * _gaussian_kernel(second)).sum() / (n_cells - 1) ** 2


def _scale(cell_weight):
    return 1.0 if cell_weight is None else cell_weight


def _standard_normal(like: torch.Tensor, n_cells: int, dim: int) -> dist.TorchDistribution:
    zeros = like.new_zeros((n_cells, dim))
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def _loc_scale(encoder: Encoder, encoder_input, covariates) -> tuple[torch.Tensor, torch.Tensor]:
    loc, variance, _ = encoder(encoder_input, *covariates)
    return loc, variance.sqrt()


def _load_legacy_state(state_dict, prefix, *args) -> None:
    """Load models saved by earlier versions.

    They named ``log_inverse_dispersion`` ``log_dispersion``, and their encoders normalised
    every cell to ``LEGACY_ENCODER_LIBRARY_SIZE`` counts without storing it.
    """
    legacy = f"{prefix}log_dispersion"
    if legacy in state_dict:
        state_dict[f"{prefix}log_inverse_dispersion"] = state_dict.pop(legacy)
    state_dict.setdefault(
        f"{prefix}encoder_library_size", torch.tensor(LEGACY_ENCODER_LIBRARY_SIZE)
    )


def _frozen(layer: nn.Module):
    """``layer``, called with detached parameters and copies of its buffers.

    No gradient reaches its weights, and its batch-norm running statistics stay as they are.
    """
    state = {name: value.detach() for name, value in layer.named_parameters()}
    state |= {name: value.clone() for name, value in layer.named_buffers()}
    return lambda *args: torch.func.functional_call(layer, state, args)
