"""One training process against two (Lightning DDP, gloo on CPU): wall time, ELBO, separation.

The simulated core screen is written to an h5ad file once. Then, each in fresh processes:

- **1 process** with 2 torch threads: ``model.train(...)``;
- **2 processes** (``torchrun --standalone --nproc_per_node 2``) with 1 torch thread each:
  ``model.train(..., devices=2, strategy="ddp")``.

Both use the machine's 2 cores, train the same number of epochs with early stopping off and
validate every epoch, for each of ``--model-seeds``. Reported from rank 0: training wall time,
the final validation negative ELBO (averaged over the ranks), and program separation and
subclone leakage of the salient latent (as in ``benchmark_core.py``). With 2 processes each
epoch takes half as many optimiser steps, each on twice as many cells; ``--lr-scale`` adds a
2-process run at that multiple of the learning rate.

Run alone, by hand:  .venv/bin/python benchmarks/ddp_scaling.py --output docs/benchmark_ddp.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata
from benchmark_core import CONTROL, leakage, program_separation, write_results

import pertpy_contrastive as pc
from pertpy_contrastive._constants import LEARNING_RATE


def run_one(path: Path, n_processes: int, epochs: int, lr: float, seed: int, out: Path) -> None:
    """Train in this process (one rank under torchrun); rank 0 writes the results as JSON."""
    warnings.filterwarnings("ignore")
    adata = anndata.read_h5ad(path)
    pc.ContrastiveVAE.setup_anndata(
        adata, perturbation_key="perturbation", control=CONTROL, batch_key="batch"
    )
    model = pc.ContrastiveVAE(adata, n_salient=10, n_background=10, seed=seed)
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


def launch(path: Path, n_processes: int, args, lr: float, seed: int, out: Path) -> dict:
    script = str(Path(__file__).resolve())
    command = [script, "--run-one", str(path), str(n_processes), str(args.epochs), str(lr)]
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated screen")
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--lr-scale", type=float, help="also train 2 processes at this multiple of the lr"
    )
    parser.add_argument("--output", type=Path, default=Path("docs/benchmark_ddp.md"))
    parser.add_argument("--run-one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        path, n_processes, epochs, lr, seed, out = args.run_one
        run_one(Path(path), int(n_processes), int(epochs), float(lr), int(seed), Path(out))
        return

    lines = [
        "| model seed | processes | learning rate | training seconds | time ratio to 1 process | "
        "final validation -ELBO | program separation | subclone accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = [(1, LEARNING_RATE), (2, LEARNING_RATE)]
    if args.lr_scale:
        runs.append((2, args.lr_scale * LEARNING_RATE))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "screen.h5ad"
        screen = pc.datasets.simulate_screen(n_cells=args.cells, n_genes=args.genes, seed=args.seed)
        screen.write_h5ad(path)
        for seed in args.model_seeds:
            baseline = None
            for n_processes, lr in runs:
                out = Path(directory) / f"run_{seed}_{n_processes}_{lr}.json"
                result = launch(path, n_processes, args, lr, seed, out)
                baseline = baseline or result["seconds"]
                lines.append(
                    f"| {seed} | {n_processes} | {lr:g} | {result['seconds']:.0f} | "
                    f"{result['seconds'] / baseline:.2f} | {result['elbo_validation']:.1f} | "
                    f"{result['program_separation']:.3f} | {result['subclone_accuracy']:.3f} |"
                )
                print(lines[-1], flush=True)
    header = (
        f"Simulated core screen, {args.cells:,} cells, {args.genes} genes, seed {args.seed}; "
        f"{args.epochs} epochs, early stopping off, validation every epoch; "
        "latents 10 + 10, 128 cells per group per step. One process uses 2 torch threads, two "
        "processes 1 each (2 cores, CPU, gloo). The validation -ELBO is per cell, averaged over "
        "the ranks; separation and subclone accuracy as in benchmark_core.py."
    )
    command = (
        f"`.venv/bin/python benchmarks/ddp_scaling.py --cells {args.cells} --genes {args.genes} "
        f"--epochs {args.epochs} --seed {args.seed} "
        f"--model-seeds {' '.join(map(str, args.model_seeds))}"
        f"{f' --lr-scale {args.lr_scale}' if args.lr_scale else ''} --output {args.output}`"
    )
    write_results(args.output, "One process against two (DDP)", command, header, lines)


if __name__ == "__main__":
    main()
