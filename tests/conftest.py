import logging
import warnings

import pytest

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
