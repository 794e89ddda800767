"""Why the decoded background-removed layer lost to raw counts, cause by cause.

For each screen (``--screens``, from ``benchmark_responders.SCREENS``) and model seed, the
default ContrastiveVAE is trained (60 epochs) and pertpy's ``WilcoxonTest`` (each effect target
against the controls) is run on these layers, scored by the mean average precision of the true
program genes (target gene included), genes ranked by p-value and by absolute mean difference
(``benchmark_calling_de.de_average_precision``):

- log-normalised counts (the anchor);
- the decoded layer (``get_denoised_expression(source="decoder")``, the layer before 0.3);
- counts sampled from the decoded layer (NB with the model's dispersions at each cell's depth):
  if decodes lost only because they are deterministic, realistic noise would restore them;
- the counts-based layer (``source="counts"``, the layer written now): observed counts with
  each cell's background exchanged for the reference's;
- the same exchange with the simulator's true background instead of the model's (the ceiling
  of background removal: no model can remove the background better).

Each layer is also scored with the true escapers removed (do escapers dilute it?), and by the
share of its target-vs-control mean difference that falls on the true genes (does the decoder
spread a program over unrelated genes?). ``model.differential_expression`` is scored beside
them. Run by hand (about 15 minutes per screen and seed on 2 cores):

    .venv/bin/python benchmarks/denoised_layer.py
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from benchmark_calling_de import de_average_precision, model_de_scores, true_de_genes
from benchmark_core import fit_contrastive_vae, write_results
from benchmark_responders import SCREENS

import pertpy_contrastive as pc

LAYERS = {
    "log_normalised": "log-normalised counts",
    "decoder": 'decoded layer (`source="decoder"`)',
    "decoder_sampled": "counts sampled from the decoded layer",
    "counts": 'counts-based layer (`source="counts"`, default)',
    "oracle": "counts with the true background exchanged (ceiling, no model)",
}


def layers(model, seed) -> dict[str, np.ndarray]:
    """Every layer compared, log1p of rows normalised to 1e4."""
    counts = model.adata.X
    counts = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, float)
    depth = counts.sum(1, keepdims=True)
    decoded = model.get_denoised_expression(source="decoder", seed=seed).astype(float)
    rng = np.random.default_rng(seed)
    dispersion = model.module.log_inverse_dispersion.detach().exp().cpu().numpy()
    mean = decoded / 1e4 * depth
    sampled = rng.poisson(rng.gamma(dispersion, mean / dispersion)).astype(float)
    sampled_depth = np.maximum(sampled.sum(1, keepdims=True), 1.0)
    return {
        "log_normalised": np.log1p(counts / depth * 1e4),
        "decoder": np.log1p(decoded),
        "decoder_sampled": np.log1p(sampled / sampled_depth * 1e4),
        "counts": np.log1p(model.get_denoised_expression(seed=seed)),
    }


def oracle_layer(adata, true_background) -> np.ndarray:
    """The counts-based layer with the simulator's true background: ``x_ng r_g / p_ng``, log1p."""
    counts = adata.X.toarray().astype(float)
    controls = (adata.obs["perturbation"] == "non-targeting").to_numpy()
    exchanged = counts * true_background[controls].mean(0) / true_background
    return np.log1p(exchanged / exchanged.sum(1, keepdims=True) * 1e4)


def score_layer(adata, values, truth) -> dict[str, float]:
    kept = ~adata.obs["escaped"].to_numpy()
    controls = (adata.obs["perturbation"] == "non-targeting").to_numpy()
    scores = {}
    for name, cells in (("all", np.ones(adata.n_obs, bool)), ("no escapers", kept)):
        precisions = [de_average_precision(adata[cells], values[cells], t, truth[t]) for t in truth]
        for ranking in ("p-value", "effect"):
            scores[f"{ranking}, {name}"] = float(np.mean([p[ranking] for p in precisions]))
    shares = []
    for target, genes in truth.items():
        in_target = (adata.obs["perturbation"] == target).to_numpy()
        difference = np.abs(values[in_target].mean(0) - values[controls].mean(0))
        shares.append(difference[adata.var_names.isin(genes)].sum() / difference.sum())
    scores["share on true genes"] = float(np.mean(shares))
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screens", nargs="+", default=["calling", "hard"], choices=SCREENS)
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--output", type=Path, default=Path("docs/benchmark_denoised_layer.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    rows = []
    for screen in args.screens:
        adata = pc.datasets.simulate_screen(
            n_cells=args.cells, n_genes=args.genes, seed=0, true_background=True, **SCREENS[screen]
        )
        true_background = adata.layers.pop("true_background").astype(float)
        programs = adata.uns["simulation"]["target_program"]
        truth = {t: true_de_genes(adata, t) for t, p in programs.items() if p != "none"}
        rows.append(
            {"screen": screen, "layer": LAYERS["oracle"]}
            | score_layer(adata, oracle_layer(adata, true_background), truth)
        )
        print(rows[-1], flush=True)
        for seed in args.model_seeds:
            model, _ = fit_contrastive_vae(adata, seed, 60)
            for key, values in layers(model, seed).items():
                rows.append(
                    {"screen": screen, "seed": seed, "layer": LAYERS[key]}
                    | score_layer(adata, values, truth)
                )
                print(rows[-1], flush=True)
            de = model_de_scores(model, model.adata, truth)
            rows.append(
                {
                    "screen": screen,
                    "seed": seed,
                    "layer": "`differential_expression` (ranked by p-value / proba_de)",
                    "p-value, all": de["map_p_value"],
                    "effect, all": de["map_proba_de"],
                }
            )
            print(rows[-1], flush=True)

    table = pd.DataFrame(rows).groupby(["screen", "layer"], sort=False).mean(numeric_only=True)
    columns = [
        "p-value, all",
        "effect, all",
        "p-value, no escapers",
        "effect, no escapers",
        "share on true genes",
    ]
    lines = [
        "| screen | layer | mAP by p-value | mAP by mean difference | mAP by p-value, escapers "
        "removed | mAP by mean difference, escapers removed | share of the mean difference on "
        "true genes |",
        "|---|---|---|---|---|---|---|",
    ]
    for (screen, layer), row in table.iterrows():
        cells = " | ".join("–" if pd.isna(row.get(c)) else f"{row[c]:.3f}" for c in columns)
        lines.append(f"| {screen} | {layer} | {cells} |")
    command = (
        f"`.venv/bin/python benchmarks/denoised_layer.py --screens {' '.join(args.screens)} "
        f"--model-seeds {' '.join(map(str, args.model_seeds))} --output {args.output}`"
    )
    header = (
        f"Simulated screens of {args.cells} cells × {args.genes} genes "
        f"({', '.join(f'{s}: {SCREENS[s] or "core defaults"}' for s in args.screens)}); "
        f"default ContrastiveVAE, 60 epochs; means over model seeds {args.model_seeds}. "
        f"Wilcoxon of each effect target against the controls; {torch.get_num_threads()} torch "
        "threads, CPU only. `differential_expression` has no layer: its two columns rank "
        "genes by its p-value and by proba_de."
    )
    write_results(
        args.output, "Why the decoded layer lost: a decomposition", command, header, lines
    )


if __name__ == "__main__":
    main()
