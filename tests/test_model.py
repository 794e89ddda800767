"""Training, latents, covariates, likelihoods, save/load and divergence of ContrastiveVAE."""

import random
import signal

import mudata as md
import numpy as np
import pyro
import pytest
import torch
from _helpers import CONTROL, quick_train, setup
from lightning.pytorch.callbacks import Callback

import pertpy_contrastive as pc
from pertpy_contrastive import _module
from pertpy_contrastive._constants import CELL_WEIGHT_KEY, CellGroup
from pertpy_contrastive._module import _categorical_covariates as covariates


def test_train_records_history_and_gives_finite_latents(screen):
    setup(screen, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen, n_salient=4, n_background=6), max_epochs=4)
    assert model.is_trained
    assert len(model.history["loss_train"]) == 4
    assert len(model.history["loss_validation"]) == 4  # early stopping validates every epoch
    salient = model.get_latent_representation(kind="salient")
    background = model.get_latent_representation(kind="background")
    assert salient.shape == (screen.n_obs, 4)
    assert background.shape == (screen.n_obs, 6)
    assert np.isfinite(salient).all() and np.isfinite(background).all()


def test_history_logs_the_elbo_and_each_penalty_apart(screen):
    """The monitored loss is the negative ELBO plus the penalties in use, each logged alone."""
    setup(screen, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen, wasserstein_weight=2.0), max_epochs=3)
    penalty_names = (
        "background_mmd",
        "salient_wasserstein",
        "salient_background_hsic",
        "control_counterfactual",
    )
    for stage in ("train", "validation"):
        terms = {
            name: model.history[f"{name}_{stage}"].to_numpy(dtype=float).ravel()
            for name in ("loss", "elbo", *penalty_names)
        }
        for name in ("background_mmd", "salient_wasserstein", "salient_background_hsic"):
            assert (terms[name] > 0).all(), name
        # The controls' negative log-likelihood under their own s, without the count-only terms:
        # what remains of each NB / ZINB log-probability is <= 0, so the term is positive.
        assert (terms["control_counterfactual"] > 0).all()
        penalties = sum(terms[name] for name in penalty_names)
        np.testing.assert_allclose(terms["loss"], terms["elbo"] + penalties, rtol=1e-5)
    unpenalised = quick_train(
        pc.ContrastiveVAE(
            screen,
            background_mmd_weight=0.0,
            independence_weight=0.0,
            counterfactual_controls=False,
        ),
        max_epochs=1,
    )
    assert not {f"{name}_train" for name in penalty_names} & set(unpenalised.history)


class _StepLosses(Callback):
    """Records every training step's loss and number of cells, by epoch."""

    def __init__(self):
        self.steps: dict[int, list[tuple[float, int]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n_cells = len(batch[CELL_WEIGHT_KEY])
        loss = float(outputs["loss"])
        self.steps.setdefault(trainer.current_epoch, []).append((loss, n_cells))


def test_history_holds_each_epochs_mean_loss_per_cell(screen):
    """The logged epoch loss is the cell-weighted mean of its steps' losses."""
    setup(screen, batch_key="batch")
    recorder = _StepLosses()
    model = quick_train(pc.ContrastiveVAE(screen), max_epochs=2, callbacks=[recorder])
    logged = model.history["loss_train"].to_numpy(dtype=float).ravel()
    expected = [
        np.average([loss for loss, _ in steps], weights=[n for _, n in steps])
        for _, steps in sorted(recorder.steps.items())
    ]
    assert len(recorder.steps[0]) > 1
    np.testing.assert_allclose(logged, expected, rtol=1e-5)


def test_training_lowers_the_validation_loss(screen):
    setup(screen, batch_key="batch")
    model = quick_train(
        pc.ContrastiveVAE(screen), max_epochs=15, early_stopping=False, check_val_every_n_epoch=1
    )
    validation = model.history["loss_validation"].to_numpy(dtype=float).ravel()
    assert validation[-1] < validation[0]


def test_controls_salient_posterior_prior_or_point_mass(screen):
    """The ELBO pulls controls' q(s) to the prior; the opt-in Wasserstein term, to the point 0."""
    setup(screen, batch_key="batch")
    responders = screen.obs["responder"].to_numpy()
    control_norm, control_scale = {}, {}
    for weight in (0.0, 5.0):
        model = pc.ContrastiveVAE(screen, wasserstein_weight=weight)
        quick_train(model, max_epochs=30, early_stopping=False)
        is_control = model.cell_groups == CellGroup.BACKGROUND
        norm = np.linalg.norm(model.get_latent_representation(kind="salient"), axis=1)
        control_norm[weight] = norm[is_control].mean()
        args = _minibatch(model, n_cells=screen.n_obs)
        _, scale = model.module.eval().encode(*args[:5])["salient"]
        control_scale[weight] = scale[torch.from_numpy(is_control)].mean().item()
        assert control_norm[weight] < 0.7 * norm[responders].mean()
    assert control_scale[0.0] > 0.7
    assert control_scale[5.0] < 0.5 * control_scale[0.0]
    assert control_norm[5.0] < 0.85 * control_norm[0.0]


def test_same_seed_same_latents(screen):
    setup(screen, batch_key="batch")
    first = quick_train(pc.ContrastiveVAE(screen, seed=3), seed=3).get_latent_representation()
    second = quick_train(pc.ContrastiveVAE(screen, seed=3), seed=3).get_latent_representation()
    third = quick_train(pc.ContrastiveVAE(screen, seed=4), seed=4).get_latent_representation()
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, third)


@pytest.mark.parametrize(
    "model_kwargs",
    [
        {"likelihood": "nb", "responder": True},
        {"salient_cross_fitting": True},
        {"counterfactual_controls": True},
        {"counterfactual_controls": "decoder", "independence_weight": 10.0},
        {"counterfactual_controls": "decoder", "counterfactual_share": 0.25},
    ],
)
def test_save_load_round_trip_is_exact(screen, tmp_path, model_kwargs):
    setup(screen, batch_key="batch", continuous_covariate_keys=["stress"])
    model = quick_train(pc.ContrastiveVAE(screen, **model_kwargs))
    model.save(tmp_path / "model", save_anndata=True)
    for loaded in (
        pc.ContrastiveVAE.load(tmp_path / "model", adata=screen),
        pc.ContrastiveVAE.load(tmp_path / "model"),
    ):
        for kind in ("salient", "background"):
            np.testing.assert_array_equal(
                loaded.get_latent_representation(kind=kind),
                model.get_latent_representation(kind=kind),
            )
        torch.testing.assert_close(
            loaded.module.log_inverse_dispersion, model.module.log_inverse_dispersion
        )
        np.testing.assert_array_equal(
            loaded.get_responder_probability(), model.get_responder_probability()
        )


def test_model_saved_before_the_responder_model_is_refused_clearly(screen, tmp_path):
    setup(screen)
    quick_train(pc.ContrastiveVAE(screen), max_epochs=1).save(tmp_path / "model")
    saved = torch.load(tmp_path / "model" / "model.pt", weights_only=False)
    del saved["attr_dict"]["registry_"]["field_registries"]["contrastive_target"]
    torch.save(saved, tmp_path / "model" / "model.pt")
    with pytest.raises(ValueError, match="saved by pertpy-contrastive 0.1.*Retrain"):
        pc.ContrastiveVAE.load(tmp_path / "model", adata=screen)


def test_model_saved_by_an_earlier_version_loads_with_its_encoder_input(screen, tmp_path):
    # Earlier versions named the dispersion log_dispersion, and their encoders scaled every cell
    # to 1e4 counts without storing that value.
    setup(screen)
    model = quick_train(pc.ContrastiveVAE(screen, encoder_library_size=1e4), max_epochs=1)
    model.save(tmp_path / "model")
    saved = torch.load(tmp_path / "model" / "model.pt", weights_only=False)
    state = saved["model_state_dict"]
    state["log_dispersion"] = state.pop("log_inverse_dispersion")
    del state["encoder_library_size"]
    torch.save(saved, tmp_path / "model" / "model.pt")
    loaded = pc.ContrastiveVAE.load(tmp_path / "model", adata=screen)
    torch.testing.assert_close(
        loaded.module.log_inverse_dispersion, model.module.log_inverse_dispersion
    )
    assert float(loaded.module.encoder_library_size) == 1e4
    np.testing.assert_array_equal(
        loaded.get_latent_representation(kind="salient"),
        model.get_latent_representation(kind="salient"),
    )


def test_encoders_scale_cells_to_the_median_depth_of_the_data(screen):
    setup(screen)
    model = pc.ContrastiveVAE(screen)
    median = np.median(np.asarray(screen.X.sum(1)).ravel())
    assert float(model.module.encoder_library_size) == pytest.approx(median)
    fixed = pc.ContrastiveVAE(screen, encoder_library_size=1e4)
    assert float(fixed.module.encoder_library_size) == 1e4


def test_damaged_or_foreign_model_directories_are_refused_clearly(screen, tmp_path):
    setup(screen)
    with pytest.raises(FileNotFoundError, match=r"No saved ContrastiveVAE.*model\.pt"):
        pc.ContrastiveVAE.load(tmp_path / "nothing")
    quick_train(pc.ContrastiveVAE(screen), max_epochs=1).save(tmp_path / "model")
    model_file = tmp_path / "model" / "model.pt"
    saved = torch.load(model_file, weights_only=False)
    saved["attr_dict"]["registry_"]["model_name"] = "SCVI"
    torch.save(saved, model_file)
    with pytest.raises(ValueError, match="holds a saved SCVI model, not a ContrastiveVAE"):
        pc.ContrastiveVAE.load(tmp_path / "model")
    model_file.write_bytes(b"\x80\xffnot a model" * 10)
    with pytest.raises(ValueError, match="model.pt is not a valid saved ContrastiveVAE"):
        pc.ContrastiveVAE.load(tmp_path / "model")


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
def test_each_likelihood_trains(screen, likelihood):
    setup(screen)
    model = quick_train(pc.ContrastiveVAE(screen, likelihood=likelihood), max_epochs=2)
    assert np.isfinite(model.history["loss_train"].to_numpy(dtype=float)).all()


def test_unknown_likelihood(screen):
    setup(screen)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        pc.ContrastiveVAE(screen, likelihood="gaussian")


def test_unknown_counterfactual_controls_mode(screen):
    setup(screen)
    with pytest.raises(ValueError, match="counterfactual_controls must be one of"):
        pc.ContrastiveVAE(screen, counterfactual_controls="encoder")


@pytest.mark.parametrize("share", [0.0, 1.5])
def test_counterfactual_share_out_of_range(screen, share):
    setup(screen)
    with pytest.raises(ValueError, match=r"counterfactual_share must be in \(0, 1\]"):
        pc.ContrastiveVAE(screen, counterfactual_controls="decoder", counterfactual_share=share)


def _counterfactual_inputs(screen):
    """A module in eval mode, one minibatch's arguments and fixed random latents for it."""
    setup(screen)
    model = pc.ContrastiveVAE(screen, n_hidden=16, counterfactual_controls="decoder")
    module = model.module.eval()  # batch norm at its running statistics: rows do not interact
    tensors = next(iter(model._make_data_loader(adata=screen, batch_size=256)))
    args, _ = module._get_fn_args_from_batch(tensors)
    torch.manual_seed(0)
    z = torch.randn(args.x.shape[0], module.n_background)
    s = torch.randn(args.x.shape[0], module.n_salient)
    module.last_penalties = {}  # what the guide resets at every step
    return module, args, z, s


def test_counterfactual_share_scores_the_controls_of_a_weighted_subset_alike(screen):
    module, args, z, s = _counterfactual_inputs(screen)
    is_control = args.group == CellGroup.BACKGROUND
    n_controls = int(is_control.sum())

    def counterfactual_factor():
        return _counterfactual_factor(module, args, z, s, None)

    everyone = counterfactual_factor()
    assert (everyone[is_control] != 0).all()
    assert (everyone[~is_control] == 0).all()
    module.counterfactual_share = 0.25
    draws = torch.stack([counterfactual_factor() for _ in range(400)])
    # Each draw decodes a quarter of the cells and scores the controls among them, weighted by
    # the inverse of that share ...
    n_cells = args.x.shape[0]
    scored = draws != 0
    assert (scored & ~is_control).sum() == 0
    assert 0 < scored.sum(-1).float().mean() < n_controls
    inverse_share = n_cells / round(0.25 * n_cells)
    torch.testing.assert_close(draws[scored], inverse_share * everyone.expand_as(draws)[scored])
    # ... so that the total's expectation is the full term's.
    relative_error = (draws.sum(-1).mean() - everyone.sum()).abs() / everyone.sum().abs()
    assert relative_error < 0.04


def _counterfactual_factor(module, args, z, s, responder_weight):
    """Per-cell factor of the counterfactual term, for one minibatch and fixed latents."""
    with pyro.poutine.trace() as trace, pyro.plate("cells", args.x.shape[0]):
        module._score_controls_counterfactually(
            args.x,
            z,
            s,
            args.group,
            args.cont_covs,
            args.x.sum(-1, keepdim=True).log(),
            covariates(args.batch_index, args.cat_covs),
            None,
            responder_weight,
        )
    return trace.trace.nodes["control_counterfactual"]["fn"].log_factor.detach()


def test_refinement_scores_a_target_cell_like_a_control_by_its_probability_of_not_responding(
    screen,
):
    module, args, z, s = _counterfactual_inputs(screen)
    n_cells = args.x.shape[0]
    is_control = args.group == CellGroup.BACKGROUND
    is_target = args.group == CellGroup.TARGET
    assert is_control.any() and is_target.any()

    controls_only = _counterfactual_factor(module, args, z, s, None)
    every_cell_a_control = _counterfactual_factor(module, args, z, s, torch.zeros(n_cells))
    responder_weight = torch.rand(n_cells)
    refined = _counterfactual_factor(module, args, z, s, responder_weight)
    assert (controls_only[is_target] == 0).all()
    assert (every_cell_a_control[is_target] != 0).all()
    # Controls are scored as before, whatever the targets' weights ...
    torch.testing.assert_close(every_cell_a_control[is_control], controls_only[is_control])
    torch.testing.assert_close(refined[is_control], controls_only[is_control])
    # ... and a target cell by its probability of being a non-responder.
    torch.testing.assert_close(
        refined[is_target], (1 - responder_weight[is_target]) * every_cell_a_control[is_target]
    )
    all_respond = _counterfactual_factor(module, args, z, s, torch.ones(n_cells))
    assert (all_respond[is_target] == 0).all()


@pytest.mark.parametrize("salient_effect", ["nonlinear", "additive"])
@pytest.mark.parametrize("frozen", [False, True])
def test_decoding_some_rows_equals_decoding_all_then_selecting(screen, salient_effect, frozen):
    # The counterfactual pass normalises every row of the step but decodes the controls' genes
    # only; in training mode (batch statistics) that must be the full decode, then a selection.
    setup(screen)
    model = pc.ContrastiveVAE(screen, n_hidden=16, salient_effect=salient_effect)
    module = model.module.double().train()
    tensors = next(iter(model._make_data_loader(adata=screen, batch_size=64)))
    args, _ = module._get_fn_args_from_batch(tensors)
    torch.manual_seed(0)
    z = torch.randn(args.x.shape[0], module.n_background, dtype=torch.float64)
    s = torch.randn(args.x.shape[0], module.n_salient, dtype=torch.float64, requires_grad=True)
    log_library = args.x.double().sum(-1, keepdim=True).log()
    rows = args.group == CellGroup.BACKGROUND
    assert 0 < rows.sum() < rows.numel()

    def decode(selected):
        module.zero_grad()
        s.grad = None
        decoded = module._decode(
            z,
            s,
            args.cont_covs.double(),
            log_library,
            covariates(args.batch_index, args.cat_covs),
            frozen=frozen,
            rows=selected,
        )
        if selected is None:
            decoded = tuple(value[rows] for value in decoded)
        (decoded[0].log().sum() + decoded[1].sum()).backward()
        gradients = [s.grad.clone()]
        gradients += [p.grad.clone() for p in module.decoder.parameters() if p.grad is not None]
        return decoded, gradients

    (rate, gate_logits), gradients = decode(None)
    (rate_rows, gate_logits_rows), gradients_rows = decode(rows)
    torch.testing.assert_close(rate_rows, rate)
    torch.testing.assert_close(gate_logits_rows, gate_logits)
    # A frozen decoder passes a gradient to s alone.
    assert (len(gradients) == 1) == frozen
    for expected, actual in zip(gradients, gradients_rows, strict=True):
        torch.testing.assert_close(actual, expected)


def test_latent_library_size(screen):
    setup(screen, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen, use_observed_library=False))
    assert model.module.library_log_means.shape == (2,)
    assert np.isfinite(model.get_latent_representation()).all()


def _minibatch(model, n_cells=16):
    loader = model._make_data_loader(model.adata, indices=np.arange(n_cells), batch_size=n_cells)
    args, _ = model.module._get_fn_args_from_batch(next(iter(loader)))
    return list(args)


def test_covariates_reach_encoders_and_decoder(screen):
    setup(
        screen,
        batch_key="batch",
        categorical_covariate_keys=["subclone"],
        continuous_covariate_keys=["stress"],
    )
    model = quick_train(pc.ContrastiveVAE(screen), max_epochs=1)
    module = model.module.eval()
    x, group, batch_index, cat_covs, cont_covs, _ = _minibatch(model)
    with torch.no_grad():
        reference = module.encode(x, group, batch_index, cat_covs, cont_covs)
        z, s = reference["background"][0], reference["salient"][0]
        library = x.sum(-1, keepdim=True).log()
        rate = module._decode(z, s, cont_covs, library, covariates(batch_index, cat_covs))[0]
        changes = {
            "batch": (1 - batch_index, cat_covs, cont_covs),
            "categorical": (batch_index, (cat_covs + 1) % 3, cont_covs),
            "continuous": (batch_index, cat_covs, cont_covs + 1.0),
        }
        for name, (b, c, k) in changes.items():
            encoded = module.encode(x, group, b, c, k)
            for latent in ("background", "salient"):
                assert not torch.allclose(encoded[latent][0], reference[latent][0]), (name, latent)
            decoded = module._decode(z, s, k, library, covariates(b, c))[0]
            assert not torch.allclose(decoded, rate), name


def test_encoders_ignore_the_label_unless_asked(screen):
    setup(screen)
    model = quick_train(pc.ContrastiveVAE(screen), max_epochs=1)
    x, group, *rest = _minibatch(model)[:5]
    flipped = torch.full_like(group, CellGroup.BACKGROUND)
    module = model.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            module.encode(x, group, *rest)["salient"][0],
            module.encode(x, flipped, *rest)["salient"][0],
        )

    aware = quick_train(pc.ContrastiveVAE(screen, salient_encoder_sees_group=True), max_epochs=1)
    module = aware.module.eval()
    x, group, *rest = _minibatch(aware)[:5]
    group = torch.full_like(group, CellGroup.TARGET)
    with torch.no_grad():
        assert not torch.allclose(
            module.encode(x, group, *rest)["salient"][0],
            module.encode(x, torch.full_like(group, CellGroup.BACKGROUND), *rest)["salient"][0],
        )


def test_excluded_cells_are_not_trained_on_but_get_latents(screen):
    screen.obs["perturbation"] = screen.obs["perturbation"].astype(str)
    screen.obs.iloc[:50, screen.obs.columns.get_loc("perturbation")] = np.nan
    screen.obs.iloc[50:80, screen.obs.columns.get_loc("perturbation")] = "multiple"
    setup(screen, exclude=["multiple"], batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen))
    groups = model.cell_groups
    assert (groups[:80] == CellGroup.EXCLUDED).all()
    trained_on = np.concatenate([model.train_indices, model.validation_indices])
    assert not np.isin(np.arange(80), trained_on).any()
    assert np.isfinite(model.get_latent_representation()[:80]).all()


def test_mudata_modality(screen):
    mdata = md.MuData({"rna": screen})
    setup(mdata, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(mdata))
    np.testing.assert_array_equal(
        model.get_latent_representation(mdata), model.get_latent_representation(screen)
    )


def test_latents_for_new_data_without_labels(screen):
    setup(screen, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen))
    new = screen[:100].copy()
    expected = model.get_latent_representation(indices=np.arange(100))
    del new.obs["perturbation"]
    for key in list(new.obs):
        if key.startswith("_scvi"):
            del new.obs[key]
    del new.uns["_scvi_uuid"], new.uns["_scvi_manager_uuid"]
    np.testing.assert_allclose(model.get_latent_representation(new), expected, atol=1e-5)


def test_posterior_sample_differs_from_mean(screen):
    setup(screen)
    model = quick_train(pc.ContrastiveVAE(screen), max_epochs=1)
    mean = model.get_latent_representation()
    sample = model.get_latent_representation(give_mean=False)
    assert sample.shape == mean.shape and not np.allclose(sample, mean)
    with pytest.raises(ValueError, match="kind must be one of"):
        model.get_latent_representation(kind="z")


def test_untrained_model_gives_no_latents(screen):
    setup(screen)
    with pytest.raises(RuntimeError, match="train"):
        pc.ContrastiveVAE(screen).get_latent_representation()


def _poison_likelihood(monkeypatch):
    real = _module.count_distribution

    def nan_rate(likelihood, mean, theta, gate_logits):
        return real(likelihood, mean * torch.nan, theta, gate_logits)

    monkeypatch.setattr(_module, "count_distribution", nan_rate)


def test_nan_loss_stops_with_advice_and_no_nan_latents(screen, monkeypatch):
    setup(screen)
    model = quick_train(pc.ContrastiveVAE(screen), max_epochs=2)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    latent = model.get_latent_representation()

    _poison_likelihood(monkeypatch)
    with pytest.raises(pc.TrainingDivergedError, match="lower learning rate"):
        quick_train(model, max_epochs=2)
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(value, before[key])
    np.testing.assert_array_equal(model.get_latent_representation(), latent)

    fresh = pc.ContrastiveVAE(screen)
    with pytest.raises(pc.TrainingDivergedError):
        quick_train(fresh, max_epochs=2)
    with pytest.raises(RuntimeError, match="train"):
        fresh.get_latent_representation()
    assert CONTROL in screen.obs["perturbation"].to_numpy()


def test_group_mmd_detects_a_shift_between_controls_and_targets():
    generator = torch.Generator().manual_seed(0)
    controls = torch.randn(200, 5, generator=generator)
    targets = torch.randn(200, 5, generator=generator)
    group = torch.cat([torch.zeros(200), torch.ones(200)]).long()
    same = _module._group_mmd(torch.cat([controls, targets]), group)
    shifted = _module._group_mmd(torch.cat([controls, targets + 1.0]), group)
    assert 0 <= same < 0.05 < shifted
    only_controls = torch.zeros(400, dtype=torch.long)
    assert _module._group_mmd(torch.cat([controls, targets + 1.0]), only_controls) == 0


def test_hsic_detects_dependence_whatever_the_latents_scale():
    generator = torch.Generator().manual_seed(0)
    salient = torch.randn(200, 5, generator=generator)
    background = torch.randn(200, 4, generator=generator)
    independent = _module._hsic(salient, background)
    dependent = _module._hsic(salient, salient[:, :4] + 0.5 * background)
    assert 0 <= independent < dependent / 4
    # Standardised: shrinking the salient latent cannot lower the penalty.
    torch.testing.assert_close(_module._hsic(0.01 * salient, background), independent)
    assert _module._hsic(salient[:1], background[:1]) == 0


def test_independence_penalty_is_logged_apart(screen):
    setup(screen, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen, independence_weight=10.0), max_epochs=2)
    assert (model.history["salient_background_hsic_train"].to_numpy(dtype=float) > 0).all()


def test_counterfactual_controls_term_is_logged_apart_from_the_elbo(screen):
    setup(screen, batch_key="batch")
    model = quick_train(
        pc.ContrastiveVAE(screen, counterfactual_controls=True, independence_weight=0.0),
        max_epochs=2,
    )
    for stage in ("train", "validation"):
        terms = {
            name: model.history[f"{name}_{stage}"].to_numpy(dtype=float).ravel()
            for name in ("loss", "elbo", "background_mmd", "control_counterfactual")
        }
        # The controls' negative log-likelihood under their own s: positive, and not the ELBO's.
        assert (terms["control_counterfactual"] > 0).all()
        added = terms["background_mmd"] + terms["control_counterfactual"]
        np.testing.assert_allclose(terms["loss"], terms["elbo"] + added, rtol=1e-5)


def test_background_mmd_enters_the_loss_once_per_step(screen):
    setup(screen, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen), max_epochs=1)
    # In float64, so that the difference of two losses in the thousands keeps its precision.
    module = model.module.eval().double()
    args = [arg.double() if arg.is_floating_point() else arg for arg in _minibatch(model, 64)]
    background_loc = module.encode(*args[:5])["background"][0]
    mmd = _module._group_mmd(background_loc, args[1])
    losses = {}
    for weight in (0.0, 7.0):
        module.background_mmd_weight = weight
        pyro.set_rng_seed(0)
        losses[weight] = pyro.infer.Trace_ELBO().differentiable_loss(
            module.model, module.guide, *args
        )
    assert mmd > 0
    torch.testing.assert_close(losses[7.0] - losses[0.0], 7.0 * mmd, rtol=1e-6, atol=1e-6)


def test_responder_model_trains_the_background_encoder_on_controls_only(screen):
    setup(screen)

    def background_encoder_gradient(responder, groups):
        model = pc.ContrastiveVAE(
            screen, n_hidden=16, background_mmd_weight=0.0, responder=responder
        )
        module = model.module
        tensors = next(iter(model._make_data_loader(adata=screen, batch_size=256)))
        args, _ = module._get_fn_args_from_batch(tensors)
        keep = torch.isin(args.group, torch.tensor(groups))
        args = args._make(value[keep] for value in args)
        loss = pyro.infer.Trace_ELBO().differentiable_loss(module.model, module.guide, *args)
        loss.backward()
        return sum(
            p.grad.abs().sum() for p in module.background_encoder.parameters() if p.grad is not None
        )

    targets_only = [CellGroup.TARGET]
    assert background_encoder_gradient(True, targets_only) == 0
    assert background_encoder_gradient(False, targets_only) > 0
    assert background_encoder_gradient(True, [CellGroup.TARGET, CellGroup.BACKGROUND]) > 0


def test_cross_fitted_salient_encoders_never_read_the_cells_they_train_on(screen):
    setup(screen)
    model = pc.ContrastiveVAE(screen, n_hidden=16, salient_cross_fitting=True)
    module = model.module
    encoders = (module.salient_encoder, module.second_salient_encoder)
    tensors = next(iter(model._make_data_loader(adata=screen, batch_size=256)))
    args, _ = module._get_fn_args_from_batch(tensors)
    parity = torch.remainder(args.x.sum(-1).round(), 2).long()
    assert 0 < parity.sum() < len(parity)

    def salient_gradients(cells):
        module.zero_grad()
        half = args._make(value[cells] for value in args)
        loss = pyro.infer.Trace_ELBO().differentiable_loss(module.model, module.guide, *half)
        loss.backward()
        return [
            sum(p.grad.abs().sum() for p in e.parameters() if p.grad is not None) for e in encoders
        ]

    # Cells of parity k train encoder 1 - k only ...
    assert salient_gradients(parity == 0)[0] == 0 < salient_gradients(parity == 0)[1]
    assert salient_gradients(parity == 1)[1] == 0 < salient_gradients(parity == 1)[0]
    # ... and every output reads them with encoder k.
    module.eval()
    with torch.no_grad():
        salient = module.encode(*args.encoder_inputs)["salient"][0]
        for k, encoder in enumerate(encoders):
            cells = parity == k
            x, _, batch_index, cat_covs, _ = (v[cells] for v in args.encoder_inputs)
            scaled = (x * module.encoder_library_size / x.sum(-1, keepdim=True)).log1p()
            expected = encoder(scaled, *covariates(batch_index, cat_covs))[0]
            torch.testing.assert_close(salient[cells], expected)


@pytest.mark.parametrize(
    ("mode", "trained"),
    [(True, ("salient",)), ("decoder", ("salient", "decoder"))],
)
def test_counterfactual_controls_train_only_what_they_name(screen, mode, trained):
    setup(screen)
    model = pc.ContrastiveVAE(screen, n_hidden=16, background_mmd_weight=0.0)
    module = model.module
    tensors = next(iter(model._make_data_loader(adata=screen, batch_size=256)))
    args, _ = module._get_fn_args_from_batch(tensors)

    def step(counterfactual, group):
        """Loss, gradients by part, and the decoder's batch-norm statistics after one step."""
        module.counterfactual_controls = counterfactual
        module.zero_grad()
        cells = args.group == group
        torch.manual_seed(0)
        loss = pyro.infer.Trace_ELBO().differentiable_loss(
            module.model, module.guide, *args._make(value[cells] for value in args)
        )
        loss.backward()
        parts = {
            "salient": module.salient_encoder,
            "background": module.background_encoder,
            "decoder": module.decoder,
        }
        gradients = {
            name: torch.cat([p.grad.flatten() for p in part.parameters() if p.grad is not None])
            for name, part in parts.items()
        }
        gradients["dispersion"] = module.log_inverse_dispersion.grad.clone()
        statistics = [b.clone() for b in module.decoder.buffers()]
        return loss.detach(), gradients, statistics

    buffers = {name: b.clone() for name, b in module.named_buffers()}
    _, plain, plain_statistics = step(False, CellGroup.BACKGROUND)
    module.load_state_dict(buffers, strict=False)
    _, counterfactual, statistics = step(mode, CellGroup.BACKGROUND)
    # Controls' counts scored through their own s move the parts the mode names ...
    for name in trained:
        assert not torch.allclose(plain[name], counterfactual[name])
    # ... and nothing else: z's encoder and the dispersions, and the decoder's batch-norm
    # statistics unless the decoder is trained.
    for name in {"decoder", "background", "dispersion"} - set(trained):
        torch.testing.assert_close(plain[name], counterfactual[name])
    if "decoder" not in trained:
        for before, after in zip(plain_statistics, statistics, strict=True):
            torch.testing.assert_close(before, after)
    # Perturbed cells are scored as before.
    module.load_state_dict(buffers, strict=False)
    plain_loss, *_ = step(False, CellGroup.TARGET)
    module.load_state_dict(buffers, strict=False)
    counterfactual_loss, *_ = step(mode, CellGroup.TARGET)
    torch.testing.assert_close(plain_loss, counterfactual_loss)


class _InterruptDuringEpoch(Callback):
    """Raises KeyboardInterrupt, as Ctrl-C does, after the first step of a training epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_end(self, trainer, *args):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def test_interrupted_training_keeps_a_usable_model(screen):
    setup(screen, batch_key="batch")
    model = pc.ContrastiveVAE(screen)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.warns(UserWarning, match="interrupted after 2 completed epochs"):
        quick_train(model, max_epochs=10, callbacks=[_InterruptDuringEpoch(2)])
    assert model.is_trained
    assert len(model.history["loss_train"]) == 2
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning had set it to SIG_IGN
    assert np.isfinite(model.get_latent_representation(kind="salient")).all()
    assert len(model.train_indices) + len(model.validation_indices) == screen.n_obs


def test_training_leaves_the_global_random_state_alone(screen):
    setup(screen, batch_key="batch")
    random.seed(7)
    np.random.seed(7)  # noqa: NPY002
    torch.manual_seed(7)
    expected = random.random(), np.random.random(), torch.rand(1).item()  # noqa: NPY002
    random.seed(7)
    np.random.seed(7)  # noqa: NPY002
    torch.manual_seed(7)
    quick_train(pc.ContrastiveVAE(screen), max_epochs=1)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected  # noqa: NPY002
