"""The negative-control calibration check: control guides trained as null pseudo-targets."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from _helpers import CONTROL

import pertpy_contrastive as pc


@pytest.fixture(scope="module")
def screen_with_control_guides():
    adata = pc.datasets.simulate_screen(
        n_cells=1200, n_genes=150, n_targets=4, n_programs=2, n_null_targets=1, seed=5
    )
    rng = np.random.default_rng(0)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    guide_number = rng.integers(1, 7, adata.n_obs)
    adata.obs["guide"] = [f"{label}_g{n}" for label, n in zip(labels, guide_number, strict=True)]
    return adata


@pytest.fixture(scope="module")
def check(screen_with_control_guides):
    before = screen_with_control_guides.copy()
    result = pc.tl.calibration_check(
        screen_with_control_guides,
        guide_key="guide",
        control=CONTROL,
        batch_key="batch",
        train_kwargs={"max_epochs": 40, "batch_size": 32, "early_stopping": False},
        n_perms=200,
    )
    screen_with_control_guides.uns["before_check"] = before
    return result


def test_calibration_check_reports_each_check_and_leaves_data_alone(
    screen_with_control_guides, check
):
    adata = screen_with_control_guides
    before = adata.uns["before_check"]
    assert adata.obs.equals(before.obs) and (adata.X != before.X).nnz == 0
    assert set(adata.uns) == {*before.uns, "before_check"}
    assert set(adata.obsm) == set(before.obsm) and set(adata.layers) == set(before.layers)
    summary = check.summary
    assert {"check", "level", "observed", "n"} <= set(summary.columns)
    assert summary["observed"].between(0, 1).all()
    # Six control guides: three become pseudo-targets.
    distance = check.p_values[check.p_values["test"] == "distance_test, every cell"]
    assert len(distance) == 3 and distance["pseudo_target"].str.startswith("pseudo:").all()
    assert distance["p_value"].between(0, 1).all()
    # A batch key adds the test with the labels permuted within batches.
    within = check.p_values[check.p_values["test"] == "distance_test, every cell, within batches"]
    assert list(within["pseudo_target"]) == list(distance["pseudo_target"])
    assert within["p_value"].between(0, 1).all()
    assert check.targets["pvalue_within_batches"].between(0, 1).all()
    assert not check.targets.index.str.startswith("pseudo:").any()
    de = check.p_values[check.p_values["test"] == "differential_expression"]
    assert len(de) == 3 * adata.n_vars and de["p_value"].between(0, 1).all()
    assert (
        len(check.responder_probability)
        == (adata.obs["guide"].isin(distance["pseudo_target"].str.removeprefix("pseudo:"))).sum()
    )


def test_null_pseudo_targets_hold_their_de_level(check):
    summary = check.summary.set_index(["check", "level"])["observed"]
    assert summary[("differential_expression: p-values below level", 0.05)] < 0.1


@pytest.mark.xfail(
    reason="Known, open: on this tiny screen (about 45 cells per pseudo-target, 59 contrast "
    "controls) the responder gate let 3 of 12 pseudo-targets through over 4 model runs, against "
    "a nominal 5% each; on the Papalexi check it let none through. Its Wald test's variance is "
    "the negative binomial's, scaled by one empirical-null factor for all genes.",
    strict=False,
)
def test_null_pseudo_targets_get_no_responders(check):
    summary = check.summary.set_index(["check", "level"])["observed"]
    assert summary[("responders: pseudo-target cells called KO", 0.0)] < 0.05


def test_qq_plot_returns_a_figure(check, tmp_path):
    figure = check.plot_qq(return_fig=True, save=tmp_path / "qq.png")
    assert (tmp_path / "qq.png").stat().st_size > 0
    assert len(figure.axes[0].lines) == 4  # three tests and the diagonal


def test_calibration_check_needs_a_control_guide_left(screen_with_control_guides):
    with pytest.raises(ValueError, match="n_pseudo_targets"):
        pc.tl.calibration_check(
            screen_with_control_guides, guide_key="guide", control=CONTROL, n_pseudo_targets=6
        )
    with pytest.raises(KeyError, match="guide_key"):
        pc.tl.calibration_check(screen_with_control_guides, guide_key="missing", control=CONTROL)


def test_calibration_check_takes_several_control_labels(screen_with_control_guides):
    adata = screen_with_control_guides.copy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    guides = adata.obs["guide"].astype(str).to_numpy()
    is_control = labels == CONTROL
    # Two control labels, each with three guides.
    labels[is_control] = np.where(
        np.isin(guides[is_control], [f"{CONTROL}_g{n}" for n in (1, 2, 3)]), "NT1", "NT2"
    )
    adata.obs["perturbation"] = labels
    check = pc.tl.calibration_check(
        adata,
        guide_key="guide",
        control=["NT1", "NT2"],
        n_pseudo_targets=2,  # of six guides: each label keeps at least one
        keep_targets=False,
        train_kwargs={"max_epochs": 5, "batch_size": 16, "early_stopping": False},
        n_perms=50,
    )
    tested = check.p_values[check.p_values["test"] == "distance_test, every cell"]
    assert len(tested) == 2 and tested["p_value"].between(0, 1).all()
