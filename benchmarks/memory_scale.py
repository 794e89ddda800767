"""Peak resident memory of training and outputs, data in memory against backed, by cell count.

For each cell count, a simulated core screen (2,000 genes, sparse CSR counts) is written to an
h5ad file. Then, each in a fresh process so that peaks do not carry over:

- **in memory:** ``anndata.read_h5ad(path)``, ``setup_anndata``, one training epoch,
  ``write_outputs()`` with its two dense layers in the AnnData;
- **backed:** ``anndata.read_h5ad(path, backed="r")``, the same setup and epoch, and
  ``write_outputs(layers_file=...)``, which streams the layers into a new file.

The peak resident set size (``VmHWM``) is read after reading the data, after training and
after the outputs; each is the peak up to that point.

Run alone, by hand:  .venv/bin/python benchmarks/memory_scale.py --cells 50000 200000 --output docs/benchmark_memory_scale.md
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchmark_core import CONTROL, large_screen, write_results

import pertpy_contrastive as pc

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

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
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
        model.write_outputs()
    result["outputs"] = (peak_mb(), time.perf_counter() - start)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--simulate-at-most",
        type=int,
        help="simulate at most this many cells, then repeat them with new targets",
    )
    parser.add_argument("--modes", nargs="+", default=["in memory", "backed"])
    parser.add_argument("--output", type=Path, default=Path("docs/benchmark_memory_scale.md"))
    parser.add_argument("--run-one", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(Path(args.run_one[0]), args.run_one[1])))
        return

    lines = [
        "| cells | data | peak RSS after reading (MB) | after training 1 epoch (MB) | "
        "after the outputs (MB) | seconds to the end |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as directory:
        for n_cells in args.cells:
            path = Path(directory) / f"screen_{n_cells}.h5ad"
            large_screen(
                n_cells, args.genes, args.seed, args.simulate_at_most, new_targets=True
            ).write_h5ad(path)
            for mode in args.modes:
                finished = subprocess.run(
                    [sys.executable, __file__, "--run-one", str(path), mode.split()[-1]],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result = json.loads(finished.stdout.strip().splitlines()[-1])
                peaks = " | ".join(f"{result[phase][0]:,.0f}" for phase in PHASES)
                lines.append(f"| {n_cells:,} | {mode} | {peaks} | {result['outputs'][1]:.0f} |")
                print(lines[-1], flush=True)
    header = (
        f"Simulated core screen, {args.genes} genes, seed {args.seed}, counts stored as sparse "
        "CSR in h5ad; each run in a fresh process; peak resident set size (VmHWM), "
        "cumulative up to each point."
    )
    if args.simulate_at_most:
        header += (
            f" Sizes above {args.simulate_at_most:,} cells repeat the cells of the "
            f"{args.simulate_at_most:,}-cell simulated screen, each repeat with targets of its "
            "own (cells per target stay constant, as in genome-wide screens)."
        )
    command = (
        f"`.venv/bin/python benchmarks/memory_scale.py --cells {' '.join(map(str, args.cells))} "
        f"--genes {args.genes} --seed {args.seed}"
        f"{f' --simulate-at-most {args.simulate_at_most}' if args.simulate_at_most else ''}"
        f" --modes {' '.join(repr(mode) for mode in args.modes)} --output {args.output}`"
    )
    write_results(args.output, "Peak memory by cell count", command, header, lines)


if __name__ == "__main__":
    main()
