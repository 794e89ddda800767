"""Latents, background-removed expression and effects written for pertpy's tests."""

import json

import anndata
import numpy as np
import pandas as pd
import pertpy as pt
import pytest
from _helpers import CONTROL, quick_train, setup

import pertpy_contrastive as pc
from pertpy_contrastive._data import InvalidValueError

OUTPUT_ATTRIBUTES = ("obs", "obsm", "layers", "uns")
OUTPUT_KEYS = {
    "obsm": ["X_contrastive_salient", "X_contrastive_background"],
    "layers": ["contrastive_denoised", "contrastive_effect"],
}


def test_outputs_have_documented_keys_and_shapes(trained):
    adata, _ = trained
    for key in OUTPUT_KEYS["obsm"]:
        assert adata.obsm[key].shape == (adata.n_obs, 10)
    for key in OUTPUT_KEYS["layers"]:
        layer = adata.layers[key]
        assert layer.shape == adata.shape and layer.dtype == np.float32
        assert np.isfinite(layer).all()
    np.testing.assert_allclose(adata.layers["contrastive_denoised"].sum(axis=1), 1e4, rtol=1e-4)
    roles = adata.obs["contrastive_role"]
    is_control = (adata.obs["perturbation"] == CONTROL).to_numpy()
    assert set(roles[is_control]) == {"background control", "contrast control"}
    assert set(roles[~is_control]) == {"perturbed"}
    calls = adata.uns["contrastive_target_calls"]
    targets = sorted(set(adata.obs["perturbation"]) - {CONTROL})
    assert sorted(calls.index) == targets
    assert ((calls["pvalue"] > 0) & (calls["pvalue"] <= 1)).all()


def test_outputs_record_their_provenance_as_h5ad_can_store_it(trained, tmp_path):
    adata, _ = trained
    record = adata.uns["contrastive"]
    assert record["package_version"] == pc.__version__
    assert record["epochs_trained"] == 60
    assert json.loads(record["write_outputs"]) == {
        "dense_layers": True,
        "layers_file": None,
        "n_layer_cells": None,
        "n_layer_genes": None,
        "n_perms": 1000,
        "n_reference_cells": 50,
        "seed": 0,
        "threshold": 0.5,
    }
    assert "against the contrast controls" in record["target_calls_test"]
    assert json.loads(record["model"])["n_salient"] == 10
    assert json.loads(record["setup_anndata"])["guide_key"] == "guide"
    adata.write_h5ad(tmp_path / "outputs.h5ad")
    assert dict(anndata.read_h5ad(tmp_path / "outputs.h5ad").uns["contrastive"]) == dict(record)


def test_outputs_never_overwrite_silently(trained):
    adata, model = trained
    before = adata.layers["contrastive_effect"].copy()
    adata.layers["contrastive_effect"] += 1
    changed = adata.layers["contrastive_effect"].copy()
    with pytest.raises(KeyError, match="already exist. Pass overwrite=True"):
        model.write_outputs()
    np.testing.assert_array_equal(adata.layers["contrastive_effect"], changed)
    model.write_outputs(overwrite=True)
    np.testing.assert_allclose(adata.layers["contrastive_effect"], before, atol=1e-5)
    written = model.write_outputs(adata.copy(), prefix="second")
    assert "second_denoised" in written.layers and "X_second_salient" in written.obsm


@pytest.mark.parametrize(
    ("selection", "given"),
    [
        ({"gene_list": ["T00", "gene_0010"]}, "gene_list given"),
        ({"cell_indices": [0, 5]}, "cell_indices given"),
        ({"gene_list": ["T00"], "cell_indices": [0]}, "gene_list and cell_indices given"),
    ],
)
def test_layer_subsets_without_a_layers_file_are_refused(screen, selection, given):
    setup(screen, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen, n_hidden=16))
    keys = {attribute: list(getattr(screen, attribute)) for attribute in OUTPUT_ATTRIBUTES}
    with pytest.raises(InvalidValueError, match=f"{given} without layers_file=") as refused:
        model.write_outputs(prefix="subset", **selection)
    assert "Pass layers_file=<new .h5ad path>" in str(refused.value)
    assert {attribute: list(getattr(screen, attribute)) for attribute in OUTPUT_ATTRIBUTES} == keys


def test_denoised_expression_removes_background_keeps_programs(trained):
    adata, model = trained
    obs = adata.obs
    controls = (obs["perturbation"] == CONTROL).to_numpy()
    raw = adata.X.toarray()
    log_normalised = np.log1p(raw / raw.sum(1, keepdims=True) * 1e4)
    from_counts = np.log1p(adata.layers["contrastive_denoised"])
    decoded = np.log1p(model.get_denoised_expression(source="decoder"))
    # Controls differ only by background and counting noise: the counts-based layer removes
    # the background and keeps the noise; the decoder removes both.
    control_variance = log_normalised[controls].var(0).mean()
    assert from_counts[controls].var(0).mean() < 0.95 * control_variance
    assert decoded[controls].var(0).mean() < 0.2 * control_variance
    # Responders keep their program: the shift from controls follows the true fold changes.
    truth = adata.uns["simulation"]["program_lfc"]
    for program in range(truth.shape[0]):
        responders = ((obs["program"] == f"P{program}") & obs["responder"]).to_numpy()
        genes = truth[program] != 0
        for layer, agreement in ((from_counts, 0.9), (decoded, 0.6)):
            shift = layer[responders].mean(0) - layer[controls].mean(0)
            assert np.corrcoef(shift[genes], truth[program][genes])[0, 1] > agreement


def test_perturbation_effect_is_near_zero_for_controls(trained):
    adata, _ = trained
    effect = np.abs(adata.layers["contrastive_effect"]).mean(1)
    controls = (adata.obs["perturbation"] == CONTROL).to_numpy()
    responders = adata.obs["responder"].to_numpy()
    assert effect[controls].mean() < 0.5 * effect[responders].mean()


def test_fixed_reference_background(trained):
    adata, model = trained
    one_control = [int(np.flatnonzero(adata.obs["perturbation"] == CONTROL)[0])]
    fixed = model.get_denoised_expression(reference_indices=one_control, indices=np.arange(20))
    sampled = model.get_denoised_expression(indices=np.arange(20))
    assert fixed.shape == sampled.shape == (20, adata.n_vars)
    assert not np.allclose(fixed, sampled)


def test_target_calls_find_the_effect_targets_on_every_cell(trained):
    adata, _ = trained
    calls = adata.uns["contrastive_target_calls"]
    programs = adata.uns["simulation"]["target_program"]
    effect_targets = [t for t, p in programs.items() if p != "none"]
    assert calls.loc[effect_targets, "significant_adj"].all()
    # Every labelled cell is tested: the targets' cells, and the contrast controls.
    is_target = adata.obs["perturbation"].isin(effect_targets).to_numpy()
    assert calls.loc[effect_targets, "n_cells"].sum() == is_target.sum()


def test_pertpys_own_test_without_the_background_controls_is_the_same_test(trained):
    """The road a pertpy user takes after write_outputs gives the target calls' distances."""
    adata, _ = trained
    tested = adata[adata.obs["contrastive_role"] != "background control"]
    table = pt.tl.DistanceTest("edistance", n_perms=100, obsm_key="X_contrastive_salient")(
        tested, groupby="perturbation", contrast=CONTROL, show_progressbar=False
    )
    calls = adata.uns["contrastive_target_calls"]
    np.testing.assert_allclose(table["distance"].reindex(calls.index), calls["distance"], rtol=1e-5)
    same = pc.tl.distance_test(adata, contrast=CONTROL, n_perms=100)
    np.testing.assert_allclose(same["distance"].reindex(calls.index), calls["distance"], rtol=1e-5)
    with pytest.raises(KeyError, match=r"obs\[.missing.\] \(role_key\) is missing"):
        pc.tl.distance_test(adata, contrast=CONTROL, role_key="missing")


def test_wilcoxon_on_denoised_layer(trained):
    adata, model = trained
    subset = adata.copy()
    subset.layers["log_denoised"] = np.log1p(subset.layers["contrastive_denoised"])
    subset.layers["log_decoded"] = np.log1p(model.get_denoised_expression(source="decoder"))
    target = next(t for t, p in adata.uns["simulation"]["target_program"].items() if p == "P0")
    program_genes = adata.var_names[adata.var["program"] == "P0"]

    def recall_of_top_genes(layer):
        result = pt.tl.WilcoxonTest.compare_groups(
            subset,
            column="perturbation",
            baseline=CONTROL,
            groups_to_compare=[target],
            layer=layer,
        )
        result = pd.DataFrame(result).set_index("variable")
        top = result.sort_values("p_value").index[: len(program_genes)]
        return len(set(top) & set(program_genes)) / len(program_genes)

    # Ranked by p-value, the program genes come first on the counts-based layer. On decodes,
    # which barely vary within a group, the rank test calls any consistent shift instead.
    assert recall_of_top_genes("log_denoised") > 0.8
    assert recall_of_top_genes("log_decoded") < 0.5


IFN_GAMMA_PATHWAY = ["IFNGR1", "IFNGR2", "JAK2", "STAT1"]


@pytest.fixture(scope="module")
def papalexi_outputs():
    mdata = pc.datasets.papalexi2021_subset()
    pt.pp.GuideAssignment().assign_to_max_guide(mdata["gdo"], assignment_threshold=5)
    pc.pp.perturbation_labels(mdata)
    pc.ContrastiveVAE.setup_anndata(
        mdata, perturbation_key="perturbation", control=CONTROL, batch_key="replicate"
    )
    model = pc.ContrastiveVAE(mdata)
    model.train(max_epochs=100, enable_progress_bar=False)
    return model.write_outputs(mdata), model


def test_papalexi_ifn_gamma_knockouts_stand_out(papalexi_outputs):
    rna, _ = papalexi_outputs
    others = ["CD86", "ATF2"]
    subset = rna[rna.obs["perturbation"].isin([CONTROL, *IFN_GAMMA_PATHWAY, *others])].copy()
    subset.obs["perturbation"] = subset.obs["perturbation"].astype(str)

    # Every cell is tested, against the contrast controls.
    calls = rna.uns["contrastive_target_calls"]
    assert (calls.loc[IFN_GAMMA_PATHWAY, "pvalue"] < 0.01).all()
    assert (calls.loc[IFN_GAMMA_PATHWAY, "n_cells"] > 100).all()
    assert calls.loc[IFN_GAMMA_PATHWAY, "distance"].min() > calls.loc[others, "distance"].max()

    subset.layers["log_denoised"] = np.log1p(subset.layers["contrastive_denoised"])
    result = pt.tl.WilcoxonTest.compare_groups(
        subset,
        column="perturbation",
        baseline=CONTROL,
        groups_to_compare=["STAT1"],
        layer="log_denoised",
    )
    # The knocked-out gene keeps its knockdown: the layer is built from the observed counts.
    stat1 = result.set_index("variable").loc["STAT1"]
    assert stat1["log_fc"] < 0 and stat1["adj_p_value"] < 0.05


def test_papalexi_responder_pseudobulk_into_pydeseq2(papalexi_outputs):
    rna, _ = papalexi_outputs
    pseudobulk = pc.tl.responder_pseudobulk(rna, sample_key="replicate")
    assert pseudobulk.X.dtype == np.int64 and (pseudobulk.X >= 0).all()
    controls = pseudobulk.obs["perturbation"] == CONTROL
    assert controls.sum() == 3 and (pseudobulk.obs["n_cells"] >= 10).all()
    # Controls are summed whole; perturbed groups keep only their responders.
    assert (
        pseudobulk.obs.loc[controls, "n_cells"].sum() == (rna.obs["perturbation"] == CONTROL).sum()
    )
    stat1 = pseudobulk.obs["perturbation"] == "STAT1"
    assert pseudobulk.obs.loc[stat1, "n_cells"].sum() < (rna.obs["perturbation"] == "STAT1").sum()
    subset = pseudobulk[pseudobulk.obs["perturbation"].isin([CONTROL, "STAT1"])].copy()
    result = pt.tl.PyDESeq2.compare_groups(
        subset,
        column="perturbation",
        baseline=CONTROL,
        groups_to_compare=["STAT1"],
        paired_by="replicate",
    )
    result = result.set_index("variable")
    assert result.loc["STAT1", "log_fc"] < 0
    assert result.loc["STAT1", "adj_p_value"] < 0.05
    with pytest.raises(KeyError, match="Run model.write_outputs"):
        pc.tl.responder_pseudobulk(rna, responders="salient_norm", salient_key="missing")
    with pytest.raises(KeyError, match="Run model.write_outputs"):
        pc.tl.responder_pseudobulk(rna, probability_key="missing")
    with pytest.raises(KeyError, match=r"Layer 'raw_counts' not found.*layer=None"):
        pc.tl.responder_pseudobulk(rna, sample_key="replicate", layer="raw_counts")


def test_simulated_responder_pseudobulk_into_pydeseq2(trained):
    adata, _ = trained
    pseudobulk = pc.tl.responder_pseudobulk(adata, sample_key="batch", min_cells=5)
    target = next(t for t, p in adata.uns["simulation"]["target_program"].items() if p == "P0")
    subset = pseudobulk[pseudobulk.obs["perturbation"].isin([CONTROL, target])].copy()
    result = pt.tl.PyDESeq2.compare_groups(
        subset,
        column="perturbation",
        baseline=CONTROL,
        groups_to_compare=[target],
        paired_by="batch",
    ).set_index("variable")
    program_genes = adata.var_names[adata.var["program"] == "P0"]
    top = result.sort_values("p_value").index[: len(program_genes)]
    assert len(set(top) & set(program_genes)) / len(program_genes) > 0.6


def test_papalexi_model_de_finds_the_knockouts_own_gene(papalexi_outputs):
    _, model = papalexi_outputs
    de = model.differential_expression(group1=["STAT1", "JAK2", "CD86"])
    for knockout in ("STAT1", "JAK2"):
        own = de[de["group1"] == knockout].loc[knockout]
        assert own["lfc_mean"] < 0 and own["is_de_fdr_0.05"] and own["p_value_adj"] < 0.05
    # CD86 has no detectable responders on this subset: nothing is flagged.
    assert not de.loc[de["group1"] == "CD86", "is_de_fdr_0.05"].any()
