"""Model-based differential expression: responders against their own background."""

import numpy as np
import pytest
from _helpers import CONTROL, quick_train, setup
from scipy import stats

import pertpy_contrastive as pc
from pertpy_contrastive._differential import _adaptive_shrinkage, _mixture_quantile

COLUMNS = [
    "lfc_mean",
    "lfc_std",
    "lfc_ci_low",
    "lfc_ci_high",
    "proba_de",
    "proba_not_de",
    "bayes_factor",
    "is_de_fdr_0.05",
    "p_value",
    "p_value_adj",
    "raw_mean1",
    "raw_mean2",
    "n_cells1",
    "n_responders",
    "delta",
    "group1",
    "group2",
    "comparison",
]


@pytest.fixture(scope="module")
def de_tables(trained):
    _, model = trained
    return model.differential_expression(), model.differential_expression(responders_only=False)


def _true_genes(adata, target):
    program = adata.uns["simulation"]["target_program"][target]
    return {*adata.var_names[adata.var["program"] == program], target}


def test_de_recovers_each_program_at_its_fdr(trained, de_tables):
    adata, _ = trained
    de, _ = de_tables
    assert set(COLUMNS) <= set(de.columns)
    false_calls = calls = 0
    for target, program in adata.uns["simulation"]["target_program"].items():
        if program == "none":
            continue
        table = de[de["group1"] == target]
        assert len(table) == adata.n_vars and (table.index == adata.var_names).all()
        called = set(table.index[table["is_de_fdr_0.05"]])
        truth = _true_genes(adata, target)
        assert len(called & truth) >= 0.9 * len(truth)
        false_calls, calls = false_calls + len(called - truth), calls + len(called)
        assert (table["lfc_ci_low"] <= table["lfc_ci_high"]).all()
        # A gene whose posterior is mostly the point mass at 0 has the interval [0, 0] while its
        # mean is slightly off 0; a called gene's interval holds its mean.
        changed = table.loc[table["is_de_fdr_0.05"]]
        assert (
            (changed["lfc_ci_low"] <= changed["lfc_mean"])
            & (changed["lfc_mean"] <= changed["lfc_ci_high"])
        ).all()
    # The flagged genes' false discovery proportion, pooled over the targets (one gene is
    # 3% of a target's calls, so a single target's proportion is too coarse to hold to 5%).
    assert false_calls / calls < 0.08


def test_de_of_a_target_that_only_knocks_down_its_own_gene_finds_that_gene(trained, de_tables):
    """Null targets lose their own gene and nothing else: DE finds it, and nothing else."""
    adata, model = trained
    de, de_all_cells = de_tables
    null_targets = [t for t, p in adata.uns["simulation"]["target_program"].items() if p == "none"]
    for target in null_targets:
        table = de[de["group1"] == target]
        assert list(table.index[table["is_de_fdr_0.05"]]) == [target]
        assert table.loc[target, "lfc_mean"] < -1.0
        # Every cell counts: the Wald test of all the target's cells against their background.
        table = de_all_cells[(de_all_cells["group1"] == target) & (de_all_cells.index != target)]
        assert 0.0 < (table["p_value"] < 0.05).mean() < 0.12
        assert stats.kstest(table["p_value"], "uniform").pvalue > 1e-3
    # With the calls resting on the downstream response alone, these targets have no responder.
    downstream_only = model.get_responder_probability(use_target_gene=False)
    de = model.differential_expression(group1=null_targets, probability=downstream_only)
    assert not de["is_de_fdr_0.05"].any()


def test_de_refuses_other_references_and_unknown_targets(trained):
    _, model = trained
    with pytest.raises(ValueError, match="own background"):
        model.differential_expression(group1="T02", group2="T03")
    with pytest.raises(ValueError, match="not trained targets"):
        model.differential_expression(group1="NOPE")
    with pytest.raises(ValueError, match="probability has 3 values"):
        model.differential_expression(group1="T02", probability=np.ones(3))
    table = model.differential_expression(group1="T02", group2=CONTROL)
    assert (table["group1"] == "T02").all() and (table["comparison"] == f"T02 vs {CONTROL}").all()
    # scvi-tools' keywords: groupby names the registered perturbation column.
    by_column = model.differential_expression(groupby="perturbation", group1="T02")
    np.testing.assert_array_equal(by_column["p_value"], table["p_value"])
    with pytest.raises(ValueError, match="groupby='batch'.*'perturbation'"):
        model.differential_expression(groupby="batch", group1="T02")


def test_de_takes_several_control_labels(screen):
    labels = screen.obs["perturbation"].astype(str).to_numpy()
    controls = np.flatnonzero(labels == CONTROL)
    labels[controls[::2]], labels[controls[1::2]] = "NT1", "NT2"
    screen.obs["perturbation"] = labels
    setup(screen, control=["NT1", "NT2"])
    model = quick_train(pc.ContrastiveVAE(screen), max_epochs=2)
    target = sorted(set(labels) - {"NT1", "NT2"})[0]
    table = model.differential_expression(group1=target, group2=["NT1", "NT2"])
    assert len(table) == screen.n_vars and table["p_value"].between(0, 1).all()
    assert (table["comparison"] == f"{target} vs NT1 | NT2").all()


def test_mixture_quantile_of_one_normal_is_the_normal_quantile():
    mean, sd = np.array([[0.3]]), np.array([[0.2]])
    for level in (0.025, 0.5, 0.975):
        quantile = _mixture_quantile(np.ones((1, 1)), mean, sd, level)
        np.testing.assert_allclose(quantile, stats.norm.ppf(level, 0.3, 0.2), atol=1e-6)


def test_adaptive_shrinkage_keeps_null_genes_below_their_change_probability():
    rng = np.random.default_rng(0)
    n_null, n_changed = 900, 100
    truth = np.r_[np.zeros(n_null), rng.choice([-1.0, 1.0], n_changed)]
    standard_error = np.full(len(truth), 0.2)
    estimate = truth + rng.normal(0.0, standard_error)
    mean, sd, proba_de, low, high = _adaptive_shrinkage(estimate, standard_error, delta=0.25)
    assert proba_de[:n_null].mean() < 0.05 and proba_de[n_null:].mean() > 0.9
    assert np.abs(mean[:n_null]).mean() < np.abs(estimate[:n_null]).mean()
    assert (sd > 0).all()
    # The 95% intervals cover the truth about 95% of the time.
    assert 0.9 < ((low <= truth) & (truth <= high)).mean() <= 1.0


def test_progress_bars_over_the_targets_show_only_when_asked(trained, capsys):
    _, model = trained
    model.differential_expression(group1=["T00"], progress_bar=False)
    assert capsys.readouterr().out == ""
    model.differential_expression(group1=["T00"])
    shown = capsys.readouterr().out
    assert "Responder calls" in shown
    assert "Differential expression" in shown
