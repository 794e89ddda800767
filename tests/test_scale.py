"""Large data: dense layers skipped or streamed to disk for a gene and cell subset, backed data."""

import anndata
import numpy as np
import pytest
from _helpers import quick_train, setup

import pertpy_contrastive as pc

LAYERS = ("denoised", "effect")


def test_layers_stream_to_a_file_for_a_gene_and_cell_subset(trained, tmp_path):
    adata, model = trained
    genes = list(adata.var_names[[7, 0, 3]])
    cells = np.array([1200, 5, 1, 700, 2])
    path = tmp_path / "layers.h5ad"
    written = model.write_outputs(
        adata.copy(),
        prefix="streamed",
        layers_file=path,
        gene_list=genes,
        cell_indices=cells,
        progress_bar=False,
    )
    assert not any(key.startswith("streamed") for key in written.layers if key)
    assert "X_streamed_salient" in written.obsm and "streamed_p_perturbed" in written.obs
    on_disk = anndata.read_h5ad(path, backed="r")
    assert list(on_disk.obs_names) == list(adata.obs_names[cells])
    assert list(on_disk.var_names) == genes
    for name in LAYERS:
        streamed = np.asarray(on_disk.layers[f"streamed_{name}"])
        assert streamed.dtype == np.float32
        in_memory = adata.layers[f"contrastive_{name}"][cells][:, [7, 0, 3]]
        np.testing.assert_allclose(streamed, in_memory, rtol=1e-4, atol=1e-5)


def test_dense_layers_can_be_skipped(trained):
    adata, model = trained
    written = model.write_outputs(adata.copy(), prefix="light", dense_layers=False)
    assert not any(key.startswith("light") for key in written.layers if key)
    np.testing.assert_array_equal(
        written.obsm["X_light_salient"], adata.obsm["X_contrastive_salient"]
    )


def test_layer_selection_errors_leave_data_unchanged(trained, tmp_path):
    adata, model = trained
    copy = adata.copy()
    with pytest.raises(ValueError, match="select the layers written to layers_file"):
        model.write_outputs(copy, prefix="bad", gene_list=["G0"])
    with pytest.raises(ValueError, match="absent from var_names"):
        model.write_outputs(copy, prefix="bad", layers_file=tmp_path / "x.h5ad", gene_list=["?"])
    existing = tmp_path / "existing.h5ad"
    existing.write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.write_outputs(copy, prefix="bad", layers_file=existing)
    assert existing.read_text() == "mine"
    assert not any(key.startswith("bad") for key in [*copy.obsm, *copy.obs, *copy.uns])


def test_backed_data_trains_and_streams_a_gene_subset(screen, tmp_path):
    path = tmp_path / "screen.h5ad"
    screen.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    setup(backed, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(backed, n_hidden=16))
    genes = list(backed.var_names[:5])
    model.write_outputs(layers_file=tmp_path / "layers.h5ad", gene_list=genes, progress_bar=False)
    assert backed.isbacked
    assert backed.obsm["X_contrastive_salient"].shape == (backed.n_obs, 10)
    layers = anndata.read_h5ad(tmp_path / "layers.h5ad")
    assert layers.shape == (backed.n_obs, 5)
    assert np.isfinite(layers.layers["contrastive_denoised"]).all()


def test_large_control_sets_are_subsampled_as_the_reference(trained, monkeypatch):
    adata, model = trained
    full = model.get_responder_probability(adata)
    _, cells = model._calibrated_background(adata, "rna")
    n_controls = len(cells.controls)
    monkeypatch.setattr(pc._background, "MAX_REFERENCE_CONTROLS", n_controls // 2)
    _, capped_cells = model._calibrated_background(adata, "rna")
    assert len(capped_cells.controls) == n_controls  # every control still gets class NT
    assert capped_cells.control_cells.counts.shape == (n_controls // 2, adata.n_vars)
    capped = model.get_responder_probability(adata)
    assert np.array_equal(np.isnan(capped), np.isnan(full))
    scored = ~np.isnan(full)
    # Half the controls as the reference: the same calls, up to the reference's noise.
    assert np.mean((capped[scored] > 0.5) == (full[scored] > 0.5)) > 0.95
