"""Peak resident memory of training and outputs, data in memory against backed, by cell count.

For each cell count, a simulated core screen (``--genes`` genes, screen seed 0, sparse CSR
counts) is written to an h5ad file. Then, each in a fresh process so that peaks do not carry
over:

- **in memory:** ``anndata.read_h5ad(path)``, ``setup_anndata``, one training epoch,
  ``write_outputs()`` with its two dense layers in the AnnData;
- **backed:** ``anndata.read_h5ad(path, backed="r")``, the same setup and epoch, and
  ``write_outputs(layers_file=...)``, which streams the layers into a new file.

The peak resident set size (``VmHWM``) is read after reading the data, after training and
after the outputs; each is the peak up to that point. ``--simulate-at-most N`` simulates N
cells and repeats them up to larger sizes, each repeat with targets of its own
(``_common.large_screen``). Run by hand (about 10 minutes on 2 cores):

    .venv/bin/python benchmarks/memory_scale.py --cells 50000 200000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import CONTROL, command_line, large_screen, machine, quiet, save_records

import pertpy_contrastive as pc

KEYS = ("cells", "genes", "mode")
MODES = ("in memory", "backed")
PHASES = ("read", "trained", "outputs")


def peak_mb() -> float:
    """This process's peak resident set size (VmHWM).

    Not ``getrusage``'s ``ru_maxrss``: Python's subprocess spawns with vfork, so the child
    starts in the parent's memory, and Linux keeps that memory's peak across ``execve``; it
    would report the parent's peak (the simulation's) as the child's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("/proc/self/status has no VmHWM: this benchmark needs Linux.")


def run_one(path: Path, mode: str) -> dict:
    """Read, train one epoch and write the outputs; peak memory (MB) and seconds per phase."""
    import anndata

    quiet()
    result, start = {}, time.perf_counter()
    adata = anndata.read_h5ad(path, backed="r" if mode == "backed" else None)
    result["read"] = (peak_mb(), time.perf_counter() - start)
    pc.ContrastiveVAE.setup_anndata(
        adata, perturbation_key="perturbation", control=CONTROL, batch_key="batch"
    )
    model = pc.ContrastiveVAE(adata, seed=0)
    model.train(max_epochs=1, early_stopping=False, enable_progress_bar=False)
    result["trained"] = (peak_mb(), time.perf_counter() - start)
    if mode == "backed":
        model.write_outputs(layers_file=path.with_suffix(".layers.h5ad"), progress_bar=False)
    else:
        model.write_outputs(progress_bar=False)
    result["outputs"] = (peak_mb(), time.perf_counter() - start)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument(
        "--simulate-at-most", type=int, help="simulate at most this many cells, then repeat them"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--run-one", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(Path(args.run_one[0]), args.run_one[1])))
        return

    with tempfile.TemporaryDirectory() as directory:
        for n_cells in args.cells:
            path = Path(directory) / f"screen_{n_cells}.h5ad"
            screen = large_screen(n_cells, args.genes, 0, args.simulate_at_most, new_targets=True)
            screen.write_h5ad(path)
            del screen  # the runs' peaks are their own, but the machine's memory is shared
            for mode in args.modes:
                finished = subprocess.run(
                    [sys.executable, __file__, "--run-one", str(path), mode.split()[-1]],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result = json.loads(finished.stdout.strip().splitlines()[-1])
                record = {
                    "cells": n_cells,
                    "genes": args.genes,
                    "mode": mode,
                    "simulated_cells": min(n_cells, args.simulate_at_most or n_cells),
                    **{f"peak_mb_{phase}": result[phase][0] for phase in PHASES},
                    "seconds": result["outputs"][1],
                }
                print(json.dumps(record), flush=True)
                record |= {"command": command_line(), **machine()}
                save_records("memory_scale", [record], KEYS)


if __name__ == "__main__":
    main()
