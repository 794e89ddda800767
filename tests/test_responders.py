"""Responder posterior probabilities, Mixscape-style calls and responder fractions."""

import numpy as np
from _helpers import CONTROL, quick_train, setup
from sklearn.metrics import roc_auc_score

import pertpy_contrastive as pc


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
    # Effect targets move their programs; null targets only their own gene, which the
    # fractions report as the whole of their effect.
    programs = adata.uns["simulation"]["target_program"]
    effect = [t for t in targets if programs[t] != "none"]
    null = [t for t in targets if programs[t] == "none"]
    assert fractions.loc[effect, "n_effect_genes"].min() > 10
    assert (fractions.loc[null, "n_effect_genes"] <= 2).all()
    assert fractions.loc[null, "target_gene_in_effect"].all()

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


def test_posterior_fraction_matches_the_true_responder_fraction(trained):
    """The cross-fitted posterior is calibrated in aggregate on a strong screen.

    Every target knocks down its own gene, null targets included, so a cell responded unless
    it escaped.
    """
    adata, _ = trained
    obs = adata.obs
    targeting = (obs["perturbation"] != CONTROL).to_numpy()
    probability = obs["contrastive_p_perturbed"].to_numpy()[targeting]
    truth = ~obs["escaped"].to_numpy()[targeting]
    assert abs(probability.mean() - truth.mean()) < 0.05


def test_targets_whose_effect_is_their_own_gene_are_called_on_it(trained):
    """Null targets knock down only their own gene (in the data): it is their evidence."""
    adata, model = trained
    obs = adata.obs
    null_targets = [t for t, p in adata.uns["simulation"]["target_program"].items() if p == "none"]
    is_null = obs["perturbation"].isin(null_targets).to_numpy()
    responders = obs["responder"].to_numpy() | ~obs["escaped"].to_numpy()
    with_own_gene = obs["contrastive_p_perturbed"].to_numpy()
    assert roc_auc_score(responders[is_null], with_own_gene[is_null]) > 0.75
    downstream_only = model.get_responder_probability(use_target_gene=False)
    assert (downstream_only[is_null] < 0.5).mean() > 0.95
