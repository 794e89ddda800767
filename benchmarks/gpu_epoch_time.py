"""Seconds per training epoch of ContrastiveVAE against scvi-tools' ContrastiveVI on a CUDA GPU.

The simulated core screen at 100,000 and 1,000,000 cells (``_common.large_screen``: the cells of
a 100,000-cell screen, repeated with targets of their own) x 2,000 genes, 256 cells per group
per step, latent sizes 10 + 10, early stopping off. Each run trains one warm-up epoch and one
timed epoch (timed as in ``epoch_time.py``). ContrastiveVAE runs at each of ``--precisions``
(float32 and bf16 mixed precision), ContrastiveVI in float32, alternating: ``--repeats`` pairs
at 100,000 cells and one at 1,000,000. Writes ``results/gpu_epoch_time.json``, which
``report.py`` turns into its section of docs/benchmarks.md. Planned to take about 8 minutes on
one H100 (not yet run: the project has no GPU).

Without a CUDA GPU it refuses in one line. ``--smoke`` runs the same code on the CPU on 2,000
cells x 300 genes (64 per group per step), without saving, to check the script:

    .venv/bin/python benchmarks/gpu_epoch_time.py
    .venv/bin/python benchmarks/gpu_epoch_time.py --smoke
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from _common import command_line, large_screen, machine, quiet, save_records
from epoch_time import EpochTimer, train

KEYS = ("cells", "precision", "gpu")
SIMULATED_CELLS = 100_000


def seconds_per_epoch(method: str, adata, precision: str, args) -> float:
    """Seconds of the timed epoch (the second) of one run."""
    timer = EpochTimer()
    train(method, adata, 2, args.batch_size, [timer], args.accelerator, precision)
    return timer.seconds[-1]


def time_size(n_cells: int, repeats: int, args) -> list[dict]:
    """One record per ContrastiveVAE precision: both methods' seconds and each pair's ratio."""
    adata = large_screen(
        n_cells, args.genes, simulate_at_most=args.simulate_at_most, new_targets=True
    )
    records = []
    for precision in args.precisions:
        seconds = {"ContrastiveVAE": [], "ContrastiveVI": []}
        for _ in range(repeats):
            seconds["ContrastiveVAE"].append(
                seconds_per_epoch("ContrastiveVAE", adata, precision, args)
            )
            seconds["ContrastiveVI"].append(
                seconds_per_epoch("ContrastiveVI", adata, "32-true", args)
            )
        records.append(
            {
                "cells": n_cells,
                "genes": args.genes,
                "batch_size": args.batch_size,
                "precision": precision,
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
                "seconds_per_epoch": seconds,
                "ratios": [a / b for a, b in zip(*seconds.values(), strict=True)],
            }
        )
        print(json.dumps(records[-1]), flush=True)
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=256, help="cells per group per step")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--repeats", type=int, default=2, help="pairs at the smallest size")
    parser.add_argument("--simulate-at-most", type=int, default=SIMULATED_CELLS)
    parser.add_argument("--smoke", action="store_true", help="tiny data on the CPU, not saved")
    args = parser.parse_args()
    if args.smoke:
        args.cells, args.genes, args.repeats, args.accelerator = [2_000], 300, 1, "cpu"
        args.batch_size = 64
    elif not torch.cuda.is_available():
        sys.exit(
            "gpu_epoch_time.py needs a CUDA GPU and this machine has none; "
            "--smoke checks the script on the CPU."
        )
    else:
        args.accelerator = "gpu"
    quiet()
    for n_cells in args.cells:
        repeats = args.repeats if n_cells == min(args.cells) else 1
        records = time_size(n_cells, repeats, args)
        if not args.smoke:
            save_records(
                "gpu_epoch_time",
                [{**r, "command": command_line(), **machine()} for r in records],
                KEYS,
            )


if __name__ == "__main__":
    main()
