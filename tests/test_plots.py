import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _helpers import CONTROL
from matplotlib.colors import to_hex

import pertpy_contrastive as pc

ATTRIBUTES = ("obs", "obsm", "uns", "layers", "varm", "obsp")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def distance_table(trained):
    _, model = trained
    return model.distance_test(n_perms=200)


def _keys(adata):
    return {attribute: set(getattr(adata, attribute).keys()) for attribute in ATTRIBUTES}


def _light(adata, columns):
    """A copy with only some obs columns, to edit without touching the session's data."""
    return ad.AnnData(obs=adata.obs[columns].copy())


def _pertpy_table(rows):
    """A table in pertpy's DistanceTest format: {group: (distance, pvalue, pvalue_adj)}."""
    table = pd.DataFrame(rows, index=["distance", "pvalue", "pvalue_adj"]).T
    table["significant"] = table["pvalue"] < 0.05
    table["significant_adj"] = table["pvalue_adj"] < 0.05
    return table[["distance", "pvalue", "significant", "pvalue_adj", "significant_adj"]]


# ---------------------------------------------------------------------------- latents


def test_latents_pca_panels_colours_and_no_writes(trained):
    adata, _ = trained
    before = _keys(adata)
    salient = adata.obsm["X_contrastive_salient"].copy()
    columns = ["perturbation", "cell_cycle_phase", "stress"]
    figure = pc.pl.latents(adata, color=columns, basis="pca", return_fig=True)

    assert _keys(adata) == before
    np.testing.assert_array_equal(adata.obsm["X_contrastive_salient"], salient)
    panels = [axis for axis in figure.axes if axis.get_title()]
    assert [axis.get_title() for axis in panels] == [
        f"{kind} latent: {column}" for column in columns for kind in ("salient", "background")
    ]
    for axis in panels:
        (scatter,) = axis.collections
        assert len(scatter.get_offsets()) == adata.n_obs
        assert axis.get_xlabel() == "PC1"
    # The perturbation row: one colour per label and a legend naming them all.
    labels = list(adata.obs["perturbation"].cat.categories)
    colours = {to_hex(colour) for colour in panels[0].collections[0].get_facecolors()}
    assert len(colours) == len(labels)
    legend = panels[1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == labels
    assert legend.get_title().get_text() == "perturbation"
    # The numeric row gets a colour bar (an extra, untitled axis) and no legend.
    assert len(figure.axes) == len(panels) + 1
    assert panels[5].get_legend() is None
    assert panels[5].collections[0].get_array() is not None


def test_latents_groups_grey_out_the_others(trained):
    adata, _ = trained
    figure = pc.pl.latents(adata, color="perturbation", basis="pca", groups="T02", return_fig=True)
    legend = figure.axes[1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["T02", "other"]
    colours = pd.Series(
        [to_hex(colour) for colour in figure.axes[0].collections[0].get_facecolors()]
    )
    is_t02 = int((adata.obs["perturbation"] == "T02").sum())
    assert colours.value_counts().sort_values().tolist() == [is_t02, adata.n_obs - is_t02]
    # Grey cells are drawn first, under the highlighted ones.
    assert colours.iloc[0] != colours.iloc[-1]

    with pytest.raises(ValueError, match="T99"):
        pc.pl.latents(adata, color="perturbation", basis="pca", groups="T99")


def test_latents_umap_on_a_temporary_anndata(trained, tmp_path):
    adata, _ = trained
    before = _keys(adata)
    path = tmp_path / "latents.png"
    result = pc.pl.latents(adata, color="batch", save=path)

    assert result is None
    assert path.stat().st_size > 0
    assert _keys(adata) == before
    (figure,) = (plt.figure(number) for number in plt.get_fignums())
    axes = [axis for axis in figure.axes if axis.get_title()]
    assert [axis.get_xlabel() for axis in axes] == ["UMAP1", "UMAP1"]
    for axis in axes:
        offsets = axis.collections[0].get_offsets()
        assert offsets.shape == (adata.n_obs, 2)
        assert np.isfinite(offsets).all()


def test_latents_missing_inputs(trained):
    adata, _ = trained
    with pytest.raises(KeyError, match=r"X_contrastive_salient.*write_outputs"):
        pc.pl.latents(_light(adata, ["perturbation"]), color="perturbation", basis="pca")
    with pytest.raises(KeyError, match=r"X_other_salient.*write_outputs"):
        pc.pl.latents(adata, color="perturbation", prefix="other", basis="pca")
    with pytest.raises(KeyError, match="not_a_column"):
        pc.pl.latents(adata, color=["perturbation", "not_a_column"], basis="pca")
    with pytest.raises(ValueError, match="basis"):
        pc.pl.latents(adata, color="perturbation", basis="tsne")


# ---------------------------------------------------------------------------- ranking


def _bars(figure):
    axis = figure.axes[0]
    labels = [label.get_text() for label in axis.get_yticklabels()]
    return axis, labels, axis.patches


def test_perturbation_ranking_of_the_model_table(trained, distance_table, tmp_path):
    adata, _ = trained
    alpha = 0.05
    path = tmp_path / "ranking.pdf"
    figure = pc.pl.perturbation_ranking(distance_table, alpha=alpha, return_fig=True, save=path)
    assert path.stat().st_size > 0

    expected = distance_table.sort_values("distance", ascending=False)
    trained_targets = set(adata.obs["perturbation"].cat.categories) - {CONTROL}
    assert set(expected.index) == trained_targets
    axis, labels, bars = _bars(figure)
    assert labels == list(expected.index)
    assert axis.yaxis_inverted()  # the largest distance at the top
    assert [bar.get_y() for bar in bars] == sorted(bar.get_y() for bar in bars)
    np.testing.assert_allclose([bar.get_width() for bar in bars], expected["distance"])
    is_significant = (expected["pvalue_adj"] < alpha).to_numpy()
    colours = np.array([to_hex(bar.get_facecolor()) for bar in bars])
    assert len(set(colours[is_significant])) <= 1
    assert len(set(colours[~is_significant])) <= 1
    assert not set(colours[is_significant]) & set(colours[~is_significant])
    # The model's table has no contrast row; given the contrast, the axis names it.
    assert axis.get_xlabel() == "distance"
    named = pc.pl.perturbation_ranking(distance_table, contrast=CONTROL, return_fig=True)
    assert named.axes[0].get_xlabel() == f"distance to {CONTROL}"


def test_perturbation_ranking_colours_by_adjusted_p_value():
    table = _pertpy_table(
        {
            "A": (0.2, 0.01, 0.03),
            "nt": (0.0, 1.0, 1.0),
            "B": (0.9, 0.001, 0.004),
            "C": (0.5, 0.04, 0.08),  # significant before adjustment only
            "D": (-0.01, 0.6, 0.6),
        }
    )
    figure = pc.pl.perturbation_ranking(table, return_fig=True)
    _, labels, bars = _bars(figure)
    assert labels == ["B", "C", "A", "D"]
    colours = [to_hex(bar.get_facecolor()) for bar in bars]
    assert colours[0] == colours[2] != colours[1] == colours[3]
    # A stricter alpha turns A grey.
    figure = pc.pl.perturbation_ranking(table, alpha=0.01, return_fig=True)
    colours = [to_hex(bar.get_facecolor()) for bar in _bars(figure)[2]]
    assert colours[0] != colours[2] == colours[1]


def test_perturbation_ranking_contrast_detection():
    table = _pertpy_table({"A": (0.0, 1.0, 1.0), "nt": (0.0, 1.0, 1.0), "B": (0.4, 0.01, 0.02)})
    # A null target with distance exactly 0 looks like the contrast.
    with pytest.raises(ValueError, match="contrast="):
        pc.pl.perturbation_ranking(table)
    figure = pc.pl.perturbation_ranking(table, contrast="nt", return_fig=True)
    assert _bars(figure)[1] == ["B", "A"]
    # Already dropped (as the command line's demo stores it): every row is a target.
    figure = pc.pl.perturbation_ranking(table.drop(index=["nt", "A"]), return_fig=True)
    assert _bars(figure)[1] == ["B"]
    assert figure.axes[0].get_xlabel() == "distance"
    with pytest.raises(KeyError, match="distance_test"):
        pc.pl.perturbation_ranking(table.drop(columns="pvalue_adj"))


def test_perturbation_ranking_from_a_saved_h5ad(distance_table, tmp_path):
    adata = ad.AnnData(np.zeros((2, 1), dtype=np.float32))
    adata.uns["contrastive_target_calls"] = distance_table
    adata.write_h5ad(tmp_path / "screen.h5ad")
    saved = ad.read_h5ad(tmp_path / "screen.h5ad")
    before = _keys(saved)

    result = pc.pl.perturbation_ranking(saved)
    assert result is None
    (figure,) = (plt.figure(number) for number in plt.get_fignums())
    expected = distance_table.sort_values("distance", ascending=False)
    assert _bars(figure)[1] == list(expected.index)
    assert _keys(saved) == before
    with pytest.raises(KeyError, match=r"other_target_calls.*write_outputs"):
        pc.pl.perturbation_ranking(saved, prefix="other")


# ---------------------------------------------------------------------------- responders


def test_responder_probabilities_groups_order_and_threshold(trained, tmp_path):
    adata, _ = trained
    before = _keys(adata)
    path = tmp_path / "responders.png"
    figure = pc.pl.responder_probabilities(adata, return_fig=True, save=path)
    assert path.stat().st_size > 0
    assert _keys(adata) == before

    probability = adata.obs["contrastive_p_perturbed"]
    labels = adata.obs["perturbation"].astype(str)
    is_target = (labels != CONTROL) & probability.notna()
    means = probability[is_target].groupby(labels[is_target]).mean()
    expected = [*means.sort_values(ascending=False, kind="stable").index, CONTROL]
    axis = figure.axes[0]
    assert [label.get_text() for label in axis.get_yticklabels()] == expected
    assert axis.yaxis_inverted()
    assert len(axis.patches) == len(expected)  # one box per group
    points = sum(len(collection.get_offsets()) for collection in axis.collections)
    assert points == probability.notna().sum()
    (threshold,) = (line for line in axis.lines if line.get_linestyle() == "--")
    assert list(threshold.get_xdata()) == [0.5, 0.5]

    # The control label given explicitly: the same groups.
    figure = pc.pl.responder_probabilities(adata, control=CONTROL, threshold=0.8, return_fig=True)
    axis = figure.axes[0]
    assert [label.get_text() for label in axis.get_yticklabels()] == expected
    (threshold,) = (line for line in axis.lines if line.get_linestyle() == "--")
    assert list(threshold.get_xdata()) == [0.8, 0.8]


def test_responder_probabilities_drops_unscored_cells(trained):
    adata, _ = trained
    light = _light(adata, ["perturbation", "contrastive_p_perturbed", "contrastive_class_global"])
    labels = light.obs["perturbation"].astype(str).to_numpy()
    unscored = labels == "T05"
    labels[unscored] = "excluded"
    light.obs["perturbation"] = pd.Categorical(labels)
    light.obs.loc[unscored, "contrastive_p_perturbed"] = np.nan
    light.obs.loc[unscored, "contrastive_class_global"] = np.nan

    assert pc.pl.responder_probabilities(light) is None
    (figure,) = (plt.figure(number) for number in plt.get_fignums())
    axis = figure.axes[0]
    names = [label.get_text() for label in axis.get_yticklabels()]
    assert "excluded" not in names
    assert "T05" not in names
    assert names[-1] == CONTROL
    assert len(names) == len(set(labels)) - 1


def test_responder_probabilities_missing_inputs(trained):
    adata, _ = trained
    with pytest.raises(KeyError, match=r"contrastive_p_perturbed.*write_outputs"):
        pc.pl.responder_probabilities(_light(adata, ["perturbation"]))
    with pytest.raises(KeyError, match="perturbation_key="):
        pc.pl.responder_probabilities(adata, perturbation_key="guide_label")
    with pytest.raises(KeyError, match=r"contrastive_class_global.*control="):
        pc.pl.responder_probabilities(_light(adata, ["perturbation", "contrastive_p_perturbed"]))
    with pytest.raises(ValueError, match="control"):
        pc.pl.responder_probabilities(adata, control="NTC")


# ---------------------------------------------------------------------------- history


def test_training_history_of_the_model(trained, tmp_path):
    _, model = trained
    history = model.history
    path = tmp_path / "history.svg"
    figure = pc.pl.training_history(model, return_fig=True, save=path)
    assert path.stat().st_size > 0

    logged = {key: frame.iloc[:, 0].astype(float).dropna() for key, frame in history.items()}
    logged = {key: values for key, values in logged.items() if len(values)}
    terms = list(
        dict.fromkeys(key.removesuffix("_train").removesuffix("_validation") for key in logged)
    )
    assert [axis.get_title() for axis in figure.axes] == terms
    for axis in figure.axes:
        for line in axis.lines:
            split = line.get_label()
            key = axis.get_title() if split == axis.get_title() else f"{axis.get_title()}_{split}"
            assert len(line.get_xdata()) == len(logged[key])
            np.testing.assert_allclose(line.get_ydata(), logged[key].to_numpy())
    train_keys = [key for key in logged if key.endswith("_train")]
    assert train_keys
    assert all(len(logged[key]) == 60 for key in train_keys)  # epochs of the fixture


def test_training_history_groups_splits_and_skips_empty_keys():
    epochs = pd.RangeIndex(10)

    def frame(key, values):
        return pd.DataFrame({key: values}, index=epochs)

    history = {
        "loss_train": frame("loss_train", np.linspace(10, 1, 10)),
        "loss_validation": frame("loss_validation", np.linspace(11, 2, 10)),
        "background_mmd_train": frame("background_mmd_train", np.linspace(1, 0, 10)),
        "kl_weight": frame("kl_weight", np.linspace(0, 1, 10)),
        "salient_wasserstein_validation": frame("salient_wasserstein_validation", [np.nan] * 10),
        "empty_train": pd.DataFrame({"empty_train": []}, dtype=float),
    }
    figure = pc.pl.training_history(history, ncols=2, return_fig=True)
    assert [axis.get_title() for axis in figure.axes] == ["loss", "background_mmd", "kl_weight"]
    loss = figure.axes[0]
    assert [line.get_label() for line in loss.lines] == ["train", "validation"]
    assert [len(line.get_xdata()) for line in loss.lines] == [10, 10]
    assert len(figure.axes[2].lines) == 1

    figure = pc.pl.training_history(history, skip_epochs=3, return_fig=True)
    assert [list(line.get_xdata()) for line in figure.axes[0].lines] == [list(range(3, 10))] * 2
    assert pc.pl.training_history(history) is None

    # The ELBO's panel marks the epoch early stopping keeps: the lowest validation value.
    validation = np.r_[np.linspace(10, 4, 6), np.linspace(4.5, 6, 4)]
    history["elbo_validation"] = frame("elbo_validation", validation)
    figure = pc.pl.training_history(history, return_fig=True)
    (elbo,) = [axis for axis in figure.axes if axis.get_title() == "elbo"]
    (marker,) = [line for line in elbo.lines if line.get_label() == "lowest (early stopping)"]
    assert list(marker.get_xdata()) == [5] and list(marker.get_ydata()) == [4.0]


def test_training_history_without_history():
    class Untrained:
        history = None

    with pytest.raises(ValueError, match=r"model\.train"):
        pc.pl.training_history(Untrained())
    with pytest.raises(ValueError, match="no finite values"):
        pc.pl.training_history({"loss_train": pd.DataFrame({"loss_train": [np.nan]})})
