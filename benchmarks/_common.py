"""What the benchmark scripts share: screens, training, metrics and the JSON results.

Each script writes its records into ``benchmarks/results/<name>.json`` (a list of flat records,
each with the command that made it), and ``benchmarks/report.py`` turns them into
``docs/benchmarks.md``. Records of a run replace the records of an earlier run with the same
keys, so a script can be rerun for one screen or seed.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
import scvi
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.model_selection import cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

import pertpy_contrastive as pc

CONTROL = "non-targeting"
N_NEIGHBORS = 15
RESULTS = Path(__file__).parent / "results"

SCREENS = {
    "core": {},
    "calling": {"n_targets": 24, "n_null_targets": 8, "effect_size": 0.4},
    "hard": {
        "n_targets": 24,
        "n_null_targets": 8,
        "effect_size": 0.3,
        "escape_fraction": 0.5,
        "mean_library_size": 2_000.0,
    },
}
"""The simulated screens (``pc.datasets.simulate_screen`` arguments besides size and seed).

``core``: 12 targets (3 null), program log fold change 0.8; ``calling``: 24 targets (8 null),
weak programs (0.4); ``hard``: weaker programs (0.3), half the cells escape, 2,000 UMIs.
"""


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.WARNING)


def command_line() -> str:
    """The command that is running, as a reader would type it."""
    return ".venv/bin/python " + " ".join(shlex.quote(part) for part in sys.argv)


def simulate(screen: str, n_cells: int = 10_000, n_genes: int = 2_000, seed: int = 0):
    return pc.datasets.simulate_screen(
        n_cells=n_cells, n_genes=n_genes, seed=seed, **SCREENS[screen]
    )


def large_screen(
    n_cells: int,
    n_genes: int = 2_000,
    seed: int = 0,
    simulate_at_most: int | None = None,
    new_targets: bool = False,
    screen: str = "core",
):
    """``screen`` at ``n_cells``, repeating a smaller simulated screen's cells if asked to.

    The simulation holds several dense cells x genes float64 arrays (8 GB each at 500,000 x
    2,000), more than a laptop's memory; a repeated cell costs what a new cell costs.
    ``new_targets`` gives each repeat's perturbed cells targets of their own (``T3`` becomes
    ``T3_r2``), so that cells per target stay as in the simulated screen, as in genome-wide
    screens, whose targets grow with their cells.
    """
    simulated = min(n_cells, simulate_at_most or n_cells)
    adata = simulate(screen, simulated, n_genes, seed)
    if simulated == n_cells:
        return adata
    rows = np.resize(np.arange(simulated), n_cells)
    with warnings.catch_warnings():  # the repeated names, replaced below
        warnings.simplefilter("ignore", UserWarning)
        repeated = adata[rows].copy()
    repeated.obs_names = [f"cell_{i:07d}" for i in range(n_cells)]
    if new_targets:
        labels = repeated.obs["perturbation"].astype(str).to_numpy()
        repeat = (np.arange(n_cells) // simulated).astype(str)
        perturbed = labels != CONTROL
        labels[perturbed] = np.char.add(np.char.add(labels[perturbed], "_r"), repeat[perturbed])
        repeated.obs["perturbation"] = pd.Categorical(labels)
    return repeated


def save_records(name: str, records: list[dict], keys: tuple[str, ...]) -> Path:
    """Add ``records`` to ``results/<name>.json``, replacing earlier ones with the same keys."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(path.read_text()) if path.exists() else []
    new_keys = {tuple(record.get(key) for key in keys) for record in records}
    kept = [r for r in kept if tuple(r.get(key) for key in keys) not in new_keys]
    path.write_text(json.dumps(kept + records, indent=1, sort_keys=True, default=_plain) + "\n")
    return path


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {value!r}")


def machine() -> dict:
    import platform

    import torch

    return {
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "package_version": pc.__version__,
    }


class PeakMemory:
    """Samples this process's resident memory in a thread; reports the peak above the start."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval

    @staticmethod
    def _rss() -> int:
        with Path("/proc/self/statm").open() as statm:
            return int(statm.read().split()[1]) * 4096

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.extra_mb = (self.peak - self.start) / 1e6


# -- training ----------------------------------------------------------------------------------


def fit_contrastive_vae(adata, seed, model_kwargs=None, train_kwargs=None, batch_key="batch"):
    """Train ContrastiveVAE on a copy of ``adata`` as a user would; return it and its seconds."""
    data = adata.copy()
    pc.ContrastiveVAE.setup_anndata(
        data, perturbation_key="perturbation", control=CONTROL, batch_key=batch_key
    )
    model = pc.ContrastiveVAE(data, seed=seed, **(model_kwargs or {}))
    start = time.perf_counter()
    model.train(seed=seed, enable_progress_bar=False, **(train_kwargs or {}))
    return model, time.perf_counter() - start


def fit_contrastive_vi(adata, seed, max_epochs, batch_key="batch", **train_kwargs):
    """Train scvi-tools' ContrastiveVI on a copy of ``adata``; return it and its seconds.

    ``train_kwargs`` go to its ``train`` (e.g. ``batch_size``, ``callbacks``).
    """
    scvi.settings.seed = seed
    data = adata.copy()
    scvi.external.ContrastiveVI.setup_anndata(data, batch_key=batch_key)
    model = scvi.external.ContrastiveVI(data, n_salient_latent=10, n_background_latent=10)
    is_control = (data.obs["perturbation"] == CONTROL).to_numpy()
    start = time.perf_counter()
    model.train(
        background_indices=np.flatnonzero(is_control).tolist(),
        target_indices=np.flatnonzero(~is_control).tolist(),
        max_epochs=max_epochs,
        early_stopping=False,
        enable_progress_bar=False,
        **train_kwargs,
    )
    return model, time.perf_counter() - start


def log_normalised(adata):
    normalised = adata.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    return normalised


def pca_of_counts(adata, n_comps: int = 10) -> np.ndarray:
    normalised = log_normalised(adata)
    sc.pp.pca(normalised, n_comps=n_comps)
    return normalised.obsm["X_pca"]


# -- metrics -----------------------------------------------------------------------------------


def knn_balanced_accuracy(embedding, labels) -> float:
    """Balanced accuracy of a 15-NN classifier of ``labels`` (5-fold cross-validation)."""
    predicted = cross_val_predict(KNeighborsClassifier(N_NEIGHBORS), embedding, labels, cv=5)
    return float(balanced_accuracy_score(labels, predicted))


def program_separation(embedding, obs) -> float:
    """How well a 15-NN classifier tells the responders' programs apart (chance 1/programs)."""
    responders = obs["responder"].to_numpy()
    return knn_balanced_accuracy(embedding[responders], obs["program"].to_numpy()[responders])


def leakage(embedding, obs) -> dict[str, float]:
    """Background read from the perturbed cells' embedding: subclone, cell cycle, stress."""
    perturbed = (obs["perturbation"] != CONTROL).to_numpy()
    x = embedding[perturbed]
    angle = obs["cell_cycle_angle"].to_numpy()[perturbed]
    truths = {
        "cell_cycle_r2": np.column_stack([np.cos(angle), np.sin(angle)]),
        "stress_r2": obs["stress"].to_numpy()[perturbed],
    }
    scores = {"subclone_accuracy": knn_balanced_accuracy(x, obs["subclone"].to_numpy()[perturbed])}
    for name, truth in truths.items():
        fitted = cross_val_predict(KNeighborsRegressor(N_NEIGHBORS), x, truth, cv=5)
        scores[name] = float(r2_score(truth, fitted))
    return scores


def effect_targets(adata) -> set[str]:
    return {t for t, p in adata.uns["simulation"]["target_program"].items() if p != "none"}
