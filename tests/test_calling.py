"""Target calling: the E-distance permutation test of every cell against the contrast controls."""

import numpy as np
import pandas as pd
import pertpy as pt
import pytest
from _helpers import CONTROL, quick_train, setup
from anndata import AnnData

import pertpy_contrastive as pc
from pertpy_contrastive import CellGroup
from pertpy_contrastive._calling import permutation_distance_test


def test_distance_test_uses_every_target_cell_and_the_contrast_controls(trained):
    adata, model = trained
    table = model.distance_test(n_perms=200)
    groups = model.cell_groups
    labels = adata.obs["perturbation"].astype(str)
    expected_counts = labels[groups == CellGroup.TARGET].value_counts()
    np.testing.assert_array_equal(table["n_cells"], expected_counts.reindex(table.index))
    assert CONTROL not in table.index
    programs = adata.obs.groupby("perturbation", observed=True)["program"].first()
    effect_targets = programs.index[programs != "none"]
    null_targets = programs.index[(programs == "none") & (programs.index != CONTROL)]
    assert (table.loc[effect_targets, "pvalue"] < 0.01).all()
    assert table.loc[effect_targets, "distance"].min() > table.loc[null_targets, "distance"].max()
    # The test's distance is pertpy's, between each target and the contrast controls.
    salient = model.get_latent_representation()
    contrast = salient[groups == CellGroup.CONTRAST]
    target = effect_targets[0]
    expected = pt.tl.Distance("edistance")(salient[(labels == target).to_numpy()], contrast)
    assert table.loc[target, "distance"] == pytest.approx(expected, rel=1e-5)


def test_distance_test_takes_several_control_labels(screen):
    labels = screen.obs["perturbation"].astype(str).to_numpy()
    controls = np.flatnonzero(labels == CONTROL)
    labels[controls[::2]] = "NT1"
    labels[controls[1::2]] = "NT2"
    screen.obs["perturbation"] = labels
    setup(screen, control=["NT1", "NT2"])
    model = quick_train(pc.ContrastiveVAE(screen), max_epochs=2)
    assert model.control_labels == ["NT1", "NT2"]
    table = model.distance_test(n_perms=50)
    assert not {"NT1", "NT2", "NT1 | NT2"} & set(table.index)
    assert sorted(table.index) == sorted(set(labels) - {"NT1", "NT2"})


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
    within = permutation_distance_test(adata, **kwargs, n_perms=200, strata_key="batch")
    assert within.loc["A", "pvalue"] > 0.05
    assert within.loc["A", "distance"] == pytest.approx(pertpy_table.loc["A", "distance"])
    assert within.loc[CONTROL, "pvalue"] == 1 and within.loc[CONTROL, "distance"] == 0
    # The same table as pertpy's: columns, types and the contrast row.
    assert within.dtypes.equals(pertpy_table.dtypes)
    assert within.loc[CONTROL].equals(pertpy_table.loc[CONTROL])
    shifted = permutation_distance_test(
        _batch_confounded_null(1.5), **kwargs, n_perms=200, strata_key="batch"
    )
    assert shifted.loc["A", "pvalue"] < 0.01 and shifted.loc["A", "significant_adj"]
    again = permutation_distance_test(adata, **kwargs, n_perms=200, strata_key="batch")
    assert again.loc["A", "pvalue"] == within.loc["A", "pvalue"]  # seeded


def test_permutations_within_strata_need_the_column_and_a_precomputable_metric():
    adata = _batch_confounded_null()
    kwargs = {"groupby": "perturbation", "contrast": CONTROL, "obsm_key": "X_latent"}
    with pytest.raises(KeyError, match="'replicate' is not a column"):
        permutation_distance_test(adata, **kwargs, strata_key="replicate")
    with pytest.raises(ValueError, match="precomputed distances"):
        permutation_distance_test(adata, **kwargs, metric="mmd", strata_key="batch")


def test_distance_test_within_batches(trained):
    adata, model = trained
    table = model.distance_test(n_perms=200, strata_key="batch")
    programs = adata.obs.groupby("perturbation", observed=True)["program"].first()
    effect_targets = programs.index[programs != "none"]
    assert (table.loc[effect_targets, "pvalue"] < 0.05).all()
    with pytest.raises(KeyError, match="'lane' is not a column"):
        model.distance_test(strata_key="lane")
