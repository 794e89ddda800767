"""Seconds per training epoch of ContrastiveVAE against scvi-tools' ContrastiveVI, and a profile.

Both train on the same simulated core screen (``simulate_screen``'s defaults) at equal latent
sizes (10 + 10), network sizes (scvi-tools' defaults: one hidden layer of 128) and batch size
(128 cells per group), with 10% validation cells and early stopping off. An epoch is timed from
Lightning's ``on_train_epoch_start`` to ``on_train_epoch_end`` (its training steps and its
validation), after ``--warmup-epochs`` untimed epochs; the median over ``--epochs`` timed epochs
is reported. The two methods alternate ``--repeats`` times, and the ratio of each pair is given,
since only a ratio measured in one run compares across runs on a noisy machine.

``--model`` passes JSON of further ContrastiveVAE arguments, to time an option.

``--profile`` adds torch.profiler's table of the operators that took the most time in one
epoch of ContrastiveVAE (its self time, summed over calls). ``--sparse-probe`` times the
encoders' first layer (a step's 256 cells x genes, times 128 hidden units, forward and backward)
as a dense product and as torch's sparse CSR x dense product, at several densities.

Each epoch also records the process's minor page faults and system CPU seconds
(``getrusage``): at 100,000 cells the allocator returned and re-faulted the large cells x genes
temporaries at every step. The page header names any ``MALLOC_*`` variable set for the run, so
that runs with and without glibc's tuning variables can be compared.

The table also gives training throughput, cells per second (the training cells of an epoch
divided by its seconds), so that runs at several sizes show whether the cost grows linearly in
cells. ``--simulate-at-most N`` simulates N cells and repeats that screen's cells to reach a
larger size (``benchmark_core.large_screen``).

Run alone, by hand:  .venv/bin/python benchmarks/epoch_time.py --cells 10000 100000 --output docs/benchmark_epoch_time.md
Throughput:  .venv/bin/python benchmarks/epoch_time.py --cells 50000 200000 500000 --epochs 2 --repeats 1 --simulate-at-most 50000 --output docs/benchmark_throughput.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import scvi
import torch
from benchmark_core import CONTROL, large_screen, milliseconds, write_results
from torch.profiler import ProfilerActivity, profile

import pertpy_contrastive as pc

# Both methods train on 90% of the cells (their validation split is not timed: early stopping
# is off, so scvi-tools' Trainer does not validate).
TRAIN_SIZE = 0.9


class EpochTimer(pl.Callback):
    """Records wall time, minor page faults and system CPU time of every training epoch."""

    def __init__(self):
        self.costs: dict[str, list[float]] = {"seconds": [], "minor_faults": [], "system": []}

    @staticmethod
    def _now() -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "seconds": time.perf_counter(),
            "minor_faults": usage.ru_minflt,
            "system": usage.ru_stime,
        }

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = self._now()

    def on_train_epoch_end(self, trainer, pl_module):
        for name, value in self._now().items():
            self.costs[name].append(value - self._start[name])


def train_contrastive_vae(adata, n_epochs, callbacks, model_kwargs):
    data = adata.copy()
    pc.ContrastiveVAE.setup_anndata(
        data, perturbation_key="perturbation", control=CONTROL, batch_key="batch"
    )
    model = pc.ContrastiveVAE(data, n_salient=10, n_background=10, seed=0, **model_kwargs)
    model.train(
        max_epochs=n_epochs,
        early_stopping=False,
        enable_progress_bar=False,
        callbacks=callbacks,
    )


def train_contrastive_vi(adata, n_epochs, callbacks):
    scvi.settings.seed = 0
    data = adata.copy()
    scvi.external.ContrastiveVI.setup_anndata(data, batch_key="batch")
    model = scvi.external.ContrastiveVI(data, n_salient_latent=10, n_background_latent=10)
    is_control = (data.obs["perturbation"] == CONTROL).to_numpy()
    model.train(
        background_indices=np.flatnonzero(is_control).tolist(),
        target_indices=np.flatnonzero(~is_control).tolist(),
        max_epochs=n_epochs,
        batch_size=128,
        early_stopping=False,
        enable_progress_bar=False,
        callbacks=callbacks,
    )


def median_epoch_costs(train, adata, args) -> dict[str, float]:
    """Median over the timed epochs of each of ``EpochTimer``'s costs."""
    timer = EpochTimer()
    train(adata, args.warmup_epochs + args.epochs, [timer])
    return {
        name: statistics.median(values[args.warmup_epochs :])
        for name, values in timer.costs.items()
    }


class ProfileOneEpoch(pl.Callback):
    """Runs torch.profiler over the last training epoch."""

    def __init__(self, last_epoch: int):
        self.last_epoch = last_epoch
        self.profiler = profile(activities=[ProfilerActivity.CPU])

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.last_epoch:
            self.profiler.__enter__()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.last_epoch:
            self.profiler.__exit__(None, None, None)


def profile_lines(adata, args, model_kwargs, n_rows=12) -> list[str]:
    """The operators with the most self time in one epoch of ContrastiveVAE, as a table."""
    profiler = ProfileOneEpoch(args.warmup_epochs)
    train_contrastive_vae(adata, args.warmup_epochs + 1, [profiler], model_kwargs)
    events = sorted(
        profiler.profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True
    )
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| operator | self time (s) | share | calls |", "|---|---|---|---|"]
    for event in events[:n_rows]:
        lines.append(
            f"| `{event.key}` | {event.self_cpu_time_total / 1e6:.2f} | "
            f"{event.self_cpu_time_total / total:.1%} | {event.count} |"
        )
    lines.append(f"| all operators | {total / 1e6:.2f} | 100% | |")
    return lines


def sparse_probe_lines(n_genes, densities=(0.05, 0.1, 0.2, 0.5), repeats=50) -> list[str]:
    """Milliseconds of the first encoder layer's product, dense against sparse CSR input."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, n_genes, generator=generator, requires_grad=True)
    lines = [
        "| density of the counts | dense (ms) | sparse CSR, input already sparse (ms) | "
        "converting the dense step to CSR (ms) |",
        "|---|---|---|---|",
    ]

    for density in densities:
        mask = torch.rand(256, n_genes, generator=generator) < density
        dense = torch.rand(256, n_genes, generator=generator) * mask
        sparse = dense.to_sparse_csr()
        times = [
            milliseconds(lambda x=x: (x @ weight.T).sum().backward(), repeats)
            for x in (dense, sparse)
        ]
        times.append(milliseconds(lambda x=dense: x.to_sparse_csr(), repeats))
        lines.append(f"| {density} | " + " | ".join(f"{t:.2f}" for t in times) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000])
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run")
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated screen")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sparse-probe", action="store_true")
    parser.add_argument(
        "--simulate-at-most", type=int, help="simulate at most this many cells, then repeat them"
    )
    parser.add_argument("--model", default="{}", help="JSON of further ContrastiveVAE arguments")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmark_epoch_time.md"))
    args = parser.parse_args()
    model_kwargs = json.loads(args.model)
    methods = {
        "ContrastiveVAE": partial(train_contrastive_vae, model_kwargs=model_kwargs),
        "ContrastiveVI": train_contrastive_vi,
    }
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    lines = [
        "| cells | ContrastiveVAE s / epoch | ContrastiveVI s / epoch | ratio per repeat | "
        "median ratio | ContrastiveVAE cells / s | ContrastiveVI cells / s | "
        "minor page faults / epoch, ContrastiveVAE / ContrastiveVI | "
        "system CPU s / epoch, ContrastiveVAE / ContrastiveVI |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    profiles = []
    for n_cells in args.cells:
        adata = large_screen(n_cells, args.genes, args.seed, args.simulate_at_most)
        costs = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, train in methods.items():
                costs[name].append(median_epoch_costs(train, adata, args))
                print(n_cells, name, costs[name][-1], flush=True)
        median = {
            name: {cost: statistics.median(run[cost] for run in runs) for cost in runs[0]}
            for name, runs in costs.items()
        }
        ratios = [
            ours["seconds"] / theirs["seconds"]
            for ours, theirs in zip(*costs.values(), strict=True)
        ]
        lines.append(
            f"| {n_cells} | {median['ContrastiveVAE']['seconds']:.2f} | "
            f"{median['ContrastiveVI']['seconds']:.2f} | "
            f"{', '.join(f'{r:.2f}' for r in ratios)} | **{statistics.median(ratios):.2f}** | "
            + " | ".join(
                f"{TRAIN_SIZE * n_cells / median[name]['seconds']:,.0f}" for name in methods
            )
            + " | "
            + " / ".join(f"{median[name]['minor_faults']:,.0f}" for name in methods)
            + " | "
            + " / ".join(f"{median[name]['system']:.2f}" for name in methods)
            + " |"
        )
        if args.profile:
            profiles += ["", f"Profile of one ContrastiveVAE epoch at {n_cells} cells:", ""]
            profiles += profile_lines(adata, args, model_kwargs)
        del adata  # before the next size's screen is built
    if args.sparse_probe:
        profiles += ["", "The encoders' first layer, dense against sparse input:", ""]
        profiles += sparse_probe_lines(args.genes)
    header = (
        f"Simulated core screen, {args.genes} genes, seed {args.seed}; {args.warmup_epochs} "
        f"warm-up epoch(s), then the median of {args.epochs} timed epochs, {args.repeats} "
        f"alternating runs per method; {torch.get_num_threads()} torch threads, "
        f"{platform.processor() or platform.machine()}, CPU only. Cells per second: 90% of "
        "the cells (the training split) over the median seconds per epoch. Page faults and "
        "system time: medians over the timed epochs, whole process."
    )
    allocator = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}
    header += " Allocator variables: " + (
        ", ".join(f"`{k}={v}`" for k, v in allocator.items()) if allocator else "none set."
    )
    if model_kwargs:
        header += f" Further ContrastiveVAE arguments: {args.model}."
    if args.simulate_at_most:
        header += (
            f" Sizes above {args.simulate_at_most:,} cells repeat the cells of the "
            f"{args.simulate_at_most:,}-cell simulated screen."
        )
    command = (
        f"`{''.join(f'{k}={v} ' for k, v in allocator.items())}"
        f".venv/bin/python benchmarks/epoch_time.py --cells {' '.join(map(str, args.cells))} "
        f"--genes {args.genes} --epochs {args.epochs} --warmup-epochs {args.warmup_epochs} "
        f"--repeats {args.repeats} --seed {args.seed}{' --profile' if args.profile else ''}"
        f"{' --sparse-probe' if args.sparse_probe else ''}"
        f"{f' --simulate-at-most {args.simulate_at_most}' if args.simulate_at_most else ''} "
        + (f"--model '{args.model}' " if model_kwargs else "")
        + f"--output {args.output}`"
    )
    write_results(args.output, "Seconds per epoch", command, header, lines + profiles)


if __name__ == "__main__":
    main()
