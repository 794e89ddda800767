"""The cross-fitted salient latent: every cell read by a model that did not train on it."""

import numpy as np
import pandas as pd
import pytest
from _helpers import CONTROL, setup, strong_program_screen

import pertpy_contrastive as pc

KEY = "X_contrastive_salient_cross_fitted"
FOLD_KEY = "contrastive_cross_fitting_fold"


@pytest.fixture(scope="module")
def cross_fitted():
    """The strong-program screen cross-fitted over 2 folds, and each fold model's cells."""
    adata = setup(strong_program_screen(), batch_key="batch")
    before = adata.copy()
    trained_on = []
    original_train = pc.ContrastiveVAE.train

    def recording_train(model, **kwargs):
        original_train(model, **kwargs)
        names = model.adata.obs_names
        trained_on.append((set(names), set(names[model.train_indices])))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pc.ContrastiveVAE, "train", recording_train)
        pc.tl.cross_fitted_salient(
            adata,
            train_kwargs={"max_epochs": 40, "batch_size": 64, "early_stopping": False},
            model_kwargs={"n_salient": 5},
        )
    return adata, before, trained_on


def test_each_cell_is_read_by_the_model_of_its_fold_which_never_trained_on_it(cross_fitted):
    adata, _, trained_on = cross_fitted
    folds = adata.obs[FOLD_KEY].astype(int).to_numpy()
    assert len(trained_on) == 2
    for fold, (model_cells, training_cells) in enumerate(trained_on):
        # The fold model holds the other folds' cells only, and trains on most of them.
        assert model_cells == set(adata.obs_names[folds != fold])
        assert training_cells <= model_cells and len(training_cells) > 0.8 * len(model_cells)
    # Every label and batch is dealt out evenly, so every target trains in both models.
    shares = pd.crosstab([adata.obs["perturbation"], adata.obs["batch"]], folds)
    assert (shares.max(axis=1) - shares.min(axis=1)).max() <= 1


def test_cross_fitted_latent_writes_only_its_keys_and_finds_the_programs(cross_fitted):
    adata, before, _ = cross_fitted
    assert set(adata.obsm) - set(before.obsm) == {KEY}
    assert set(adata.obs.columns) - set(before.obs.columns) == {FOLD_KEY}
    assert adata.obs[before.obs.columns].equals(before.obs)
    assert (adata.X != before.X).nnz == 0
    assert adata.obsm[KEY].shape == (adata.n_obs, 5) and np.isfinite(adata.obsm[KEY]).all()
    tested = adata.copy()
    tested.obs["perturbation"] = tested.obs["perturbation"].astype(str)
    table = pc.tl.distance_test(
        tested, groupby="perturbation", contrast=CONTROL, obsm_key=KEY, strata_key=FOLD_KEY
    )
    programs = adata.obs.groupby("perturbation", observed=True)["program"].first()
    effect_targets = programs.index[programs != "none"]
    null_targets = programs.index[(programs == "none") & (programs.index != CONTROL)]
    # Every cell is tested (about 250 per target), not only a held-out share.
    assert (table.loc[effect_targets, "pvalue"] < 0.01).all()
    assert table.loc[effect_targets, "distance"].min() > table.loc[null_targets, "distance"].max()


def test_cross_fitting_refuses_existing_keys_unregistered_data_and_one_fold(cross_fitted):
    adata, _, _ = cross_fitted
    latent = adata.obsm[KEY].copy()
    with pytest.raises(KeyError, match="overwrite=True"):
        pc.tl.cross_fitted_salient(adata)
    np.testing.assert_array_equal(adata.obsm[KEY], latent)
    with pytest.raises(ValueError, match="n_folds"):
        pc.tl.cross_fitted_salient(adata, n_folds=1, overwrite=True)
    with pytest.raises(ValueError, match="setup_anndata"):
        pc.tl.cross_fitted_salient(strong_program_screen())
