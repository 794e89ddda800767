"""Calling targets on simulated screens: the held-out test against the cross-fitted latent.

On the screens of ``benchmark_responders.py`` (``--screens``, 10,000 cells x 2,000 genes,
screen seed 0), for each model seed: ContrastiveVAE with its defaults, 60 epochs, no early
stopping, ``train_size`` 0.75, tested with ``model.distance_test()`` on its held-out quarter;
and ``pc.tl.cross_fitted_salient`` (``--folds``, 2 by default, the same settings per fold model
but ``train_size`` 1, so that each trains on all the other folds' cells), tested on every
cell with pertpy's ``DistanceTest`` and with the labels permuted within folds
(``pc.tl.distance_test(strata_key=...)``); and, as the anchor, pertpy's ``DistanceTest`` on every
cell of the PCA (10 components, the salient latent's size) of log-normalised counts. Every test is E-distance with 1,000 permutations
against the controls. Reported per test: the effect targets called at p < 0.05 (power), the null
targets called (they knock down only their own gene, which is in the data, so a call is not
strictly false), and the calling AUROC of effect against null targets by the test's E-distance.
One torch thread by default (``--threads``), so that it can run beside another run. Run by hand
(about 10 minutes per screen and seed alone):

    .venv/bin/python benchmarks/cross_fitted_calling.py
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import pandas as pd
import scanpy as sc
import torch
from benchmark_core import CONTROL, fit_contrastive_vae, log_normalised, write_results
from benchmark_responders import SCREENS
from sklearn.metrics import roc_auc_score

import pertpy_contrastive as pc

EPOCHS = 60
TRAIN_KWARGS = {"train_size": 0.75}


def calling_summary(table: pd.DataFrame, effect_targets: set[str]) -> dict[str, float]:
    """Effect and null targets called at p < 0.05, and the AUROC of effect against null."""
    table = table.drop(index=CONTROL, errors="ignore")
    is_effect = table.index.isin(list(effect_targets))
    called = table["pvalue"] < 0.05
    return {
        "effect targets called": f"{int(called[is_effect].sum())} of {int(is_effect.sum())}",
        "null targets called": f"{int(called[~is_effect].sum())} of {int((~is_effect).sum())}",
        "calling AUROC": f"{roc_auc_score(is_effect, table['distance']):.3f}",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screens", nargs="+", default=["calling", "hard"], choices=list(SCREENS))
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--hard-seeds",
        type=int,
        nargs="+",
        default=None,
        help="model seeds of the hard screen (default: --model-seeds)",
    )
    parser.add_argument("--folds", type=int, default=2, help="cross-fitting folds (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument(
        "--output", type=Path, default=Path("docs/benchmark_cross_fitted_calling.md")
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    lines = [
        "| screen | model seed | test | cells tested | effect targets called | null targets "
        "called | calling AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    command = (
        "`.venv/bin/python benchmarks/cross_fitted_calling.py --screens "
        f"{' '.join(args.screens)} --model-seeds {' '.join(map(str, args.model_seeds))} "
        + (f"--hard-seeds {' '.join(map(str, args.hard_seeds))} " if args.hard_seeds else "")
        + f"--folds {args.folds} --threads {args.threads} --output {args.output}`"
    )
    header = (
        f"Simulated screens of `benchmark_responders.py`, 10,000 cells x 2,000 genes, screen seed "
        f"0; ContrastiveVAE defaults, {EPOCHS} epochs, no early stopping, train_size 0.75; "
        f"cross-fitting over {args.folds} folds with the same settings per fold model but "
        "train_size 1 (each trains on all the other folds' cells). "
        f"{args.threads} torch thread{'s' if args.threads > 1 else ''}, CPU."
    )
    for screen in args.screens:
        adata = pc.datasets.simulate_screen(
            n_cells=10_000, n_genes=2_000, seed=0, **SCREENS[screen]
        )
        programs = adata.uns["simulation"]["target_program"]
        effect_targets = {t for t, p in programs.items() if p != "none"}
        normalised = log_normalised(adata)
        sc.pp.pca(normalised, n_comps=10)
        normalised.obs["perturbation"] = normalised.obs["perturbation"].astype(str)
        pca_table = pc.tl.distance_test(
            normalised, groupby="perturbation", contrast=CONTROL, obsm_key="X_pca"
        )
        seeds = args.hard_seeds if screen == "hard" and args.hard_seeds else args.model_seeds
        for seed in seeds:
            model, _ = fit_contrastive_vae(adata, seed, EPOCHS, train_kwargs=TRAIN_KWARGS)
            held_out = model.distance_test()
            data = model.adata
            pc.tl.cross_fitted_salient(
                data,
                n_folds=args.folds,
                # Without early stopping a fold model needs no validation cells.
                train_kwargs={"max_epochs": EPOCHS, "early_stopping": False, "train_size": 1.0},
                seed=seed,
            )
            data.obs["perturbation"] = data.obs["perturbation"].astype(str)
            tests = {
                "held-out cells, `model.distance_test()`": (
                    held_out,
                    int(held_out["n_cells"].sum()),
                ),
                "PCA of log-normalised counts (anchor), every cell": (pca_table, adata.n_obs),
            }
            for name, strata_key in (
                ("cross-fitted, every cell, `pt.tl.DistanceTest`", None),
                ("cross-fitted, every cell, within folds", "contrastive_cross_fitting_fold"),
            ):
                table = pc.tl.distance_test(
                    data,
                    groupby="perturbation",
                    contrast=CONTROL,
                    obsm_key="X_contrastive_salient_cross_fitted",
                    strata_key=strata_key,
                )
                tests[name] = (table, data.n_obs)
            for name, (table, n_cells) in tests.items():
                summary = calling_summary(table, effect_targets)
                lines.append(
                    f"| {screen} | {seed} | {name} | {n_cells} | "
                    + " | ".join(summary.values())
                    + " |"
                )
            # After every screen and seed, so that a stopped run keeps what it measured.
            write_results(
                args.output,
                "Calling targets: held-out against cross-fitted",
                command,
                header,
                lines,
            )


if __name__ == "__main__":
    main()
