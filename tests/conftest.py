import logging
import warnings

import numpy as np
import pytest
from _helpers import setup, strong_program_screen

import pertpy_contrastive as pc


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*litlogger.*")
        yield


@pytest.fixture
def screen():
    """A small simulated screen: 800 cells, 120 genes, 2 batches."""
    return pc.datasets.simulate_screen(
        n_cells=800,
        n_genes=120,
        n_targets=6,
        n_programs=2,
        n_null_targets=2,
        program_size=15,
        seed=1,
    )


def _trained_screen(**model_kwargs):
    """A trained model with written outputs: 1500 cells, 200 genes, strong programs.

    Each cell also has one of two guides: ``<target>_g1`` for 80% of its target's responders
    and 20% of its escapers, ``<target>_g2`` for the others, so that g1 is the efficient guide.
    """
    adata = strong_program_screen()
    rng = np.random.default_rng(0)
    labels = adata.obs["perturbation"].astype(str)
    is_escaper = adata.obs["escaped"].to_numpy()
    first_guide = rng.random(adata.n_obs) < np.where(is_escaper, 0.2, 0.8)
    adata.obs["guide"] = (labels + np.where(first_guide, "_g1", "_g2")).astype("category")
    setup(adata, batch_key="batch", guide_key="guide")
    model = pc.ContrastiveVAE(adata, seed=0, **model_kwargs)
    model.train(max_epochs=60, batch_size=64, early_stopping=False, enable_progress_bar=False)
    model.write_outputs()
    return adata, model


@pytest.fixture(scope="session")
def trained():
    """The default (plain) model, trained on the strong-program screen."""
    return _trained_screen()


@pytest.fixture
def screen_file(screen, tmp_path):
    """The ``screen`` fixture written to an .h5ad file, as the command line reads it."""
    path = tmp_path / "screen.h5ad"
    screen.write_h5ad(path)
    return path
