"""Papalexi 2021 subset: is the library size in the salient latent biology or technical, and what removes it?

Over the labelled perturbed cells of the bundled THP-1 subset, a 15-NN regression (5-fold CV)
predicts the log library size from the salient latent, and a 15-NN classifier the replicate,
as in ``papalexi_responders.py``. Three readings of the library size:

- **raw**: the log total count;
- **residual**: the log total count minus its mean within each (target, called KO or NP) group,
  with the calls of the default model. Knockouts that silence a program lower a cell's depth, so
  a latent that separates KO from NP cells predicts some depth for biological reasons; the
  residual removes that;
- **NP cells only**: the raw log total count, over the cells the default model calls NP.

Rows: ContrastiveVAE with its defaults and with one change each (the encoders' input normalised
to 1e4 counts per cell, the earlier default; responder refinement of 30 epochs; no background
MMD; the centred log library size as a continuous covariate; the negative binomial likelihood;
the salient-background independence penalty), and scvi-tools' ContrastiveVI (200 epochs), all
with model seed 0. ``--variants`` keeps the defaults and the variants whose name contains one
of the given words. Run by hand, alone (about 15 minutes on 2 cores):

    .venv/bin/python benchmarks/papalexi_leakage.py
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from benchmark_core import CONTROL, write_results
from papalexi_responders import (
    BATCH,
    contrastive_vi_salient,
    counts_only,
    load_papalexi,
    technical_leakage,
)

import pertpy_contrastive as pc

VARIANTS = {
    "defaults": ({}, {}, {}),
    "encoders' input normalised to 1e4 counts (the default before 2026-12-02)": (
        {"encoder_library_size": 1e4},
        {},
        {},
    ),
    "responder refinement, 30 epochs": ({}, {}, {"n_epochs_responder_refinement": 30}),
    "no background MMD (background_mmd_weight=0)": ({"background_mmd_weight": 0}, {}, {}),
    "log library size as a continuous covariate": (
        {},
        {"continuous_covariate_keys": ["log_library"]},
        {},
    ),
    'negative binomial (likelihood="nb")': ({"likelihood": "nb"}, {}, {}),
    "salient-background independence penalty (independence_weight=10)": (
        {"independence_weight": 10},
        {},
        {},
    ),
}


def train_variant(model_kwargs, setup_kwargs, train_kwargs, seed, epochs):
    """Train one ContrastiveVAE variant; return its written RNA AnnData and epochs trained."""
    mdata = load_papalexi()
    rna = mdata["rna"]
    log_library = np.log(np.asarray(rna.X.sum(1)).ravel())
    rna.obs["log_library"] = log_library - log_library.mean()
    pc.ContrastiveVAE.setup_anndata(
        mdata, perturbation_key="perturbation", control=CONTROL, batch_key=BATCH, **setup_kwargs
    )
    model = pc.ContrastiveVAE(mdata, seed=seed, **model_kwargs)
    model.train(max_epochs=epochs, seed=seed, enable_progress_bar=False, **train_kwargs)
    return model.write_outputs(mdata), model.epochs_trained


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=200, help="maximum epochs of both VAEs")
    parser.add_argument("--seed", type=int, default=0, help="model seed")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmark_papalexi_leakage.md"))
    parser.add_argument(
        "--variants", nargs="+", default=None, help="words of the variants to run (default: all)"
    )
    args = parser.parse_args()
    variants = {
        name: kwargs
        for name, kwargs in VARIANTS.items()
        if name == "defaults" or args.variants is None or any(w in name for w in args.variants)
    }
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.ERROR)

    data = counts_only(load_papalexi()["rna"])
    labels = data.obs["perturbation"].to_numpy()
    perturbed = labels != CONTROL
    log_library = np.log(np.asarray(data.X.sum(1)).ravel())
    replicate = data.obs[BATCH].astype(str).to_numpy()

    latents, epochs, ko = {}, {}, None
    for name, kwargs in variants.items():
        rna, epochs[name] = train_variant(*kwargs, args.seed, args.epochs)
        rna = rna[data.obs_names]
        latents[name] = rna.obsm["X_contrastive_salient"]
        if ko is None:  # the default model's calls define the groups of the residual
            ko = (rna.obs["contrastive_class_global"].astype(str) == "KO").to_numpy()
        print(name, epochs[name], flush=True)
    latents["scvi-tools ContrastiveVI"] = contrastive_vi_salient(data, args.seed, args.epochs)

    residual = (
        log_library - pd.Series(log_library).groupby([labels, ko]).transform("mean").to_numpy()
    )
    not_called = perturbed & ~ko
    lines = [
        "| salient latent of | replicate (balanced accuracy) | log library R²: raw | residual | NP cells only |",
        "|---|---|---|---|---|",
    ]
    for name, latent in latents.items():
        raw = technical_leakage(latent[perturbed], replicate[perturbed], log_library[perturbed])
        res = technical_leakage(latent[perturbed], replicate[perturbed], residual[perturbed])
        within = technical_leakage(
            latent[not_called], replicate[not_called], log_library[not_called]
        )
        lines.append(
            f"| {name} | {raw['replicate']:.3f} | {raw['library']:.3f} | {res['library']:.3f} "
            f"| {within['library']:.3f} |"
        )
    depth = pd.Series(log_library[perturbed]).groupby(ko[perturbed]).agg(["mean", "size"])
    header = (
        f"{perturbed.sum()} labelled perturbed cells; chance: replicate 0.333, R² 0. Model seed "
        f"{args.seed}; ContrastiveVAE early stopping, at most {args.epochs} epochs (trained: "
        + ", ".join(f"{name} {n}" for name, n in epochs.items())
        + f"). Mean log library size of cells the default model calls KO: {depth.loc[True, 'mean']:.3f} "
        f"({depth.loc[True, 'size']} cells), NP: {depth.loc[False, 'mean']:.3f} "
        f"({depth.loc[False, 'size']} cells)."
    )
    command = (
        f"`.venv/bin/python benchmarks/papalexi_leakage.py --epochs {args.epochs} "
        f"--seed {args.seed} --output {args.output}"
        + ("" if args.variants is None else " --variants " + " ".join(args.variants))
        + "`"
    )
    write_results(
        args.output, "Papalexi subset: library size in the salient latent", command, header, lines
    )


if __name__ == "__main__":
    main()
