"""Every bad input gets an error that names the problem and the fix, and changes nothing."""

import logging

import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _helpers import CONTROL, quick_train, setup

import pertpy_contrastive as pc


def _snapshot(adata):
    return {
        "X": adata.X.copy(),
        "obs": adata.obs.copy(),
        "obsm": set(adata.obsm),
        "layers": set(adata.layers),
        "uns": set(adata.uns),
    }


def _assert_unchanged(adata, before):
    assert np.array_equal(adata.X.toarray(), before["X"].toarray(), equal_nan=True)
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    assert set(adata.obsm) == before["obsm"]
    assert set(adata.layers) == before["layers"]
    assert set(adata.uns) == before["uns"]


def test_no_control_cells(screen):
    screen.obs["perturbation"] = screen.obs["perturbation"].astype(str)
    screen.obs.loc[screen.obs["perturbation"] == CONTROL, "perturbation"] = np.nan
    before = _snapshot(screen)
    with pytest.raises(ValueError, match="Control label.*not found.*Pass control="):
        setup(screen)
    _assert_unchanged(screen, before)


def test_control_label_only_in_excluded_cells(screen):
    with pytest.raises(ValueError, match="both control and excluded"):
        setup(screen, exclude=[CONTROL])


def test_control_label_absent_lists_present_labels(screen):
    before = _snapshot(screen)
    with pytest.raises(ValueError, match=r"\['NT'\] not found.*'non-targeting' \(\d+\)"):
        setup(screen, control="NT")
    _assert_unchanged(screen, before)


def test_all_labelled_cells_are_controls(screen):
    with pytest.raises(ValueError, match="No perturbed cells"):
        setup(screen, exclude=[t for t in screen.obs["perturbation"].unique() if t != CONTROL])


def test_unknown_perturbation_key(screen):
    with pytest.raises(KeyError, match="'guide' is not a column of obs"):
        setup(screen, perturbation_key="guide")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "NaN or infinite"),
        (np.inf, "NaN or infinite"),
        (-1.0, "negative values"),
    ],
)
def test_invalid_counts(screen, value, message):
    screen.X = screen.X.astype(np.float32)
    screen.X.data[5] = value
    before = _snapshot(screen)
    with pytest.raises(ValueError, match=message):
        setup(screen)
    _assert_unchanged(screen, before)


def test_invalid_counts_in_dense_layer(screen):
    screen.layers["counts"] = screen.X.toarray().astype(np.float32)
    screen.layers["counts"][3, 4] = np.nan
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\] contains NaN"):
        setup(screen, layer="counts")


def test_non_integer_counts_warn(screen):
    screen.X = screen.X.astype(np.float32)
    screen.X.data[:10] += 0.5
    with pytest.warns(UserWarning, match="non-integer values"):
        setup(screen)


def test_missing_layer(screen):
    with pytest.raises(KeyError, match="Layer 'counts' not found"):
        setup(screen, layer="counts")


def test_cells_with_zero_counts(screen):
    counts = screen.X.tolil()
    counts[[2, 7], :] = 0
    screen.X = counts.tocsr()
    before = _snapshot(screen)
    with pytest.raises(
        ValueError, match=r"2 cells have zero total counts.*cell_00002.*filter_cells"
    ):
        setup(screen)
    _assert_unchanged(screen, before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_key": "replicate"},
        {"categorical_covariate_keys": ["cell_line"]},
        {"continuous_covariate_keys": ["percent_mito"]},
    ],
)
def test_unknown_covariate_key(screen, kwargs):
    before = _snapshot(screen)
    with pytest.raises(KeyError, match="is not a column of obs. Available columns"):
        setup(screen, **kwargs)
    _assert_unchanged(screen, before)


def test_nan_in_categorical_covariate(screen):
    screen.obs["batch"] = screen.obs["batch"].astype(object)
    screen.obs.iloc[3, screen.obs.columns.get_loc("batch")] = np.nan
    before = _snapshot(screen)
    with pytest.raises(ValueError, match=r"obs\['batch'\] \(Batch key\) has 1 missing values"):
        setup(screen, batch_key="batch")
    _assert_unchanged(screen, before)


def test_nan_in_continuous_covariate(screen):
    screen.obs.iloc[5, screen.obs.columns.get_loc("stress")] = np.nan
    with pytest.raises(ValueError, match=r"obs\['stress'\] has 1 NaN or infinite"):
        setup(screen, continuous_covariate_keys=["stress"])


def test_non_numeric_continuous_covariate(screen):
    with pytest.raises(TypeError, match="is not numeric"):
        setup(screen, continuous_covariate_keys=["subclone"])


def test_fewer_cells_than_a_minibatch(screen):
    setup(screen)
    model = pc.ContrastiveVAE(screen)
    with pytest.raises(ValueError, match=r"fewer than one minibatch.*smaller batch_size"):
        model.train(max_epochs=1, batch_size=1000)


def test_batch_without_controls(screen):
    controls_in_batch0 = (screen.obs["perturbation"] == CONTROL) & (screen.obs["batch"] == "batch0")
    screen = screen[~controls_in_batch0.to_numpy()].copy()
    setup(screen, batch_key="batch")
    model = pc.ContrastiveVAE(screen)
    with pytest.raises(
        ValueError, match=r"batch 'batch0' of obs\['batch'\] has no control cells.*batch_key=None"
    ):
        model.train(max_epochs=1, batch_size=16)


def test_mudata_without_modality(screen):
    mdata = md.MuData({"gex": screen})
    with pytest.raises(KeyError, match=r"no modality 'rna'; its modalities are \['gex'\]"):
        setup(mdata)


def test_mudata_key_only_in_global_obs(screen):
    mdata = md.MuData({"rna": screen})
    mdata.obs["target"] = screen.obs["perturbation"].to_numpy()
    with pytest.raises(KeyError, match="global obs: copy it to the modality"):
        setup(mdata, perturbation_key="target")


def test_load_onto_different_genes(screen, tmp_path):
    setup(screen)
    model = quick_train(pc.ContrastiveVAE(screen), max_epochs=1)
    model.save(tmp_path / "model")
    fewer = screen[:, 10:].copy()
    with pytest.raises(ValueError, match=r"110 genes where the model has 120.*subset and reorder"):
        pc.ContrastiveVAE.load(tmp_path / "model", adata=fewer)
    shuffled = screen[:, np.random.default_rng(0).permutation(screen.n_vars)].copy()
    with pytest.raises(ValueError, match="same genes in a different order"):
        pc.ContrastiveVAE.load(tmp_path / "model", adata=shuffled)
    with pytest.raises(ValueError, match="same genes in a different order"):
        model.get_latent_representation(shuffled)


def test_unassigned_looking_label_warns(screen):
    screen.obs["perturbation"] = screen.obs["perturbation"].astype(str)
    screen.obs.iloc[:20, screen.obs.columns.get_loc("perturbation")] = "Negative"
    with pytest.warns(
        UserWarning, match=r"'Negative' \(\d+ cells\).*exclude=\['Negative'\]"
    ) as record:
        setup(screen)
    assert sum("'Negative'" in str(warning.message) for warning in record) == 1


def test_setup_logs_the_cell_groups_once_through_scvi_tools_logger(screen):
    """INFO messages reach the user by scvi-tools' handler, and setup logs the groups once."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    scvi_logger = logging.getLogger("scvi")
    # scvi-tools' default verbosity; the command line's tests, run in-process, lower it.
    level = scvi_logger.level
    scvi_logger.setLevel(logging.INFO)
    scvi_logger.addHandler(handler)
    try:
        setup(screen)
    finally:
        scvi_logger.removeHandler(handler)
        scvi_logger.setLevel(level)
    messages = [record.getMessage() for record in records]
    assert sum(message.startswith("Cell groups from obs") for message in messages) == 1


def test_setup_writes_only_documented_keys(screen):
    screen.obs["percent_mito"] = np.linspace(0, 5, screen.n_obs)
    screen.layers["counts"] = screen.X.copy()
    before = _snapshot(screen)
    setup(
        screen,
        layer="counts",
        batch_key="batch",
        categorical_covariate_keys=["subclone"],
        continuous_covariate_keys=["percent_mito"],
    )
    new_obs = set(screen.obs.columns) - set(before["obs"].columns)
    assert new_obs == {"_scvi_contrastive_group", "_scvi_contrastive_target", "_scvi_batch"}
    pd.testing.assert_frame_equal(screen.obs[before["obs"].columns], before["obs"])
    assert set(screen.obsm) - before["obsm"] == {
        "_scvi_extra_categorical_covs",
        "_scvi_extra_continuous_covs",
    }
    assert set(screen.uns) - before["uns"] == {"_scvi_uuid", "_scvi_manager_uuid"}
    assert set(screen.layers) == before["layers"]
    assert (before["X"] != screen.X).nnz == 0
    assert sp.issparse(screen.X) and sp.issparse(screen.layers["counts"])
