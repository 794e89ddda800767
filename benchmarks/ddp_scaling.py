"""One training process against two (Lightning DDP, gloo on CPU): wall time, ELBO, separation.

The simulated core screen (``--cells`` cells x ``--genes`` genes, screen seed 0) is written to an
h5ad file once. Then, each in fresh processes:

- **1 process** with 2 torch threads: ``model.train(...)``;
- **2 processes** (``torchrun --standalone --nproc_per_node 2``) with 1 torch thread each:
  ``model.train(..., devices=2, strategy="ddp")``.

Both use the machine's 2 cores, train ``--epochs`` epochs with early stopping off and validate
every epoch, for each of ``--seeds`` (model seeds). Recorded from rank 0: training wall time
and its ratio to the 1-process run of the same seed, the final validation negative ELBO
(averaged over the ranks), and program separation and subclone leakage of the salient latent
(as in ``screens.py``). With 2 processes each epoch takes half as many optimiser steps, each on
twice as many cells; ``--lr-scale`` adds a 2-process run at that multiple of the learning rate.
Run by hand (about 20 minutes on 2 cores, nothing else running):

    .venv/bin/python benchmarks/ddp_scaling.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata
from _common import (
    CONTROL,
    command_line,
    leakage,
    machine,
    program_separation,
    quiet,
    save_records,
    simulate,
)

import pertpy_contrastive as pc
from pertpy_contrastive._constants import LEARNING_RATE

KEYS = ("cells", "genes", "epochs", "seed", "processes", "lr")


def run_one(path: Path, n_processes: int, epochs: int, lr: float, seed: int, out: Path) -> None:
    """Train in this process (one rank under torchrun); rank 0 writes the results as JSON."""
    quiet()
    adata = anndata.read_h5ad(path)
    pc.ContrastiveVAE.setup_anndata(
        adata, perturbation_key="perturbation", control=CONTROL, batch_key="batch"
    )
    model = pc.ContrastiveVAE(adata, seed=seed)
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        lr=lr,
        seed=seed,
        accelerator="cpu",
        devices=n_processes,
        strategy="ddp" if n_processes > 1 else "auto",
        early_stopping=False,
        check_val_every_n_epoch=1,
        enable_progress_bar=False,
    )
    seconds = time.perf_counter() - start
    if model.trainer.global_rank != 0:
        return
    salient = model.get_latent_representation(kind="salient")
    result = {
        "seconds": seconds,
        "elbo_validation": float(model.history["elbo_validation"].iloc[-1, 0]),
        "program_separation": program_separation(salient, adata.obs),
        "subclone_accuracy": leakage(salient, adata.obs)["subclone_accuracy"],
    }
    out.write_text(json.dumps(result))


def launch(path: Path, n_processes: int, epochs: int, lr: float, seed: int, out: Path) -> dict:
    script = str(Path(__file__).resolve())
    command = [script, "--run-one", str(path), str(n_processes), str(epochs), str(lr)]
    command += [str(seed), str(out)]
    if n_processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command]
    # The machine's 2 cores: 2 threads for one process, 1 each for two.
    environment = {**os.environ, "OMP_NUM_THREADS": str(2 // n_processes)}
    subprocess.run(
        [sys.executable, *command], env=environment, cwd=out.parent, check=True, capture_output=True
    )
    return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds")
    parser.add_argument(
        "--lr-scale", type=float, help="also train 2 processes at this multiple of the lr"
    )
    parser.add_argument("--run-one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        path, n_processes, epochs, lr, seed, out = args.run_one
        run_one(Path(path), int(n_processes), int(epochs), float(lr), int(seed), Path(out))
        return

    runs = [(1, LEARNING_RATE), (2, LEARNING_RATE)]
    if args.lr_scale:
        runs.append((2, args.lr_scale * LEARNING_RATE))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "screen.h5ad"
        simulate("core", args.cells, args.genes).write_h5ad(path)
        for seed in args.seeds:
            one_process = None
            for n_processes, lr in runs:
                out = Path(directory) / f"run_{seed}_{n_processes}_{lr}.json"
                result = launch(path, n_processes, args.epochs, lr, seed, out)
                one_process = one_process or result["seconds"]
                record = {
                    "cells": args.cells,
                    "genes": args.genes,
                    "epochs": args.epochs,
                    "seed": seed,
                    "processes": n_processes,
                    "lr": lr,
                    **result,
                    "ratio_to_one_process": result["seconds"] / one_process,
                }
                print(json.dumps(record), flush=True)
                record |= {
                    "command": command_line(),
                    **machine(),
                    "torch_threads": 2 // n_processes,
                }
                save_records("ddp_scaling", [record], KEYS)


if __name__ == "__main__":
    main()
