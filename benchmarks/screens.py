"""ContrastiveVAE on simulated screens with known truth: which targets, which cells, which genes.

For each screen (``_common.SCREENS``, 10,000 cells x 2,000 genes, screen seed 0) and model seed,
ContrastiveVAE is trained as a user would (``max_epochs`` 100 by default, early stopping on) and
scored on:

- **targets**: the p-values of ``model.distance_test()`` (p < 0.05: effect targets called, null
  targets called; a null target knocks down its own gene, so a call is not strictly false) and
  the AUROC of effect against null targets by its distance;
- **the salient space**: program separation (15-NN balanced accuracy of the responders'
  programs), responders against controls (15-NN balanced accuracy, every cell and the
  validation cells alone, which no gradient saw), background leakage (subclone, cell cycle,
  stress, from the perturbed cells);
- **cells**: the AUROC of ``get_responder_probability`` against the true responders (cells of
  effect targets that did not escape), and against every targeting cell that did not escape
  (every target knocks down its own gene);
- **genes**: ``differential_expression``: mAP of the true genes by p-value and by ``proba_de``,
  the false discovery proportion and true positive rate of ``is_de_fdr_0.05`` (effect targets),
  and for null targets whether their own gene is flagged, how many other genes are, and the
  share of their other genes' every-cell p-values below 0.05;
- epochs trained and seconds.

``--anchors`` adds PCA of log-normalised counts and scvi-tools' ContrastiveVI (``max_epochs``
epochs) on the same screen, tested with ``pt.tl.DistanceTest`` on every cell against all
controls. ``--label`` names the run (e.g. the version of the package on the path), so that two
versions can be compared in one results file. One torch thread by default, so that two runs
can go side by side. Run by hand (about 10 minutes per screen and seed):

    .venv/bin/python benchmarks/screens.py --screens calling hard core --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pertpy as pt
import torch
from _common import (
    CONTROL,
    SCREENS,
    command_line,
    effect_targets,
    fit_contrastive_vae,
    fit_contrastive_vi,
    knn_balanced_accuracy,
    leakage,
    machine,
    pca_of_counts,
    program_separation,
    quiet,
    save_records,
    simulate,
)
from anndata import AnnData
from sklearn.metrics import average_precision_score, roc_auc_score

KEYS = ("screen", "seed", "method", "label")


def calling_scores(table, effect) -> dict[str, float]:
    """Targets called at p < 0.05 and the AUROC of effect against null targets by distance."""
    table = table.drop(index=[CONTROL], errors="ignore")
    table = table[~table.index.str.contains(CONTROL, regex=False)]
    is_effect = table.index.isin(list(effect))
    called = table["pvalue"].to_numpy() < 0.05
    return {
        "effect_called": int(called[is_effect].sum()),
        "n_effect": int(is_effect.sum()),
        "null_called": int(called[~is_effect].sum()),
        "n_null": int((~is_effect).sum()),
        "calling_auroc": float(roc_auc_score(is_effect, table["distance"])),
    }


def every_cell_test(adata, embedding, cells=None) -> dict:
    """pertpy's DistanceTest on every cell of ``embedding`` (or ``cells``) against the controls."""
    cells = np.ones(adata.n_obs, bool) if cells is None else cells
    tested = AnnData(
        obs=adata.obs.loc[cells, ["perturbation"]].astype(str),
        obsm={"embedding": np.asarray(embedding)[cells]},
    )
    return pt.tl.DistanceTest("edistance", n_perms=1000, obsm_key="embedding")(
        tested, groupby="perturbation", contrast=CONTROL, show_progressbar=False
    )


def space_scores(adata, embedding) -> dict[str, float]:
    obs = adata.obs
    responders = obs["responder"].to_numpy()
    controls = (obs["perturbation"] == CONTROL).to_numpy()
    either = responders | controls
    return {
        "program_separation": program_separation(embedding, obs),
        "responders_vs_controls": knn_balanced_accuracy(embedding[either], responders[either]),
        **leakage(embedding, obs),
    }


def responder_scores(adata, probability) -> dict[str, float]:
    obs = adata.obs
    targeting = (obs["perturbation"] != CONTROL).to_numpy()
    effect = targeting & (obs["program"] != "none").to_numpy()
    truth = obs["responder"].to_numpy()
    # Every target, null ones included, knocks down its own gene: a cell that did not escape
    # responded in that sense.
    knocked_down = ~obs["escaped"].to_numpy()
    return {
        "responder_auroc": float(roc_auc_score(truth[targeting], probability[targeting])),
        "responder_auroc_effect_targets": float(roc_auc_score(truth[effect], probability[effect])),
        "knockdown_auroc": float(roc_auc_score(knocked_down[targeting], probability[targeting])),
    }


def de_scores(model, adata) -> dict[str, float]:
    """Recovery and error rates of ``model.differential_expression`` against the truth."""
    programs = adata.uns["simulation"]["target_program"]
    de = model.differential_expression()
    every_cell = model.differential_expression(responders_only=False)
    scores = {key: [] for key in ("map_p_value", "map_proba_de", "fdp", "tpr")}
    null = {"own_gene_found": [], "other_genes_flagged": [], "p_below_05": []}
    for target, table in de.groupby("group1"):
        flagged = table["is_de_fdr_0.05"].to_numpy()
        if programs[target] == "none":
            null["own_gene_found"].append(bool(table.loc[target, "is_de_fdr_0.05"]))
            null["other_genes_flagged"].append(int(flagged[table.index != target].sum()))
            others = every_cell[(every_cell["group1"] == target) & (every_cell.index != target)]
            null["p_below_05"].append(float((others["p_value"] < 0.05).mean()))
            continue
        truth = table.index.isin(
            [*adata.var_names[adata.var["program"] == programs[target]], target]
        )
        by_p_value = np.lexsort((-table["lfc_mean"].abs().to_numpy(), table["p_value"].to_numpy()))
        by_proba = np.argsort(-table["proba_de"].to_numpy(), kind="stable")
        for key, order in (("map_p_value", by_p_value), ("map_proba_de", by_proba)):
            scores[key].append(average_precision_score(truth[order], -np.arange(len(order))))
        scores["fdp"].append((flagged & ~truth).sum() / max(flagged.sum(), 1))
        scores["tpr"].append((flagged & truth).sum() / truth.sum())
    return {
        **{f"de_{key}": float(np.mean(values)) for key, values in scores.items()},
        "null_own_gene_found": float(np.mean(null["own_gene_found"])),
        "null_other_genes_flagged": float(np.sum(null["other_genes_flagged"])),
        "null_p_below_05": float(np.mean(null["p_below_05"])),
    }


def score_contrastive_vae(adata, seed, args) -> dict:
    train_kwargs = {"max_epochs": args.max_epochs, **json.loads(args.train)}
    model, seconds = fit_contrastive_vae(adata, seed, json.loads(args.model), train_kwargs)
    salient = model.get_latent_representation()
    validation = np.zeros(adata.n_obs, bool)
    validation[model.validation_indices] = True
    obs = adata.obs
    held_out = validation & (obs["responder"] | (obs["perturbation"] == CONTROL)).to_numpy()
    return {
        "epochs": model.epochs_trained,
        "seconds": seconds,
        "seconds_per_epoch": seconds / model.epochs_trained,
        **calling_scores(model.distance_test(), effect_targets(adata)),
        **space_scores(adata, salient),
        "responders_vs_controls_held_out": knn_balanced_accuracy(
            salient[held_out], obs["responder"].to_numpy()[held_out]
        ),
        **responder_scores(adata, model.get_responder_probability()),
        **de_scores(model, adata),
    }


def score_anchor(adata, embedding) -> dict:
    return {
        **calling_scores(every_cell_test(adata, embedding), effect_targets(adata)),
        **space_scores(adata, embedding),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screens", nargs="+", default=list(SCREENS), choices=list(SCREENS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--model", default="{}", help="JSON of further ContrastiveVAE arguments")
    parser.add_argument("--train", default="{}", help="JSON of further train arguments")
    parser.add_argument("--label", default="defaults", help="name of this ContrastiveVAE run")
    parser.add_argument("--anchors", action="store_true", help="also PCA and ContrastiveVI")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    for screen in args.screens:
        adata = simulate(screen, args.cells, args.genes)
        if args.anchors:
            record = {"screen": screen, "seed": 0, "method": "PCA of log-normalised counts"}
            record |= {"label": "anchor", **score_anchor(adata, pca_of_counts(adata))}
            save_records("screens", [{**record, "command": command_line(), **machine()}], KEYS)
        for seed in args.seeds:
            record = {"screen": screen, "seed": seed, "method": "ContrastiveVAE"}
            record |= {"label": args.label, **score_contrastive_vae(adata, seed, args)}
            records = [record]
            if args.anchors:
                model, seconds = fit_contrastive_vi(adata, seed, args.max_epochs)
                salient = model.get_latent_representation(representation_kind="salient")
                records.append(
                    {
                        "screen": screen,
                        "seed": seed,
                        "method": "scvi-tools ContrastiveVI",
                        "label": "anchor",
                        "seconds": seconds,
                        **score_anchor(adata, salient),
                    }
                )
            for r in records:
                print(json.dumps(r), flush=True)
            save_records(
                "screens", [{**r, "command": command_line(), **machine()} for r in records], KEYS
            )


if __name__ == "__main__":
    main()
