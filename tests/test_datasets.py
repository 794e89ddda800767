"""The screen simulator and the bundled Papalexi 2021 subset."""

import numpy as np
import pandas as pd
import pertpy as pt
import pytest
import scanpy as sc
import scipy.sparse as sp
from _helpers import CONTROL, quick_train

import pertpy_contrastive as pc


@pytest.fixture(scope="module")
def simulated():
    return pc.datasets.simulate_screen(n_cells=3000, n_genes=600, seed=2)


def test_simulated_counts_and_truth(simulated):
    adata = simulated
    assert sp.issparse(adata.X) and adata.X.dtype == np.int32
    assert (np.asarray(adata.X.sum(axis=1)).ravel() > 0).all()
    obs = adata.obs
    truth = adata.uns["simulation"]["target_program"]
    null_targets = [t for t, program in truth.items() if program == "none"]
    assert len(null_targets) == 3 and len(truth) == 12
    perturbed = obs["perturbation"] != CONTROL
    assert 0.15 < (~perturbed).mean() < 0.25
    escape_rate = obs.loc[perturbed, "escaped"].mean()
    assert 0.2 < escape_rate < 0.4
    assert not obs.loc[~perturbed, "escaped"].any()
    assert not obs.loc[obs["perturbation"].isin(null_targets), "responder"].any()
    assert not obs.loc[obs["escaped"], "responder"].any()
    assert (obs.loc[obs["responder"], "program"] != "none").all()
    assert adata.var["program"].value_counts().drop("none").eq(40).all()


def test_simulated_knockdown_lowers_the_target_gene(simulated):
    adata = simulated
    normalised = adata.X.multiply(1 / adata.X.sum(axis=1)).tocsr()
    target = "T05"
    column = normalised[:, adata.var_names.get_loc(target)].toarray().ravel()
    responders = (adata.obs["perturbation"] == target) & adata.obs["responder"]
    controls = adata.obs["perturbation"] == CONTROL
    assert column[responders.to_numpy()].mean() < 0.5 * column[controls.to_numpy()].mean()


def test_true_background_leaves_the_screen_unchanged_and_lacks_the_perturbation(simulated):
    with_background = pc.datasets.simulate_screen(
        n_cells=3000, n_genes=600, seed=2, true_background=True
    )
    assert (with_background.X != simulated.X).nnz == 0
    assert "true_background" not in simulated.layers
    background = with_background.layers["true_background"]
    np.testing.assert_allclose(background.sum(1), 1.0, rtol=1e-5)
    # Controls' counts are their background plus noise; a responder's knocked-down gene is
    # not in its background.
    controls = (simulated.obs["perturbation"] == CONTROL).to_numpy()
    depth = np.asarray(simulated.X.sum(1))
    observed = simulated.X[controls].toarray().mean(0)
    expected = (background[controls] * depth[controls]).mean(0)
    assert np.corrcoef(np.log1p(observed), np.log1p(expected))[0, 1] > 0.99
    target = "T05"
    responders = ((simulated.obs["perturbation"] == target) & simulated.obs["responder"]).to_numpy()
    gene = simulated.var_names.get_loc(target)
    counts = simulated.X[responders][:, gene].toarray().ravel()
    assert counts.sum() < 0.5 * (background[responders, gene] * depth[responders, 0]).sum()


def _r2(features, design):
    design = np.column_stack([np.ones(len(design)), design])
    fitted = design @ np.linalg.lstsq(design, features, rcond=None)[0]
    return 1 - ((features - fitted) ** 2).sum() / ((features - features.mean(0)) ** 2).sum()


def test_simulated_background_dominates_the_pca(simulated):
    adata = simulated.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10)
    pcs = adata.obsm["X_pca"]
    obs = adata.obs
    background = np.column_stack(
        [
            pd.get_dummies(obs["subclone"]).to_numpy(float),
            pd.get_dummies(obs["batch"]).to_numpy(float),
            np.maximum(np.cos(obs["cell_cycle_angle"]), 0),
            np.maximum(np.sin(obs["cell_cycle_angle"]), 0),
            obs["stress"],
        ]
    )
    perturbation = pd.get_dummies(obs["program"].where(obs["responder"], "none")).to_numpy(float)
    assert _r2(pcs, background) > 3 * _r2(pcs, perturbation)


def test_simulator_rejects_impossible_designs():
    with pytest.raises(ValueError, match="n_null_targets"):
        pc.datasets.simulate_screen(n_targets=3, n_null_targets=3)
    with pytest.raises(ValueError, match="n_genes is too small"):
        pc.datasets.simulate_screen(n_genes=50)


def test_bundled_papalexi_subset_trains_from_pertpy_guide_assignment():
    mdata = pc.datasets.papalexi2021_subset()
    assert mdata["rna"].shape == (5957, 299)
    assert mdata["gdo"].n_vars == 110
    assert "Papalexi" in mdata.uns["source"]
    assert set(mdata["rna"].obs["replicate"]) == {"rep1", "rep2", "rep3"}

    guides = mdata["gdo"].copy()
    pt.pp.GuideAssignment().assign_to_max_guide(guides, assignment_threshold=5)
    targets = guides.obs["assigned_guide"].map(guides.var["target_gene"].to_dict())
    mdata["rna"].obs["perturbation"] = targets.to_numpy()
    assert (mdata["rna"].obs["perturbation"] == CONTROL).sum() == 1200

    pc.ContrastiveVAE.setup_anndata(
        mdata, perturbation_key="perturbation", control=CONTROL, batch_key="replicate"
    )
    model = quick_train(pc.ContrastiveVAE(mdata), max_epochs=2, batch_size=64)
    salient = model.get_latent_representation(mdata)
    assert salient.shape == (5957, 10) and np.isfinite(salient).all()
