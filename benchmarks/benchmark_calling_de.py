"""Calling and DE-recovery benchmark on a simulated screen with known truth.

All methods run in one process on the same screen (``simulate_screen``):

- **calling**: AUROC of telling targets with an effect from null targets (knockdown of the
  target gene only) by their E-distance to the controls (pertpy's ``Distance("edistance")``,
  ``onesided_distances``), in the salient space of ContrastiveVAE and of scvi-tools'
  ContrastiveVI, in the PCA of Mixscape's signature, and in the PCA of log-normalised counts;
- **DE recovery**: for each effect target, pertpy's ``WilcoxonTest`` of all its cells (escapers
  included, as a user would test them) against the controls, on ContrastiveVAE's
  background-removed layer (log1p), on log-normalised counts and on Mixscape's ``X_pert``. Genes
  are ranked by p-value, ties (p-values that underflow to 0) broken by the absolute difference of
  the group means on the same layer, and, separately, by that absolute difference alone. The
  average precision of recovering the target's true DE genes (its program's genes and the target
  gene) is averaged over targets (mAP);
- **model-based DE** (``model.differential_expression``, responders against their own
  background): mAP with genes ranked by ``p_value`` (ties by |``lfc_mean``|) and by
  ``proba_de``; the false discovery proportion (per target and pooled over the effect targets'
  calls, with its standard error) and the fraction of true genes among the genes flagged
  ``is_de_fdr_0.05``; the genes null targets get flagged besides their target gene; and, over
  null targets with every cell counting (``responders_only=False``), the fraction of p-values
  below 0.05 and 0.01 (calibration). The
  calling AUROC of ContrastiveVAE is also reported on its response latent.

The VAEs are trained with several seeds (mean ± sd reported); Mixscape and PCA are
deterministic. Run by hand, alone (45-75 minutes per model seed on 2 cores); the page is
rewritten after each seed:

    .venv/bin/python benchmarks/benchmark_calling_de.py
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np
import pertpy as pt
import scanpy as sc
import scipy.sparse as sp
import scvi
import torch
from benchmark_core import (
    CONTROL,
    add_vae_arguments,
    fit_contrastive_vae,
    fit_contrastive_vi,
    log_normalised,
    mixscape_signature,
    vae_kwargs,
    vae_options,
    write_results,
)
from sklearn.metrics import average_precision_score, roc_auc_score

import pertpy_contrastive as pc

OURS = "ContrastiveVAE (ours)"
OURS_RESPONSE = "ContrastiveVAE (ours), response latent"
CONTRASTIVE_VI = "scvi-tools ContrastiveVI"
MIXSCAPE = "Mixscape signature"
LOG_NORMALISED = "log-normalised counts"
DE_LAYER_NAMES = {
    OURS: "ContrastiveVAE background-removed (log1p of `contrastive_denoised`)",
    LOG_NORMALISED: "log-normalised counts",
    MIXSCAPE: "Mixscape `X_pert`",
}


def calling_auroc(adata, embedding, effect_targets) -> float:
    """AUROC of effect against null targets, scored by E-distance to the controls."""
    data = adata.copy()
    data.obsm["embedding"] = embedding
    distances = pt.tl.Distance("edistance", obsm_key="embedding").onesided_distances(
        data, groupby="perturbation", selected_group=CONTROL, show_progressbar=False, n_jobs=1
    )
    targets = [t for t in distances.index if t != CONTROL]
    return roc_auc_score([t in effect_targets for t in targets], distances[targets])


def de_average_precision(adata, values, target, true_genes) -> dict[str, float]:
    """Average precision of a target's true DE genes in two rankings of a Wilcoxon test.

    ``"p-value"`` ranks by the test's p-value, ties broken by the absolute difference of the
    group means on the tested layer; ``"effect"`` ranks by that absolute difference alone.
    """
    cells = adata.obs["perturbation"].isin([CONTROL, target]).to_numpy()
    data = adata[cells].copy()
    data.obs["perturbation"] = data.obs["perturbation"].astype(str)
    tested = values[cells]
    data.layers["tested"] = np.asarray(tested.toarray() if sp.issparse(tested) else tested, float)
    result = pt.tl.WilcoxonTest.compare_groups(
        data, column="perturbation", baseline=CONTROL, groups_to_compare=[target], layer="tested"
    ).set_index("variable")
    in_target = (data.obs["perturbation"] == target).to_numpy()
    tested = data.layers["tested"]
    mean_difference = np.abs(tested[in_target].mean(0) - tested[~in_target].mean(0))
    result["effect"] = result.index.map(dict(zip(data.var_names, mean_difference, strict=True)))
    rankings = {
        "p-value": result.sort_values(["p_value", "effect"], ascending=[True, False]),
        "effect": result.sort_values("effect", ascending=False),
    }
    return {
        name: average_precision_score(ranked.index.isin(true_genes), -np.arange(len(ranked)))
        for name, ranked in rankings.items()
    }


MODEL_DE_ROWS = {
    "map_p_value": "DE recovery mAP, genes ranked by p-value",
    "map_proba_de": "DE recovery mAP, genes ranked by proba_de",
    "false_discovery_proportion": "false discovery proportion of `is_de_fdr_0.05` (effect targets)",
    "pooled_false_discovery_proportion": "false discovery proportion of `is_de_fdr_0.05`, pooled "
    "over effect targets' calls",
    "pooled_false_discovery_se": "its standard error (binomial, over the pooled calls)",
    "true_positive_rate": "fraction of true genes flagged `is_de_fdr_0.05` (effect targets)",
    "null_target_calls": "null targets: genes flagged `is_de_fdr_0.05` besides the target gene "
    "(responder-weighted, all null targets)",
    "null_target_calls_every_cell": "null targets: the same, every cell counting",
    "null_below_05": "null targets, every cell counting: fraction of p-values < 0.05",
    "null_below_01": "null targets, every cell counting: fraction of p-values < 0.01",
}


def model_de_scores(model, adata, truth) -> dict[str, float]:
    """Recovery, error rates and null calibration of ``model.differential_expression``."""
    de = model.differential_expression()
    every_cell = model.differential_expression(responders_only=False)
    scores = {key: [] for key in MODEL_DE_ROWS}
    false_calls = calls = null_calls = null_calls_every_cell = 0
    for target, table in de.groupby("group1"):
        if target not in truth:
            off_target = table.index != target
            null_calls += int(table.loc[off_target, "is_de_fdr_0.05"].sum())
            null = every_cell[(every_cell["group1"] == target) & (every_cell.index != target)]
            null_calls_every_cell += int(null["is_de_fdr_0.05"].sum())
            scores["null_below_05"].append((null["p_value"] < 0.05).mean())
            scores["null_below_01"].append((null["p_value"] < 0.01).mean())
            continue
        is_true = table.index.isin(truth[target])
        by_p_value = np.lexsort((-table["lfc_mean"].abs().to_numpy(), table["p_value"].to_numpy()))
        by_proba = np.argsort(-table["proba_de"].to_numpy(), kind="stable")
        for key, order in (("map_p_value", by_p_value), ("map_proba_de", by_proba)):
            scores[key].append(average_precision_score(is_true[order], -np.arange(len(order))))
        flagged = table["is_de_fdr_0.05"].to_numpy()
        scores["false_discovery_proportion"].append(
            (flagged & ~is_true).sum() / max(flagged.sum(), 1)
        )
        scores["true_positive_rate"].append((flagged & is_true).sum() / is_true.sum())
        false_calls += int((flagged & ~is_true).sum())
        calls += int(flagged.sum())
    pooled = false_calls / max(calls, 1)
    scores["pooled_false_discovery_proportion"] = [pooled]
    scores["pooled_false_discovery_se"] = [np.sqrt(pooled * (1 - pooled) / max(calls, 1))]
    scores["null_target_calls"] = [null_calls]
    scores["null_target_calls_every_cell"] = [null_calls_every_cell]
    return {key: float(np.mean(values)) for key, values in scores.items()}


def true_de_genes(adata, target) -> list[str]:
    program = adata.uns["simulation"]["target_program"][target]
    return [*adata.var_names[adata.var["program"] == program], target]


def mean_sd(values) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.3f}"
    each = ", ".join(f"{v:.3f}" for v in values)
    return f"{values.mean():.3f} ± {values.std():.3f} ({each})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--targets", type=int, default=24)
    parser.add_argument("--null-targets", type=int, default=8)
    parser.add_argument("--effect-size", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=60)
    add_vae_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated screen")
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("docs/benchmark_calling_de.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    adata = pc.datasets.simulate_screen(
        n_cells=args.cells,
        n_genes=args.genes,
        n_targets=args.targets,
        n_null_targets=args.null_targets,
        effect_size=args.effect_size,
        seed=args.seed,
    )
    programs = adata.uns["simulation"]["target_program"]
    effect_targets = {t for t, p in programs.items() if p != "none"}
    truth = {t: true_de_genes(adata, t) for t in effect_targets}

    def de_map(values) -> dict[str, float]:
        precisions = [de_average_precision(adata, values, t, truth[t]) for t in effect_targets]
        return {name: float(np.mean([p[name] for p in precisions])) for name in precisions[0]}

    calling = {
        name: []
        for name in (OURS, OURS_RESPONSE, CONTRASTIVE_VI, MIXSCAPE, "PCA of log-normalised")
    }
    de = {name: [] for name in (OURS, LOG_NORMALISED, MIXSCAPE)}
    signature = mixscape_signature(adata)
    de[MIXSCAPE].append(de_map(signature.layers["X_pert"]))
    de[LOG_NORMALISED].append(de_map(signature.X))
    signature.X = signature.layers["X_pert"]
    sc.pp.pca(signature, n_comps=args.n_salient)
    calling[MIXSCAPE].append(calling_auroc(adata, signature.obsm["X_pca"], effect_targets))
    normalised = log_normalised(adata)
    sc.pp.pca(normalised, n_comps=args.n_salient)
    calling["PCA of log-normalised"].append(
        calling_auroc(adata, normalised.obsm["X_pca"], effect_targets)
    )

    model_de = []
    completed_seeds = []
    # The page is rewritten after every seed, so a long run that is stopped keeps its finished
    # seeds (the header says which).
    for seed in args.model_seeds:
        model, _ = fit_contrastive_vae(adata, seed, args.epochs, *vae_kwargs(args))
        calling[OURS].append(
            calling_auroc(adata, model.get_latent_representation(kind="salient"), effect_targets)
        )
        calling[OURS_RESPONSE].append(
            calling_auroc(adata, model.get_latent_representation(kind="response"), effect_targets)
        )
        model_de.append(model_de_scores(model, adata, truth))
        de[OURS].append(de_map(np.log1p(model.get_denoised_expression(seed=seed))))
        vi_model, _ = fit_contrastive_vi(adata, args, seed)
        vi_salient = vi_model.get_latent_representation(representation_kind="salient")
        calling[CONTRASTIVE_VI].append(calling_auroc(adata, vi_salient, effect_targets))
        completed_seeds.append(seed)
        print({"seed": seed, **{k: v[-1] for k, v in calling.items()}, **model_de[-1]}, flush=True)
        write_page(args, adata, truth, calling, de, model_de, completed_seeds)


def write_page(args, adata, truth, calling, de, model_de, completed_seeds) -> None:
    lines = [
        "| embedding | calling AUROC (effect vs null targets, by E-distance) |",
        "|---|---|",
        *(f"| {name} | {mean_sd(values)} |" for name, values in calling.items()),
        "",
        "| layer tested (Wilcoxon, target vs controls) | DE recovery mAP, genes ranked by "
        "p-value | DE recovery mAP, genes ranked by absolute mean difference |",
        "|---|---|---|",
        *(
            f"| {DE_LAYER_NAMES[name]} | {mean_sd([r['p-value'] for r in runs])} "
            f"| {mean_sd([r['effect'] for r in runs])} |"
            for name, runs in de.items()
        ),
        "",
        "| ContrastiveVAE `differential_expression` (responders vs their background) | value |",
        "|---|---|",
        *(
            f"| {label} | {mean_sd([r[key] for r in model_de])} |"
            for key, label in MODEL_DE_ROWS.items()
        ),
    ]
    command = (
        f"`.venv/bin/python benchmarks/benchmark_calling_de.py --cells {args.cells} "
        f"--genes {args.genes} --targets {args.targets} --null-targets {args.null_targets} "
        f"--effect-size {args.effect_size} --epochs {args.epochs}{vae_options(args)} "
        f"--seed {args.seed} "
        f"--model-seeds {' '.join(map(str, args.model_seeds))} --output {args.output}`"
    )
    n_responders = adata.obs["responder"].sum()
    header = (
        f"Simulated screen: {args.cells} cells × {args.genes} genes, {args.targets} targets of "
        f"which {args.null_targets} have no effect, mean program log fold change "
        f"{args.effect_size}, {n_responders} responding cells, seed {args.seed}. VAEs: "
        f"{args.epochs} epochs, n_salient={args.n_salient}, n_background={args.n_background}, "
        f"model seeds {completed_seeds} of {args.model_seeds} completed (mean ± sd); "
        f"{torch.get_num_threads()} torch threads, CPU only. Chance: AUROC 0.5; mAP about "
        f"{np.mean([len(g) for g in truth.values()]) / args.genes:.3f} (fraction of true genes)."
    )
    write_results(args.output, "Calling and DE-recovery benchmark results", command, header, lines)


if __name__ == "__main__":
    scvi.settings.seed = 0
    main()
