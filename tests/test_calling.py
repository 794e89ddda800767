"""Target calling: the E-distance permutation test on cells the model was not trained on."""

import numpy as np
import pandas as pd
import pertpy as pt
import pytest
from _helpers import CONTROL, quick_train, setup
from anndata import AnnData

import pertpy_contrastive as pc


def test_held_out_test_uses_only_validation_cells_and_finds_the_programs(trained):
    adata, model = trained
    table = model.distance_test()
    validation_labels = adata.obs["perturbation"].iloc[model.validation_indices]
    expected_counts = validation_labels.astype(str).value_counts()
    np.testing.assert_array_equal(table["n_cells"], expected_counts.reindex(table.index))
    assert table["n_cells"].sum() == len(model.validation_indices)
    programs = adata.obs.groupby("perturbation", observed=True)["program"].first()
    effect_targets = programs.index[programs != "none"]
    null_targets = programs.index[(programs == "none") & (programs.index != CONTROL)]
    # About 20 held-out cells per target: the strong programs are found at the smallest
    # p-value 1,000 permutations give; pertpy's permutations are not seeded, hence the margin.
    assert (table.loc[effect_targets, "pvalue"] < 0.1).all()
    assert table.loc[effect_targets, "pvalue"].median() < 0.01
    assert table.loc[effect_targets, "distance"].min() > table.loc[null_targets, "distance"].max()
    assert table.loc[CONTROL, "distance"] == 0


def test_held_out_test_refuses_training_cells(trained):
    _, model = trained
    with pytest.raises(ValueError, match="training cells"):
        model.distance_test(indices=model.train_indices[:10])


def test_held_out_test_needs_held_out_cells(screen):
    setup(screen)
    model = quick_train(pc.ContrastiveVAE(screen), train_size=1.0)
    with pytest.raises(ValueError, match="train_size"):
        model.distance_test()


def _batch_confounded_null(shift_within_batches=0.0):
    """Group "A" and the controls, in two batches that differ; A sits mostly in batch 1.

    Without ``shift_within_batches`` A's cells are drawn exactly like the controls of their
    batch, so only the batch composition tells A apart.
    """
    rng = np.random.default_rng(0)
    labels = np.repeat(["A", CONTROL], [60, 240])
    batch = np.where(labels == "A", rng.random(300) < 0.8, rng.random(300) < 0.3).astype(int)
    embedding = rng.normal(size=(300, 5)) + 2.0 * batch[:, None]
    embedding[labels == "A", 0] += shift_within_batches
    obs = pd.DataFrame({"perturbation": labels, "batch": batch.astype(str)})
    obs.index = obs.index.astype(str)
    return AnnData(obs=obs, obsm={"X_latent": embedding})


def test_permutations_within_strata_keep_a_batch_confounded_null_null():
    adata = _batch_confounded_null()
    kwargs = {"groupby": "perturbation", "contrast": CONTROL, "obsm_key": "X_latent"}
    pertpy_table = pt.tl.DistanceTest("edistance", n_perms=200, obsm_key="X_latent")(
        adata, groupby="perturbation", contrast=CONTROL, show_progressbar=False
    )
    assert pertpy_table.loc["A", "pvalue"] < 0.01
    within = pc.tl.distance_test(adata, **kwargs, n_perms=200, strata_key="batch")
    assert within.loc["A", "pvalue"] > 0.05
    assert within.loc["A", "distance"] == pytest.approx(pertpy_table.loc["A", "distance"])
    assert within.loc[CONTROL, "pvalue"] == 1 and within.loc[CONTROL, "distance"] == 0
    # The same table as pertpy's: columns, types and the contrast row.
    assert within.dtypes.equals(pertpy_table.dtypes)
    assert within.loc[CONTROL].equals(pertpy_table.loc[CONTROL])
    shifted = pc.tl.distance_test(
        _batch_confounded_null(1.5), **kwargs, n_perms=200, strata_key="batch"
    )
    assert shifted.loc["A", "pvalue"] < 0.01 and shifted.loc["A", "significant_adj"]
    again = pc.tl.distance_test(adata, **kwargs, n_perms=200, strata_key="batch")
    assert again.loc["A", "pvalue"] == within.loc["A", "pvalue"]  # seeded


def test_permutations_within_strata_need_the_column_and_a_precomputable_metric():
    adata = _batch_confounded_null()
    kwargs = {"groupby": "perturbation", "contrast": CONTROL, "obsm_key": "X_latent"}
    with pytest.raises(KeyError, match="'replicate' is not a column"):
        pc.tl.distance_test(adata, **kwargs, strata_key="replicate")
    with pytest.raises(ValueError, match="precomputed distances"):
        pc.tl.distance_test(adata, **kwargs, metric="mmd", strata_key="batch")


def test_held_out_test_within_batches(trained):
    adata, model = trained
    table = model.distance_test(n_perms=200, strata_key="batch")
    programs = adata.obs.groupby("perturbation", observed=True)["program"].first()
    effect_targets = programs.index[programs != "none"]
    assert (table.loc[effect_targets, "pvalue"] < 0.05).all()
    with pytest.raises(KeyError, match="'lane' is not a column"):
        model.distance_test(strata_key="lane")
