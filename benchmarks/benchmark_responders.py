"""Responder benchmark: per-cell calls, target calling and calibration on simulated screens.

For each screen and model seed, in one process:

- **responder calls**: AUROC of ContrastiveVAE's P(perturbed) against the simulator's true
  responders, over all targeting cells and over the cells of effect targets only, against
  pertpy's Mixscape (``mixscape_class_p_ko``, on its perturbation signature) in the same run;
- **calling**: AUROC of effect against null targets by salient E-distance to the controls, for
  ContrastiveVAE (its response latent ``kind="response"``, the salient latent weighted by
  P(perturbed), and its plain salient latent) and scvi-tools' ContrastiveVI
  (``benchmark_calling_de.calling_auroc``);
- **calibration of the salient latent**: mean norm of the salient and response posterior means
  of controls, escapers and responders, training / held-out cells (escapers express like
  controls);
- **responder fractions**: how often the 95% interval of a target's responder fraction covers
  the simulated fraction (effect targets), and the mean absolute error of the fraction;
- **probability calibration**: the mean P(perturbed) against the observed responder rate in
  five probability bins (effect-target cells), summarised as the expected calibration error.

Screens (``--screens``): ``calling`` (24 targets, 8 null, program log fold change 0.4: the
calling/DE benchmark's screen), ``core`` (the core benchmark's screen, 0.8) and ``hard``
(program log fold change 0.3, half of the perturbed cells escape, mean depth 2,000 UMIs).
Run by hand (about 10 minutes per screen and seed on 2 cores):

    .venv/bin/python benchmarks/benchmark_responders.py
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np
import pertpy as pt
import scvi
import torch
from benchmark_calling_de import calling_auroc, mean_sd
from benchmark_core import (
    CONTROL,
    add_vae_arguments,
    fit_contrastive_vae,
    fit_contrastive_vi,
    mixscape_signature,
    vae_kwargs,
    vae_options,
    write_results,
)
from sklearn.metrics import roc_auc_score

import pertpy_contrastive as pc
from pertpy_contrastive._responders import response_latent

SCREENS = {
    "calling": {"n_targets": 24, "n_null_targets": 8, "effect_size": 0.4},
    "core": {},
    "hard": {
        "n_targets": 24,
        "n_null_targets": 8,
        "effect_size": 0.3,
        "escape_fraction": 0.5,
        "mean_library_size": 2_000.0,
    },
}
CALIBRATION_BINS = np.linspace(0, 1, 6)


def responder_aurocs(obs, score) -> dict[str, float]:
    """AUROC of ``score`` against true responders: all targeting cells, effect targets' cells."""
    targeting = (obs["perturbation"] != CONTROL).to_numpy()
    effect = targeting & (obs["program"] != "none").to_numpy()
    truth = obs["responder"].to_numpy()
    return {
        "all targeting": roc_auc_score(truth[targeting], score[targeting]),
        "effect targets": roc_auc_score(truth[effect], score[effect]),
    }


def mixscape_probability(adata) -> np.ndarray:
    """pertpy Mixscape's posterior probability of knockout, per cell (0 for controls)."""
    signature = mixscape_signature(adata)
    pt.tl.Mixscape().mixscape(
        adata=signature, pert_key="perturbation", control=CONTROL, layer="X_pert", split_by="batch"
    )
    return signature.obs["mixscape_class_p_ko"].to_numpy(dtype=float)


def latent_norms(model, obs, latent) -> dict[str, tuple[float, float]]:
    """Mean norm of ``latent`` for controls, escapers and responders: training, held-out."""
    norm = np.linalg.norm(latent, axis=1)
    in_training = np.zeros(len(obs), dtype=bool)
    in_training[model.train_indices] = True
    kinds = {
        "controls": (obs["perturbation"] == CONTROL).to_numpy(),
        "escapers": obs["escaped"].to_numpy(),
        "responders": obs["responder"].to_numpy(),
    }
    return {
        kind: (norm[cells & in_training].mean(), norm[cells & ~in_training].mean())
        for kind, cells in kinds.items()
    }


def fraction_accuracy(adata, fractions) -> tuple[float, float]:
    """Interval coverage and mean absolute error of effect targets' responder fractions."""
    obs = adata.obs
    programs = adata.uns["simulation"]["target_program"]
    effect = [t for t in fractions.index if programs[t] != "none"]
    truth = (
        obs[obs["perturbation"].isin(effect)]
        .groupby("perturbation", observed=True)["responder"]
        .mean()
    )
    table = fractions.loc[effect]
    covered = (table["ci_low"] <= truth[effect]) & (truth[effect] <= table["ci_high"])
    return float(covered.mean()), float((table["responder_fraction"] - truth[effect]).abs().mean())


def calibration_error(obs, probability) -> float:
    """Expected calibration error of P(perturbed) on effect targets' cells (5 equal bins)."""
    effect = ((obs["perturbation"] != CONTROL) & (obs["program"] != "none")).to_numpy()
    p, truth = probability[effect], obs["responder"].to_numpy()[effect]
    bins = np.clip(np.digitize(p, CALIBRATION_BINS[1:-1]), 0, len(CALIBRATION_BINS) - 2)
    error = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        error += in_bin.mean() * abs(p[in_bin].mean() - truth[in_bin].mean())
    return error


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screens", nargs="+", default=list(SCREENS), choices=list(SCREENS))
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=60)
    add_vae_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated screens")
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("docs/benchmark_responders.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    lines, headers = [], []
    for screen_name in args.screens:
        adata = pc.datasets.simulate_screen(
            n_cells=args.cells, n_genes=args.genes, seed=args.seed, **SCREENS[screen_name]
        )
        programs = adata.uns["simulation"]["target_program"]
        effect_targets = {t for t, p in programs.items() if p != "none"}
        rows = {
            key: []
            for key in (
                "ours_all",
                "ours_effect",
                "calling_ours",
                "calling_salient",
                "calling_vi",
                "coverage",
                "fraction_error",
                "ece",
            )
        }
        norms = {"salient": [], "response": []}
        for seed in args.model_seeds:
            model_kwargs, train_kwargs = vae_kwargs(args)
            model, _ = fit_contrastive_vae(adata, seed, args.epochs, model_kwargs, train_kwargs)
            probability = model.get_responder_probability()
            aurocs = responder_aurocs(adata.obs, probability)
            rows["ours_all"].append(aurocs["all targeting"])
            rows["ours_effect"].append(aurocs["effect targets"])
            salient = model.get_latent_representation(kind="salient")
            response = response_latent(salient, probability)
            rows["calling_ours"].append(calling_auroc(adata, response, effect_targets))
            rows["calling_salient"].append(calling_auroc(adata, salient, effect_targets))
            fractions = model.get_responder_fractions()
            coverage, error = fraction_accuracy(adata, fractions)
            rows["coverage"].append(coverage)
            rows["fraction_error"].append(error)
            rows["ece"].append(calibration_error(adata.obs, probability))
            for kind, latent in (("salient", salient), ("response", response)):
                norms[kind].append(latent_norms(model, adata.obs, latent))
            vi_model, _ = fit_contrastive_vi(adata, args, seed)
            vi_salient = vi_model.get_latent_representation(representation_kind="salient")
            rows["calling_vi"].append(calling_auroc(adata, vi_salient, effect_targets))
            print(screen_name, seed, {k: v[-1] for k, v in rows.items()}, flush=True)
        mixscape = responder_aurocs(adata.obs, mixscape_probability(adata))
        norm_cells = {
            (latent, kind): " / ".join(mean_sd([n[kind][split] for n in runs]) for split in (0, 1))
            for latent, runs in norms.items()
            for kind in runs[0]
        }
        n_responders = int(adata.obs["responder"].sum())
        headers.append(
            f"- `{screen_name}`: {SCREENS[screen_name] or 'simulate_screen defaults'}; "
            f"{n_responders} true responders among "
            f"{int((adata.obs['perturbation'] != CONTROL).sum())} targeting cells."
        )
        lines += [
            f"### Screen `{screen_name}`",
            "",
            "| | ContrastiveVAE (ours) | Mixscape | ContrastiveVI |",
            "|---|---|---|---|",
            f"| responder AUROC, all targeting cells | {mean_sd(rows['ours_all'])} "
            f"| {mixscape['all targeting']:.3f} | – |",
            f"| responder AUROC, effect targets' cells | {mean_sd(rows['ours_effect'])} "
            f"| {mixscape['effect targets']:.3f} | – |",
            f"| calling AUROC (E-distance; ours: response latent) | {mean_sd(rows['calling_ours'])} "
            f"| – | {mean_sd(rows['calling_vi'])} |",
            f"| calling AUROC (E-distance, plain salient latent) "
            f"| {mean_sd(rows['calling_salient'])} | – | – |",
            "",
            "| ContrastiveVAE | value |",
            "|---|---|",
            f"| 95% interval covers the true responder fraction (effect targets) "
            f"| {mean_sd(rows['coverage'])} |",
            f"| mean absolute error of the responder fraction | {mean_sd(rows['fraction_error'])} |",
            f"| expected calibration error of P(perturbed), 5 bins | {mean_sd(rows['ece'])} |",
            *(
                f"| {latent} norm, {kind}, training / held-out | {value} |"
                for (latent, kind), value in norm_cells.items()
            ),
            "",
        ]
    command = (
        f"`.venv/bin/python benchmarks/benchmark_responders.py --screens {' '.join(args.screens)} "
        f"--cells {args.cells} --genes {args.genes} --epochs {args.epochs}{vae_options(args)} "
        f"--seed {args.seed} --model-seeds {' '.join(map(str, args.model_seeds))} "
        f"--output {args.output}`"
    )
    header = (
        f"Simulated screens of {args.cells} cells × {args.genes} genes (screen seed {args.seed}):\n\n"
        + "\n".join(headers)
        + f"\n\nVAEs: {args.epochs} epochs, no early stopping, n_salient={args.n_salient}, "
        f"n_background={args.n_background}, other settings at their defaults; "
        f"model seeds {args.model_seeds} (mean ± sd). Mixscape: pertpy's `perturbation_signature` (20 "
        "neighbours, within batch) and `mixscape` (deterministic, one run). "
        f"{torch.get_num_threads()} torch threads, CPU only."
    )
    write_results(args.output, "Responder benchmark results", command, header, lines)


if __name__ == "__main__":
    scvi.settings.seed = 0
    main()
