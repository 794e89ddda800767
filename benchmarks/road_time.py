"""The road after training, timed against training: outputs, DE of every target, target calls.

On a simulated screen (``_common.SCREENS``; ``--cells`` cells x ``--genes`` genes, screen seed
0), for each model seed, ContrastiveVAE is trained as a user would (``max_epochs`` 100 by
default, early stopping on), then each stage of the road is timed in the same process, one
after another:

- ``model.write_outputs()``: latents, target calls (it runs ``distance_test``), responder
  calls and fractions, the denoised and effect layers (dense, in the AnnData);
- ``model.differential_expression()``: every trained target, in one call;
- ``model.distance_test()``: the E-distance permutation test of every target (1,000
  permutations).

Before the first seed, the whole road runs once, untimed, on a 2,000-cell screen and a 1-epoch
model, so that a session's one-time costs (numba compilation, lazy imports; about a minute)
count in no stage. Each stage's seconds are recorded with their ratio to the training seconds of the same run, and
the peak rise of resident memory during the stage (sampled every 50 ms; memory freed by an
earlier stage is reused, so it is approximate). One torch thread by default. Run by hand (about
10 minutes per seed on 2 cores):

    .venv/bin/python benchmarks/road_time.py --screens core --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import (
    SCREENS,
    PeakMemory,
    command_line,
    fit_contrastive_vae,
    machine,
    quiet,
    save_records,
    simulate,
)

KEYS = ("screen", "cells", "seed")
STAGES = {
    "write_outputs": lambda model: model.write_outputs(progress_bar=False),
    "differential_expression": lambda model: model.differential_expression(progress_bar=False),
    "distance_test": lambda model: model.distance_test(progress_bar=False),
}


def time_road(adata, seed: int, max_epochs: int) -> dict:
    with PeakMemory() as memory:
        model, seconds = fit_contrastive_vae(adata, seed, train_kwargs={"max_epochs": max_epochs})
    record = {
        "epochs": model.epochs_trained,
        "n_targets": len(adata.uns["simulation"]["target_program"]),
        "seconds_train": seconds,
        "peak_mb_train": memory.extra_mb,
    }
    for stage, run in STAGES.items():
        with PeakMemory() as memory:
            start = time.perf_counter()
            run(model)
            seconds = time.perf_counter() - start
        record |= {
            f"seconds_{stage}": seconds,
            f"ratio_{stage}": seconds / record["seconds_train"],
            f"peak_mb_{stage}": memory.extra_mb,
        }
    return record


def warm_up(screen: str, n_genes: int) -> None:
    """Run the road once on a small screen, so that one-time costs are paid before timing."""
    model, _ = fit_contrastive_vae(
        simulate(screen, 2_000, n_genes), 0, train_kwargs={"max_epochs": 1, "batch_size": 64}
    )
    for run in STAGES.values():
        run(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screens", nargs="+", default=["core"], choices=list(SCREENS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    warm_up(args.screens[0], args.genes)
    for screen in args.screens:
        adata = simulate(screen, args.cells, args.genes)
        for seed in args.seeds:
            record = {"screen": screen, "cells": args.cells, "genes": args.genes, "seed": seed}
            record["max_epochs"] = args.max_epochs
            record |= time_road(adata, seed, args.max_epochs)
            print(json.dumps(record), flush=True)
            save_records("road_time", [{**record, "command": command_line(), **machine()}], KEYS)


if __name__ == "__main__":
    main()
