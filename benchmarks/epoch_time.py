"""Seconds per training epoch of ContrastiveVAE against scvi-tools' ContrastiveVI.

Both train on the same simulated core screen (``--cells`` cells x ``--genes`` genes, screen seed
0) at equal latent sizes (10 + 10), network sizes (one hidden layer of 128), training share (90%)
and batch size: ``--batch-size`` cells per group per step, ContrastiveVAE's ``batch_size`` and
ContrastiveVI's (which also draws that many control and that many perturbed cells per step).
Early stopping is off. An epoch (a pass over the larger group, for both) is timed from
Lightning's ``on_train_epoch_start`` to ``on_train_epoch_end`` after ``--warmup-epochs`` untimed
epochs, and a run's seconds per epoch is the median of its ``--epochs`` timed epochs. The two
methods alternate ``--repeats`` times (ContrastiveVAE, then ContrastiveVI: one pair), and the
ratio of each pair is recorded, since only a ratio measured side by side compares across runs
on a noisy machine. Throughput: the training cells (90%) over the seconds per epoch.

``--simulate-at-most N`` simulates N cells and repeats them up to larger sizes
(``_common.large_screen``). ``--profile`` adds, per size and batch size, where one epoch of
ContrastiveVAE spends its time per step: data loading, the forward pass (split into the encoders,
the decoder, the likelihood, the background MMD, and Pyro's tracing with the KL terms), the
backward pass and the optimiser. One torch thread by default.
Run by hand (about 10 minutes on 2 cores):

    .venv/bin/python benchmarks/epoch_time.py --cells 10000 100000 --batch-size 128 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning.pytorch as pl
import torch
from _common import (
    command_line,
    fit_contrastive_vae,
    fit_contrastive_vi,
    large_screen,
    machine,
    quiet,
    save_records,
)

KEYS = ("kind", "cells", "batch_size")
TRAIN_SIZE = 0.9  # the default of both methods
METHODS = ("ContrastiveVAE", "ContrastiveVI")


class EpochTimer(pl.Callback):
    """Records the wall time of every training epoch."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._start)


class StepClock(pl.Callback):
    """Wall time of the parts of each training step, from Lightning's hooks.

    ``data loading`` runs from one step's end to the next step's start (the sampler, the reads
    from the AnnData, the collation), ``forward`` to ``on_before_backward``, ``backward`` to
    ``on_after_backward``, and ``optimiser`` from ``on_before_optimizer_step`` to the step's
    end.
    """

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.seconds: dict[str, float] = dict.fromkeys(
            ("data loading", "forward", "backward", "optimiser"), 0.0
        )
        self.steps = 0
        self._mark = None

    def _timing(self, trainer) -> bool:
        return trainer.current_epoch == self.epoch

    def _lap(self, part: str | None) -> None:
        now = time.perf_counter()
        if part is not None and self._mark is not None:
            self.seconds[part] += now - self._mark
        self._mark = now

    def on_train_epoch_start(self, trainer, pl_module):
        if self._timing(trainer):
            self._lap(None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._timing(trainer):
            self._lap("data loading")
            self.steps += 1

    def on_before_backward(self, trainer, pl_module, loss):
        if self._timing(trainer):
            self._lap("forward")

    def on_after_backward(self, trainer, pl_module):
        if self._timing(trainer):
            self._lap("backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._timing(trainer):
            self._lap(None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._timing(trainer):
            self._lap("optimiser")


class ForwardParts:
    """Wall time of the parts of the forward pass, by wrapping the module's functions.

    The encoders (``encode``), the decoder (``_decode``), the count likelihood's ``log_prob``
    and the background MMD; the rest of the forward pass is Pyro's tracing and the KL terms.
    """

    def __init__(self):
        self.seconds = dict.fromkeys(("encoders", "decoder", "likelihood", "background MMD"), 0.0)
        self.active = False

    def wrap(self, owner, name: str, part: str) -> None:
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            if self.active:
                self.seconds[part] += time.perf_counter() - start
            return result

        setattr(owner, name, timed)


def train(
    method: str,
    adata,
    n_epochs: int,
    batch_size: int,
    callbacks: list,
    accelerator: str = "auto",
    precision: str = "32-true",
) -> None:
    """Train ``method`` with early stopping off; ``precision`` is ContrastiveVAE's (VI: float32)."""
    common = {"batch_size": batch_size, "callbacks": callbacks, "accelerator": accelerator}
    if method == "ContrastiveVAE":
        train_kwargs = {"max_epochs": n_epochs, "precision": precision, **common}
        fit_contrastive_vae(adata, 0, train_kwargs={"early_stopping": False, **train_kwargs})
    else:
        fit_contrastive_vi(adata, 0, n_epochs, **common)


def seconds_per_epoch(method: str, adata, batch_size: int, args) -> float:
    """The median over the timed epochs of one run."""
    timer = EpochTimer()
    train(method, adata, args.warmup_epochs + args.epochs, batch_size, [timer])
    return statistics.median(timer.seconds[args.warmup_epochs :])


def profile_step(adata, batch_size: int, args) -> dict:
    """Seconds per step of each part of a ContrastiveVAE training step, over one epoch."""
    import pertpy_contrastive._likelihoods as likelihoods
    import pertpy_contrastive._module as module

    clock, parts = StepClock(args.warmup_epochs), ForwardParts()
    originals = {
        (module.ContrastivePyroModule, "encode"): module.ContrastivePyroModule.encode,
        (module.ContrastivePyroModule, "_decode"): module.ContrastivePyroModule._decode,
        (likelihoods.ZeroInflatedNegativeBinomial, "log_prob"): (
            likelihoods.ZeroInflatedNegativeBinomial.log_prob
        ),
        (module, "_mmd"): module._mmd,
    }
    for (owner, name), part in zip(originals, parts.seconds, strict=True):
        parts.wrap(owner, name, part)

    class Switch(pl.Callback):  # time the forward parts in the clock's epoch only
        def on_train_epoch_start(self, trainer, pl_module):
            parts.active = trainer.current_epoch == clock.epoch

        def on_validation_epoch_start(self, trainer, pl_module):
            parts.active = False

    try:
        train("ContrastiveVAE", adata, args.warmup_epochs + 1, batch_size, [clock, Switch()])
    finally:
        for (owner, name), function in originals.items():
            setattr(owner, name, function)
    seconds = dict(clock.seconds)
    seconds["forward: Pyro tracing and KL"] = seconds["forward"] - sum(parts.seconds.values())
    seconds |= {f"forward: {part}": value for part, value in parts.seconds.items()}
    return {
        "steps": clock.steps,
        "milliseconds_per_step": {
            part: 1e3 * value / clock.steps for part, value in seconds.items()
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000])
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument(
        "--batch-size", type=int, nargs="+", default=[128], help="cells per group per step"
    )
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run")
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="alternating pairs of runs")
    parser.add_argument(
        "--simulate-at-most", type=int, help="simulate at most this many cells, then repeat them"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also split one epoch's steps into parts"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    for n_cells in args.cells:
        adata = large_screen(n_cells, args.genes, simulate_at_most=args.simulate_at_most)
        for batch_size in args.batch_size:
            seconds = {method: [] for method in METHODS}
            for _ in range(args.repeats):
                for method in METHODS:
                    seconds[method].append(seconds_per_epoch(method, adata, batch_size, args))
                    print(n_cells, batch_size, method, f"{seconds[method][-1]:.2f}", flush=True)
            record = {
                "kind": "timing",
                "cells": n_cells,
                "genes": args.genes,
                "batch_size": batch_size,
                "simulated_cells": min(n_cells, args.simulate_at_most or n_cells),
                "warmup_epochs": args.warmup_epochs,
                "timed_epochs": args.epochs,
                "train_size": TRAIN_SIZE,
                "seconds_per_epoch": seconds,
                "ratios": [ours / theirs for ours, theirs in zip(*seconds.values(), strict=True)],
            }
            records = [record]
            if args.profile:
                records.append(
                    {
                        "kind": "profile",
                        "cells": n_cells,
                        "genes": args.genes,
                        "batch_size": batch_size,
                        **profile_step(adata, batch_size, args),
                    }
                )
            print(json.dumps(record), flush=True)
            save_records(
                "epoch_time", [{**r, "command": command_line(), **machine()} for r in records], KEYS
            )
        del adata  # before the next size's screen is built


if __name__ == "__main__":
    main()
