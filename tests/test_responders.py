"""The responder variable: exact marginalisation, posterior probabilities, calls and fractions."""

import numpy as np
import pyro
import pytest
import torch
from _helpers import CONTROL, quick_train, setup, strong_program_screen
from pyro import poutine
from scvi.distributions._negative_binomial import log_nb_positive
from sklearn.metrics import roc_auc_score

import pertpy_contrastive as pc
from pertpy_contrastive._constants import CellGroup


def test_probabilities_are_probabilities_and_zero_for_controls(trained):
    adata, model = trained
    probability = adata.obs["contrastive_p_perturbed"].to_numpy()
    assert np.isfinite(probability).all()
    assert ((probability >= 0) & (probability <= 1)).all()
    controls = (adata.obs["perturbation"] == CONTROL).to_numpy()
    assert (probability[controls] == 0).all()
    # Reproducible: the cross-fitting folds are seeded.
    np.testing.assert_array_equal(model.get_responder_probability(), probability)


def test_escapers_low_responders_high(trained):
    adata, _ = trained
    obs = adata.obs
    probability = obs["contrastive_p_perturbed"].to_numpy()
    effect = ((obs["perturbation"] != CONTROL) & (obs["program"] != "none")).to_numpy()
    responders = obs["responder"].to_numpy()
    escapers = obs["escaped"].to_numpy()
    assert roc_auc_score(responders[effect], probability[effect]) > 0.9
    assert np.median(probability[responders]) > 0.8
    assert np.median(probability[escapers & effect]) < 0.2


def test_mixscape_vocabulary(trained):
    adata, _ = trained
    obs = adata.obs
    probability = obs["contrastive_p_perturbed"].to_numpy()
    labels = obs["perturbation"].astype(str).to_numpy()
    global_class = obs["contrastive_class_global"].astype(str).to_numpy()
    target_class = obs["contrastive_class"].astype(str).to_numpy()
    controls = labels == CONTROL
    assert set(global_class) == {"NT", "NP", "KO"}
    assert (global_class[controls] == "NT").all() and (target_class[controls] == "NT").all()
    knocked_out = ~controls & (probability > 0.5)
    assert (global_class[knocked_out] == "KO").all()
    assert (global_class[~controls & ~knocked_out] == "NP").all()
    expected = np.char.add(np.char.add(labels[~controls], " "), global_class[~controls])
    np.testing.assert_array_equal(target_class[~controls], expected)


def test_responder_fractions_per_target_and_guide(trained):
    adata, model = trained
    fractions = adata.uns["contrastive_responder_fractions"]
    targets = sorted(set(adata.obs["perturbation"].astype(str)) - {CONTROL})
    assert list(fractions.index) == targets
    assert (fractions["ci_low"] <= fractions["responder_fraction"]).all()
    assert (fractions["responder_fraction"] <= fractions["ci_high"]).all()
    assert fractions["n_cells"].sum() == (adata.obs["perturbation"] != CONTROL).sum()
    # Effect targets respond far more often than null targets (which only lose one gene).
    programs = adata.uns["simulation"]["target_program"]
    effect = [t for t in targets if programs[t] != "none"]
    null = [t for t in targets if programs[t] == "none"]
    assert (
        fractions.loc[effect, "responder_fraction"].min()
        > fractions.loc[null, "responder_fraction"].max()
    )

    by_guide = model.get_responder_fractions(by="guide")
    for target in effect:
        efficient, inefficient = by_guide.loc[f"{target}_g1"], by_guide.loc[f"{target}_g2"]
        assert efficient["target"] == target
        assert efficient["responder_fraction"] > inefficient["responder_fraction"]


def test_pseudobulk_keeps_called_responders(trained):
    adata, _ = trained
    pseudobulk = pc.tl.responder_pseudobulk(
        adata, sample_key="batch", responders="posterior", min_cells=1
    )
    target = next(t for t, p in adata.uns["simulation"]["target_program"].items() if p == "P0")
    called = (adata.obs["perturbation"] == target) & (adata.obs["contrastive_p_perturbed"] > 0.5)
    kept = pseudobulk.obs.loc[pseudobulk.obs["perturbation"] == target, "n_cells"].sum()
    assert kept == called.sum() > 0


def test_unlabelled_cells_get_nan_and_no_class(screen):
    labels = screen.obs["perturbation"].astype(object)
    labels.iloc[:40] = None
    screen.obs["perturbation"] = labels.astype("category")
    setup(screen, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen, n_hidden=16))
    model.write_outputs()
    probability = screen.obs["contrastive_p_perturbed"].to_numpy()
    assert np.isnan(probability[:40]).all()
    assert np.isfinite(probability[40:]).all()
    assert screen.obs["contrastive_class_global"].iloc[:40].isna().all()


def test_loss_sums_the_responder_exactly(screen):
    """Against the mixture written out in probability space, in float64, on a tiny model."""
    screen = screen[:, :6].copy()
    screen = screen[np.asarray(screen.X.sum(1)).ravel() > 0].copy()
    setup(screen)
    # The ELBO alone: the training penalties and the controls' counterfactual term are off.
    model = pc.ContrastiveVAE(
        screen,
        n_hidden=8,
        n_salient=2,
        n_background=2,
        likelihood="nb",
        responder=True,
        independence_weight=0,
        counterfactual_controls=False,
    )
    module = model.module.double().eval()
    with torch.no_grad():
        module.responder_logits.copy_(torch.tensor([-1.0, 0.5, 0.0, 1.0, 2.0, -0.3]))
        module.target_salient_loc.normal_()
    tensors = next(iter(model._make_data_loader(adata=screen, batch_size=64)))
    tensors = {key: value.double() for key, value in tensors.items()}
    args, kwargs = module._get_fn_args_from_batch(tensors)
    x, group, batch_index, cat_covs, cont_covs, target = args

    pyro.set_rng_seed(0)
    guide_trace = poutine.trace(module.guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()

    z = guide_trace.nodes["background"]["value"]
    s = guide_trace.nodes["salient"]["value"]
    log_library = x.sum(-1, keepdim=True).log()
    covariates = (batch_index,)
    theta = module.log_inverse_dispersion.exp()

    def likelihood(salient):  # p(x | z, salient), product over genes, in probability space
        rate, _ = module._decode(z, salient, cont_covs, log_library, covariates)
        return log_nb_positive(x, rate, theta).sum(-1).exp()

    def normal_density(value, loc, scale):
        return torch.distributions.Normal(loc, scale).log_prob(value).sum(-1).exp()

    is_target = group == CellGroup.TARGET
    pi = torch.sigmoid(module.responder_logits[target.clamp(min=0)])
    loc = module.target_salient_loc[target.clamp(min=0)]
    standard = normal_density(s, 0.0, 1.0)
    salient_loc, salient_scale = module.encode(x, group, batch_index, cat_covs, cont_covs)[
        "salient"
    ]
    guide_density = normal_density(s, salient_loc, salient_scale)
    escaped = (1 - pi) * guide_density * likelihood(torch.zeros_like(s))
    responded = pi * normal_density(s, loc, module.responder_salient_scale) * likelihood(s)
    joint = torch.where(is_target, escaped + responded, standard * likelihood(torch.zeros_like(s)))
    expected = (
        joint.log().sum()
        + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
        - guide_trace.log_prob_sum()
    )
    assert is_target.any() and (~is_target).any()
    torch.testing.assert_close(elbo, expected, rtol=1e-9, atol=1e-6)


def test_additive_salient_effect_is_a_shift_along_unit_directions(screen):
    setup(screen, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen, n_hidden=16, salient_effect="additive"))
    effect = model.get_perturbation_effect()
    salient = model.get_latent_representation(kind="salient")
    directions = torch.nn.functional.normalize(model.module.salient_loadings.detach(), dim=-1)
    expected = salient @ directions.numpy()
    perturbed = model.cell_groups == CellGroup.TARGET
    # log rho(z, s) - log rho(z, 0) = W s - (a constant per cell, from the softmax).
    centred = effect - effect.mean(1, keepdims=True)
    np.testing.assert_allclose(
        centred[perturbed], (expected - expected.mean(1, keepdims=True))[perturbed], atol=1e-3
    )
    assert np.abs(centred[perturbed]).max() > 1e-3
    with pytest.raises(ValueError, match="salient_effect must be one of"):
        pc.ContrastiveVAE(screen, salient_effect="linear")


def test_learned_responder_scale_trains_and_saves(screen, tmp_path):
    setup(screen, batch_key="batch")
    model = pc.ContrastiveVAE(screen, n_hidden=16, responder=True, responder_salient_scale=None)
    quick_train(model)
    assert model.module.target_salient_log_scale.shape == (model.summary_stats.n_targets,)
    model.save(tmp_path / "model")
    loaded = pc.ContrastiveVAE.load(tmp_path / "model", adata=screen)
    torch.testing.assert_close(
        loaded.module.target_salient_log_scale, model.module.target_salient_log_scale
    )


def test_posterior_fraction_matches_the_true_responder_fraction(trained):
    """The cross-fitted posterior is calibrated in aggregate on a strong screen."""
    adata, _ = trained
    obs = adata.obs
    targeting = (obs["perturbation"] != CONTROL).to_numpy()
    probability = obs["contrastive_p_perturbed"].to_numpy()[targeting]
    truth = obs["responder"].to_numpy()[targeting]
    assert abs(probability.mean() - truth.mean()) < 0.05


def test_refinement_loss_weights_the_two_reconstructions_by_the_fixed_responder_probability(
    screen,
):
    """The plain model with fixed q(y = 1) = w, against the ELBO written out, on a tiny model."""
    screen = screen[:, :6].copy()
    screen = screen[np.asarray(screen.X.sum(1)).ravel() > 0].copy()
    setup(screen)
    model = pc.ContrastiveVAE(
        screen,
        n_hidden=8,
        n_salient=2,
        n_background=2,
        likelihood="nb",
        background_mmd_weight=0,
        independence_weight=0,
        counterfactual_controls=False,
    )
    module = model.module.double().eval()
    tensors = next(iter(model._make_data_loader(adata=screen, batch_size=64)))
    tensors = {key: value.double() for key, value in tensors.items()}
    args, kwargs = module._get_fn_args_from_batch(tensors)
    x, group, batch_index, cont_covs = args.x, args.group, args.batch_index, args.cont_covs
    weight = torch.linspace(0.0, 1.0, len(x), dtype=torch.float64)

    def elbo_and_trace(responder_weight):
        pyro.set_rng_seed(0)
        weights = {**kwargs, "responder_weight": responder_weight}
        guide_trace = poutine.trace(module.guide).get_trace(*args, **weights)
        model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(
            *args, **weights
        )
        return model_trace.log_prob_sum() - guide_trace.log_prob_sum(), guide_trace

    elbo, guide_trace = elbo_and_trace(weight)
    z = guide_trace.nodes["background"]["value"]
    s = guide_trace.nodes["salient"]["value"]
    theta = module.log_inverse_dispersion.exp()

    def log_likelihood(salient):
        rate, _ = module._decode(
            z, salient, cont_covs, x.sum(-1, keepdim=True).log(), (batch_index,)
        )
        return log_nb_positive(x, rate, theta).sum(-1)

    is_target = group == CellGroup.TARGET
    unperturbed = log_likelihood(torch.zeros_like(s))
    reconstruction = torch.where(
        is_target, weight * log_likelihood(s) + (1 - weight) * unperturbed, unperturbed
    )
    standard = torch.distributions.Normal(0.0, 1.0)
    expected = (
        reconstruction.sum()
        + standard.log_prob(z).sum()
        + standard.log_prob(s).sum()
        - guide_trace.log_prob_sum()
    )
    assert is_target.any() and (~is_target).any()
    torch.testing.assert_close(elbo, expected, rtol=1e-9, atol=1e-6)
    # Every cell a responder is the plain contrastive VAE.
    plain, _ = elbo_and_trace(None)
    torch.testing.assert_close(elbo_and_trace(torch.ones_like(weight))[0], plain)


def _training_escaper_gap(adata, model) -> float:
    """Mean salient norm of training escapers less that of training controls."""
    norm = np.linalg.norm(model.get_latent_representation(kind="salient"), axis=1)
    training = np.zeros(adata.n_obs, dtype=bool)
    training[model.train_indices] = True
    escapers = adata.obs["escaped"].to_numpy() & training
    controls = (model.cell_groups == CellGroup.BACKGROUND) & training
    return float(norm[escapers].mean() - norm[controls].mean())


PLAIN_MODEL = {"counterfactual_controls": False, "independence_weight": 0.0}


def test_responder_refinement_stops_the_salient_latent_fitting_escapers_noise():
    """Training escapers' salient latent moves to the training controls'; the stage is logged."""
    adata = strong_program_screen()
    setup(adata, batch_key="batch")
    gaps = {}
    for refinement in (0, 20):
        model = pc.ContrastiveVAE(adata, seed=0, **PLAIN_MODEL)
        model.train(
            max_epochs=40,
            batch_size=64,
            early_stopping=False,
            enable_progress_bar=False,
            n_epochs_responder_refinement=refinement,
        )
        gaps[refinement] = _training_escaper_gap(adata, model)
        assert model.epochs_trained == 40 + refinement
    assert gaps[0] > 0.1, gaps
    assert gaps[20] < 0.5 * gaps[0], gaps


def test_default_training_puts_training_escapers_where_training_controls_sit():
    """The controls' counterfactual term removes the plain model's noise-fitting gap."""
    adata = strong_program_screen()
    setup(adata, batch_key="batch")
    gaps = {}
    for name, arguments in (("plain", PLAIN_MODEL), ("default", {})):
        model = pc.ContrastiveVAE(adata, seed=0, **arguments)
        model.train(max_epochs=40, batch_size=64, early_stopping=False, enable_progress_bar=False)
        gaps[name] = _training_escaper_gap(adata, model)
    assert gaps["plain"] > 0.1, gaps
    assert abs(gaps["default"]) < 0.5 * gaps["plain"], gaps


def test_refinement_with_the_defaults_trains_non_responders_like_controls_without_collapse():
    """With the controls' counterfactual term, refined non-responders get it too.

    Without it, refinement with the defaults collapsed the salient latent: non-responders' s
    was pulled to the prior while controls' kept fitting noise through the decoder.
    """
    adata = strong_program_screen()
    setup(adata, batch_key="batch")
    model = pc.ContrastiveVAE(adata, seed=0)
    model.train(
        max_epochs=40,
        batch_size=64,
        early_stopping=False,
        enable_progress_bar=False,
        n_epochs_responder_refinement=20,
    )
    norm = np.linalg.norm(model.get_latent_representation(kind="salient"), axis=1)
    training = np.zeros(adata.n_obs, dtype=bool)
    training[model.train_indices] = True
    controls = (model.cell_groups == CellGroup.BACKGROUND) & training
    escapers = adata.obs["escaped"].to_numpy() & training
    responders = adata.obs["responder"].to_numpy() & training
    assert norm[controls].mean() > 0.5, norm[controls].mean()
    assert abs(norm[escapers].mean() - norm[controls].mean()) < 0.2
    assert norm[responders].mean() > norm[escapers].mean() + 0.2


def test_responder_refinement_is_for_the_plain_model(screen):
    setup(screen)
    model = pc.ContrastiveVAE(screen, n_hidden=8, responder=True)
    with pytest.raises(ValueError, match="refines the plain model"):
        quick_train(model, n_epochs_responder_refinement=2)
    assert not model.is_trained
