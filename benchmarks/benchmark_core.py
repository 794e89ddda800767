"""Core benchmark: ContrastiveVAE against scvi-tools' ContrastiveVI, Mixscape and PCA.

All four run in one process on the same simulated screen (known truth). Reported:

- program separation: balanced accuracy of a 15-NN classifier (5-fold CV) predicting the true
  perturbation program of responding cells from the embedding (higher is better);
- background leakage, over all perturbed cells (lower is better): balanced 15-NN accuracy for
  the subclone, and 15-NN regression R^2 (5-fold CV) for the cell-cycle phase (cos, sin of the
  angle) and the stress state;
- training seconds per epoch and the peak rise of resident memory during the method's first run
  (approximate: memory freed by earlier runs is reused). Speed is also given as a ratio to
  ContrastiveVI trained with the same seed right before or after, since the machine is noisy.

Run by hand (about 12 minutes on 2 cores):  make benchmark  (or: .venv/bin/python benchmarks/benchmark_core.py --help)
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pertpy as pt
import scanpy as sc
import scvi
import torch
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.model_selection import cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

import pertpy_contrastive as pc

CONTROL = "non-targeting"
N_NEIGHBORS = 15


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


def program_separation(embedding, obs) -> float:
    responders = obs["responder"].to_numpy()
    labels = obs["program"].to_numpy()[responders]
    predicted = cross_val_predict(
        KNeighborsClassifier(N_NEIGHBORS), embedding[responders], labels, cv=5
    )
    return balanced_accuracy_score(labels, predicted)


def leakage(embedding, obs) -> dict[str, float]:
    perturbed = (obs["perturbation"] != CONTROL).to_numpy()
    x = embedding[perturbed]
    subclone = obs["subclone"].to_numpy()[perturbed]
    predicted = cross_val_predict(KNeighborsClassifier(N_NEIGHBORS), x, subclone, cv=5)
    angle = obs["cell_cycle_angle"].to_numpy()[perturbed]
    cycle = np.column_stack([np.cos(angle), np.sin(angle)])
    stress = obs["stress"].to_numpy()[perturbed]
    r2 = {}
    for name, truth in (("cell_cycle", cycle), ("stress", stress)):
        fitted = cross_val_predict(KNeighborsRegressor(N_NEIGHBORS), x, truth, cv=5)
        r2[name] = r2_score(truth, fitted)
    return {
        "subclone_accuracy": balanced_accuracy_score(subclone, predicted),
        "cell_cycle_r2": r2["cell_cycle"],
        "stress_r2": r2["stress"],
    }


def large_screen(n_cells, n_genes, seed, simulate_at_most=None, new_targets=False):
    """The core screen at ``n_cells``, repeating a smaller simulated screen's cells if asked to.

    The simulation holds several dense cells x genes float64 arrays (8 GB each at 500,000 x
    2,000), more than this machine's memory; a repeated cell costs what a new cell costs.
    ``new_targets`` gives each repeat's perturbed cells targets of their own (``T3`` becomes
    ``T3_r2``), so that cells per target stay as in the simulated screen, as in genome-wide
    screens, whose targets grow with their cells.
    """
    simulated = min(n_cells, simulate_at_most or n_cells)
    adata = pc.datasets.simulate_screen(n_cells=simulated, n_genes=n_genes, seed=seed)
    if simulated == n_cells:
        return adata
    rows = np.resize(np.arange(simulated), n_cells)
    repeated = adata[rows].copy()
    repeated.obs_names = [f"cell_{i:07d}" for i in range(n_cells)]
    if new_targets:
        labels = repeated.obs["perturbation"].astype(str).to_numpy()
        repeat = (np.arange(n_cells) // simulated).astype(str)
        perturbed = labels != CONTROL
        labels[perturbed] = np.char.add(np.char.add(labels[perturbed], "_r"), repeat[perturbed])
        repeated.obs["perturbation"] = pd.Categorical(labels)
    return repeated


def log_normalised(adata):
    normalised = adata.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    return normalised


def fit_contrastive_vae(adata, seed, epochs, model_kwargs=None, train_kwargs=None):
    """Train ContrastiveVAE on a copy of ``adata``; return the model and seconds per epoch.

    ``model_kwargs`` and ``train_kwargs`` go to the constructor and to ``train``; early stopping
    is off, so that every method trains for ``epochs``.
    """
    data = adata.copy()
    pc.ContrastiveVAE.setup_anndata(
        data, perturbation_key="perturbation", control=CONTROL, batch_key="batch"
    )
    model = pc.ContrastiveVAE(data, seed=seed, **(model_kwargs or {}))
    train_kwargs = {"early_stopping": False, "enable_progress_bar": False, **(train_kwargs or {})}
    start = time.perf_counter()
    model.train(max_epochs=epochs, seed=seed, **train_kwargs)
    return model, (time.perf_counter() - start) / epochs


def vae_kwargs(args) -> tuple[dict, dict]:
    """ContrastiveVAE's constructor and ``train`` arguments from the benchmark's options."""
    model_kwargs = {"n_salient": args.n_salient, "n_background": args.n_background}
    model_kwargs.update(json.loads(args.model))
    train_kwargs = {"n_epochs_kl_warmup": args.n_epochs_kl_warmup}
    if args.lr is not None:
        train_kwargs["lr"] = args.lr
    if args.responder_refinement:
        train_kwargs["n_epochs_responder_refinement"] = args.responder_refinement
    return model_kwargs, train_kwargs


def add_vae_arguments(parser) -> None:
    """The ContrastiveVAE options every benchmark takes."""
    parser.add_argument("--n-salient", type=int, default=10)
    parser.add_argument("--n-background", type=int, default=10)
    parser.add_argument("--n-epochs-kl-warmup", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="ContrastiveVAE's learning rate")
    parser.add_argument(
        "--responder-refinement",
        type=int,
        default=0,
        help="ContrastiveVAE.train's n_epochs_responder_refinement (after --epochs)",
    )
    parser.add_argument("--model", default="{}", help="JSON of further ContrastiveVAE arguments")


def vae_options(args) -> str:
    """The ContrastiveVAE options of ``args`` that differ from the defaults, as command text."""
    options = f" --n-epochs-kl-warmup {args.n_epochs_kl_warmup}" if args.n_epochs_kl_warmup else ""
    options += f" --lr {args.lr}" if args.lr is not None else ""
    if args.responder_refinement:
        options += f" --responder-refinement {args.responder_refinement}"
    if json.loads(args.model):
        options += f" --model '{args.model}'"
    return options


def milliseconds(function, repeats: int, warmup: int = 5) -> float:
    """Mean milliseconds of one call of ``function`` over ``repeats`` calls, after a warm-up."""
    for _ in range(warmup):
        function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1000


def write_results(path, title, command, header, lines) -> None:
    """Write a results page: title, the command and date that made it, a header, the tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# {title}\n\n"
        f"Produced by {command} on {time.strftime('%Y-%m-%d')}.\n\n{header}\n\n"
        + "\n".join(lines).rstrip("\n")
        + "\n"
    )
    print("\n".join(lines))


def run_contrastive_vae(adata, args, seed):
    model, seconds_per_epoch = fit_contrastive_vae(adata, seed, args.epochs, *vae_kwargs(args))
    return model.get_latent_representation(kind="salient"), seconds_per_epoch


def fit_contrastive_vi(adata, args, seed):
    """Train scvi-tools' ContrastiveVI on a copy of ``adata``; return it and seconds per epoch."""
    scvi.settings.seed = seed
    data = adata.copy()
    scvi.external.ContrastiveVI.setup_anndata(data, batch_key="batch")
    model = scvi.external.ContrastiveVI(
        data, n_salient_latent=args.n_salient, n_background_latent=args.n_background
    )
    is_control = (data.obs["perturbation"] == CONTROL).to_numpy()
    start = time.perf_counter()
    model.train(
        background_indices=np.flatnonzero(is_control).tolist(),
        target_indices=np.flatnonzero(~is_control).tolist(),
        max_epochs=args.epochs,
        early_stopping=False,
        enable_progress_bar=False,
    )
    return model, (time.perf_counter() - start) / args.epochs


def run_contrastive_vi(adata, args, seed):
    model, seconds_per_epoch = fit_contrastive_vi(adata, args, seed)
    return model.get_latent_representation(representation_kind="salient"), seconds_per_epoch


def mixscape_signature(adata):
    """Log-normalised ``adata`` with pertpy's Mixscape perturbation signature in ``layers['X_pert']``."""
    data = log_normalised(adata)
    sc.pp.pca(data, n_comps=50)
    pt.tl.Mixscape().perturbation_signature(
        data, pert_key="perturbation", control=CONTROL, split_by="batch", n_neighbors=20
    )
    return data


def run_mixscape(adata, args, seed):
    signature = mixscape_signature(adata)
    signature.X = signature.layers["X_pert"]
    sc.pp.pca(signature, n_comps=args.n_salient)
    return signature.obsm["X_pca"], None


def run_pca(adata, args, seed):
    data = log_normalised(adata)
    sc.pp.pca(data, n_comps=args.n_salient)
    return data.obsm["X_pca"], None


# name -> (runner, whether it is stochastic and so is repeated over seeds)
METHODS = {
    "ContrastiveVAE (ours)": (run_contrastive_vae, True),
    "scvi-tools ContrastiveVI": (run_contrastive_vi, True),
    "Mixscape signature + PCA": (run_mixscape, False),
    "PCA of log-normalised counts": (run_pca, False),
}
METRICS = ("program_separation", "subclone_accuracy", "cell_cycle_r2", "stress_r2")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=60)
    add_vae_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated screen")
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("docs/benchmark_core.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    scvi.settings.seed = args.seed

    adata = pc.datasets.simulate_screen(n_cells=args.cells, n_genes=args.genes, seed=args.seed)
    runs = []  # one row per method and seed
    # Seeds outermost, so that each time ratio compares runs made close together in time.
    for seed in args.model_seeds:
        for name, (run, stochastic) in METHODS.items():
            if not stochastic and seed != args.model_seeds[0]:
                continue
            with PeakMemory() as memory:
                embedding, seconds_per_epoch = run(adata, args, seed)
            row = {"method": name, "seed": seed, "seconds_per_epoch": seconds_per_epoch}
            row.update(
                memory_mb=memory.extra_mb,
                program_separation=program_separation(embedding, adata.obs),
            )
            row.update(leakage(embedding, adata.obs))
            runs.append(row)
            print(row, flush=True)

    anchor_seconds = {
        r["seed"]: r["seconds_per_epoch"] for r in runs if r["method"] == "scvi-tools ContrastiveVI"
    }
    for r in runs:
        if r["seconds_per_epoch"] is not None:
            r["time_ratio"] = r["seconds_per_epoch"] / anchor_seconds[r["seed"]]

    def cell(values, digits=3):
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"

    lines = [
        "| method | program separation (bal. acc., higher better) | subclone leakage (bal. acc.) "
        "| cell-cycle leakage (R²) | stress leakage (R²) | s / epoch | time ratio to ContrastiveVI "
        "| peak extra memory, first run (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in METHODS:
        rows = [r for r in runs if r["method"] == name]
        metrics = " | ".join(cell([r[m] for r in rows]) for m in METRICS)
        lines.append(
            f"| {name} | {metrics} | {cell([r['seconds_per_epoch'] for r in rows], 2)} "
            f"| {cell([r.get('time_ratio') for r in rows], 2)} "
            f"| {rows[0]['memory_mb']:.0f} |"
        )
    n_subclones = adata.obs["subclone"].nunique()
    header = (
        f"Simulated screen: {args.cells} cells × {args.genes} genes, seed {args.seed}; "
        f"{args.epochs} epochs, n_salient={args.n_salient}, n_background={args.n_background}, "
        f"other settings at their defaults; the two VAEs are trained with model seeds "
        f"{args.model_seeds} and reported as mean ± sd; "
        f"batch size 128 per group, {torch.get_num_threads()} torch threads, "
        f"{platform.processor() or platform.machine()}, CPU only. Chance level: program "
        f"separation {1 / adata.obs.loc[adata.obs.responder, 'program'].nunique():.3f}, subclone "
        f"{1 / n_subclones:.3f}, R² 0."
    )
    command = (
        f"`.venv/bin/python benchmarks/benchmark_core.py --cells {args.cells} --genes {args.genes} "
        f"--epochs {args.epochs} --seed {args.seed}{vae_options(args)} "
        f"--model-seeds {' '.join(map(str, args.model_seeds))} --output {args.output}`"
    )
    write_results(args.output, "Core benchmark results", command, header, lines)


if __name__ == "__main__":
    main()
