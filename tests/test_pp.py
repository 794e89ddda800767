"""pp.perturbation_labels on pertpy's guide-assignment outputs."""

import numpy as np
import pertpy as pt
import pytest
from _helpers import CONTROL, quick_train

import pertpy_contrastive as pc


@pytest.fixture(scope="module")
def papalexi():
    return pc.datasets.papalexi2021_subset()


def test_max_guide_labels_train_the_model(papalexi, caplog):
    mdata = papalexi.copy()
    guides = mdata["gdo"]
    pt.pp.GuideAssignment().assign_to_max_guide(guides, assignment_threshold=5)
    with caplog.at_level("INFO", logger="pertpy_contrastive"):
        labels = pc.pp.perturbation_labels(mdata)
    assert "control" in caplog.text and "no guide (excluded)" in caplog.text
    assert labels is not None and mdata["rna"].obs["perturbation"].equals(labels)
    expected = guides.obs["assigned_guide"].map(guides.var["target_gene"].to_dict())
    assert (labels.astype(object).fillna("none") == expected.astype(object).fillna("none")).all()
    assert (labels == CONTROL).sum() == 1200
    pc.ContrastiveVAE.setup_anndata(
        mdata, perturbation_key="perturbation", control=CONTROL, batch_key="replicate"
    )
    model = quick_train(pc.ContrastiveVAE(mdata), max_epochs=1, batch_size=64)
    assert np.isfinite(model.get_latent_representation(mdata)).all()


def test_threshold_layer_with_both_policies(papalexi):
    mdata = papalexi.copy()
    pt.pp.GuideAssignment().assign_by_threshold(mdata["gdo"], assignment_threshold=5)
    layer = mdata["gdo"].layers["assigned_guides"]
    n_guides = np.asarray((layer > 0).sum(axis=1)).ravel()
    excluded = pc.pp.perturbation_labels(mdata, assignment="assigned_guides")
    assert excluded[n_guides == 0].isna().all()
    combined = pc.pp.perturbation_labels(
        mdata, assignment="assigned_guides", multiple="combine", overwrite=True
    )
    several = combined.astype(str).str.contains("+", regex=False)
    assert several.any()
    assert excluded[several.to_numpy()].isna().all()
    pairs = combined[several].astype(str).str.split("+")
    assert all(p == sorted(p) and CONTROL not in p for p in pairs)
    single = n_guides == 1
    assert combined[single].notna().all()
    semicolon = pc.pp.perturbation_labels(
        mdata, assignment="assigned_guides", multiple="combine", separator=";", overwrite=True
    )
    assert semicolon[several.to_numpy()].astype(str).str.contains(";", regex=False).all()
    assert not semicolon.astype(str).str.contains("+", regex=False).any()


def test_mixture_model_labels_train_the_model(papalexi):
    mdata = papalexi.copy()
    pt.pp.GuideAssignment().assign_mixture_model(mdata["gdo"])
    assigned = mdata["gdo"].obs["assigned_guide"].astype(str)
    target = mdata["gdo"].var["target_gene"].astype(str)
    negative = (assigned == "negative").to_numpy()
    too_many = (assigned == "multiple").to_numpy()
    several = assigned.str.contains("+", regex=False).to_numpy()
    targets_of_several = [{target[g] for g in label.split("+")} for label in assigned[several]]
    assert negative.any() and too_many.any() and several.any()  # all three shapes occur

    combined = pc.pp.perturbation_labels(mdata, multiple="combine")
    assert combined[negative | too_many].isna().all()
    for label, targets in zip(combined[several], targets_of_several, strict=True):
        perturbing = sorted(targets - {CONTROL})
        expected = "+".join(perturbing) if perturbing else CONTROL
        assert label == expected
    assert (combined[several].astype(str).str.contains("+", regex=False)).any()

    excluded = pc.pp.perturbation_labels(mdata, multiple="exclude", overwrite=True)
    several_targets = np.array([len(t - {CONTROL}) > 1 for t in targets_of_several])
    assert excluded[several][several_targets].isna().all()
    assert excluded[several][~several_targets].notna().all()

    pc.ContrastiveVAE.setup_anndata(
        mdata, perturbation_key="perturbation", control=CONTROL, batch_key="replicate"
    )
    model = quick_train(pc.ContrastiveVAE(mdata), max_epochs=1, batch_size=64)
    latent = model.get_latent_representation(mdata)
    assert np.isfinite(latent).all() and latent.shape == (mdata["rna"].n_obs, 10)


def test_errors_name_the_fix(papalexi):
    mdata = papalexi.copy()
    with pytest.raises(KeyError, match="Run pt.pp.GuideAssignment first"):
        pc.pp.perturbation_labels(mdata)
    pt.pp.GuideAssignment().assign_to_max_guide(mdata["gdo"], assignment_threshold=5)
    with pytest.raises(KeyError, match="target_key=<column> or guide_to_target"):
        pc.pp.perturbation_labels(mdata, target_key="gene")
    with pytest.raises(KeyError, match="have no target"):
        pc.pp.perturbation_labels(mdata, guide_to_target={"CUL3g1": "CUL3"})
    with pytest.raises(KeyError, match="no modality 'guides'"):
        pc.pp.perturbation_labels(mdata, guide_modality="guides")
    pc.pp.perturbation_labels(mdata)
    before = mdata["rna"].obs["perturbation"].copy()
    with pytest.raises(KeyError, match="already exists. Pass overwrite=True"):
        pc.pp.perturbation_labels(mdata, multiple="combine")
    assert mdata["rna"].obs["perturbation"].equals(before)
    with pytest.raises(ValueError, match="multiple must be"):
        pc.pp.perturbation_labels(mdata, multiple="keep", overwrite=True)


def test_guide_key_added_keeps_each_labelled_cells_guide(papalexi):
    mdata = papalexi.copy()
    guides = mdata["gdo"]
    pt.pp.GuideAssignment().assign_to_max_guide(guides, assignment_threshold=5)
    mdata["rna"].obs["guide"] = "taken"
    with pytest.raises(KeyError, match="obs\\['guide'\\] already exists"):
        pc.pp.perturbation_labels(mdata, guide_key_added="guide")
    assert "perturbation" not in mdata["rna"].obs  # nothing written on the error
    labels = pc.pp.perturbation_labels(mdata, guide_key_added="guide", overwrite=True)
    cell_guides = mdata["rna"].obs["guide"]
    labelled = labels.notna().to_numpy()
    assert cell_guides[~labelled].isna().all()
    assigned = guides.obs["assigned_guide"].astype(str).to_numpy()
    np.testing.assert_array_equal(cell_guides[labelled].astype(str).to_numpy(), assigned[labelled])
    # Each guide maps to its cell's target label.
    target_of = guides.var["target_gene"].astype(str).to_dict()
    mapped = [target_of[g] for g in cell_guides[labelled].astype(str)]
    assert mapped == list(labels[labelled].astype(str))
