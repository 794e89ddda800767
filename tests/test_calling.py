"""Target calling: the E-distance permutation test on cells the model was not trained on."""

import numpy as np
import pytest
from _helpers import CONTROL, quick_train, setup

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
