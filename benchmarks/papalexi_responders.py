"""Papalexi 2021 subset: ContrastiveVAE's responder calls, checked against data and Mixscape.

On the bundled THP-1 subset (guides assigned with pertpy's ``assign_to_max_guide``, 5 UMIs;
controls are the non-targeting guides; batch key ``replicate``), ContrastiveVAE is trained with
default settings (early stopping on) for each model seed, and ``write_outputs`` calls each labelled perturbed cell KO (responder probability above 0.5) or
NP. Measured:

- **calls per target**: the fraction of cells called KO and the model's responder fraction with
  its 95% credible interval (mean over model seeds), beside the fraction Mixscape calls KO;
- **the knocked-out gene's own mRNA**: for each target whose gene is among the measured genes,
  the mean log-normalised expression (``normalize_total`` 1e4, ``log1p``) of that gene in the
  target's cells called KO, called NP, and in non-targeting controls. A knockout that removes
  the transcript (nonsense-mediated decay) should show less of it in KO cells;
- **agreement with pertpy's Mixscape** on the same cells (signature with 20 control neighbours
  within each replicate, on 50 PCs of log-normalised counts; ``mixscape`` on ``X_pert``, split
  by replicate): cells called KO by both, by one, by neither, and Cohen's kappa, per target;
- **technical covariates in the salient latent** (ours: the plain salient latent and the
  response latent, salient weighted by P(perturbed)), over labelled perturbed cells: balanced
  accuracy of a 15-NN classifier predicting the replicate and R² of a 15-NN regression of the
  log library size (log total counts), both 5-fold CV with shuffled folds (lower means less
  technical signal), against scvi-tools' ContrastiveVI (salient latent; background = controls,
  target = labelled perturbed cells; same latent sizes, ``--epochs`` epochs, no early stopping;
  one model per seed) and a 10-PC PCA of log-normalised counts.

Run by hand (about 20-40 minutes on 2 cores):

    .venv/bin/python benchmarks/papalexi_responders.py
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pertpy as pt
import scanpy as sc
import scipy.sparse as sp
import scvi
import torch
from anndata import AnnData
from benchmark_core import CONTROL, N_NEIGHBORS, log_normalised, write_results
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, r2_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

import pertpy_contrastive as pc

BATCH = "replicate"
IFNG_PATHWAY = ["IFNGR1", "IFNGR2", "JAK2", "STAT1", "IRF1"]
N_LATENT = 10
OURS = "ContrastiveVAE (ours), salient latent"
OURS_RESPONSE = "ContrastiveVAE (ours), response latent"
CONTRASTIVE_VI = "scvi-tools ContrastiveVI"
PCA = "PCA of log-normalised counts (10 PCs)"


def load_papalexi():
    """The bundled subset with guides assigned and ``rna.obs['perturbation']`` written."""
    mdata = pc.datasets.papalexi2021_subset()
    pt.pp.GuideAssignment().assign_to_max_guide(mdata["gdo"], assignment_threshold=5)
    pc.pp.perturbation_labels(mdata)
    return mdata


def counts_only(rna) -> AnnData:
    """Raw counts, replicate and perturbation label of the labelled cells (label as str)."""
    labelled = rna.obs["perturbation"].notna().to_numpy()
    obs = rna.obs.loc[labelled, [BATCH, "perturbation"]].copy()
    obs["perturbation"] = obs["perturbation"].astype(str)
    return AnnData(X=rna.X[labelled].copy(), obs=obs, var=rna.var[[]].copy())


def train_contrastive_vae(seed, epochs, train_kwargs, model_kwargs):
    """Train ContrastiveVAE on a fresh copy of the data; return the RNA AnnData with outputs."""
    mdata = load_papalexi()
    pc.ContrastiveVAE.setup_anndata(
        mdata, perturbation_key="perturbation", control=CONTROL, batch_key=BATCH
    )
    model = pc.ContrastiveVAE(mdata, seed=seed, **model_kwargs)
    start = time.perf_counter()
    model.train(max_epochs=epochs, seed=seed, enable_progress_bar=False, **train_kwargs)
    seconds = time.perf_counter() - start
    rna = model.write_outputs(mdata)
    return rna, len(model.history["loss_train"]), seconds


def contrastive_vi_salient(data, seed, epochs) -> np.ndarray:
    """Salient latent of scvi-tools' ContrastiveVI trained on ``data`` (labelled cells)."""
    scvi.settings.seed = seed
    data = data.copy()
    scvi.external.ContrastiveVI.setup_anndata(data, batch_key=BATCH)
    model = scvi.external.ContrastiveVI(
        data, n_salient_latent=N_LATENT, n_background_latent=N_LATENT
    )
    is_control = (data.obs["perturbation"] == CONTROL).to_numpy()
    model.train(
        background_indices=np.flatnonzero(is_control).tolist(),
        target_indices=np.flatnonzero(~is_control).tolist(),
        max_epochs=epochs,
        early_stopping=False,
        enable_progress_bar=False,
    )
    return model.get_latent_representation(representation_kind="salient")


def technical_leakage(embedding, replicate, log_library) -> dict[str, float]:
    """15-NN replicate balanced accuracy and log-library R² (5-fold CV, shuffled folds)."""
    predicted = cross_val_predict(
        KNeighborsClassifier(N_NEIGHBORS),
        embedding,
        replicate,
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
    )
    fitted = cross_val_predict(
        KNeighborsRegressor(N_NEIGHBORS),
        embedding,
        log_library,
        cv=KFold(5, shuffle=True, random_state=0),
    )
    return {
        "replicate": balanced_accuracy_score(replicate, predicted),
        "library": r2_score(log_library, fitted),
    }


def run_mixscape(data) -> pd.Series:
    """Mixscape's global class (KO / NP / NT) of each labelled cell."""
    signature = log_normalised(data)
    sc.pp.pca(signature, n_comps=50)
    mixscape = pt.tl.Mixscape()
    mixscape.perturbation_signature(
        signature, pert_key="perturbation", control=CONTROL, split_by=BATCH, n_neighbors=20
    )
    mixscape.mixscape(
        adata=signature,
        pert_key="perturbation",
        control=CONTROL,
        layer="X_pert",
        split_by=BATCH,
    )
    return signature.obs["mixscape_class_global"].astype(str)


def mean_sd(values, digits=3) -> str:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def number(value, spec=".3f") -> str:
    """``value`` formatted with ``spec``, or "–" when it is NaN."""
    return "–" if np.isnan(value) else format(value, spec)


def kappa(a, b) -> float:
    """Cohen's kappa of two boolean calls; NaN when both call every cell the same way."""
    if len(a) == 0 or (a.all() and b.all()) or (~a.any() and ~b.any()):
        return float("nan")
    return cohen_kappa_score(a, b)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=200, help="maximum epochs of both VAEs")
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", default="{}", help="JSON of ContrastiveVAE.train arguments")
    parser.add_argument("--model", default="{}", help="JSON of ContrastiveVAE arguments")
    parser.add_argument(
        "--output", type=Path, default=Path("docs/benchmark_papalexi_responders.md")
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.ERROR)

    data = counts_only(load_papalexi()["rna"])  # labelled cells, raw counts
    labels = data.obs["perturbation"]
    is_control = (labels == CONTROL).to_numpy()
    perturbed = ~is_control
    targets = sorted(set(labels[perturbed]))
    ordered_targets = [t for t in IFNG_PATHWAY if t in targets]
    replicate = data.obs[BATCH].astype(str).to_numpy()
    library = np.asarray(data.X.sum(1)).ravel()
    log_library = np.log(library)
    normalised = log_normalised(data)
    log_expression = normalised.X.toarray() if sp.issparse(normalised.X) else normalised.X

    # Deterministic references, once: Mixscape calls and PCA of log-normalised counts.
    start = time.perf_counter()
    mixscape_ko = (run_mixscape(data) == "KO").to_numpy()
    print(f"Mixscape: {time.perf_counter() - start:.0f} s", flush=True)
    pca = normalised.copy()
    sc.pp.pca(pca, n_comps=N_LATENT)
    leakage = {
        PCA: [
            technical_leakage(
                pca.obsm["X_pca"][perturbed], replicate[perturbed], log_library[perturbed]
            )
        ]
    }
    print({"method": PCA, **leakage[PCA][0]}, flush=True)

    leakage[OURS], leakage[OURS_RESPONSE], leakage[CONTRASTIVE_VI] = [], [], []
    ko_calls, fractions, epochs_trained, seconds = [], [], [], []
    for seed in args.model_seeds:
        rna, n_epochs, train_seconds = train_contrastive_vae(
            seed, args.epochs, json.loads(args.train), json.loads(args.model)
        )
        epochs_trained.append(n_epochs)
        seconds.append(train_seconds)
        rna = rna[data.obs_names]  # labelled cells, in the order of ``data``
        assert (rna.obs["perturbation"].astype(str) == labels).all()
        global_class = rna.obs["contrastive_class_global"].astype(str).to_numpy()
        assert np.isfinite(rna.obs["contrastive_p_perturbed"].to_numpy()).all()
        ko_calls.append(global_class == "KO")
        fractions.append(rna.uns["contrastive_responder_fractions"].copy())
        salient = rna.obsm["X_contrastive_salient"]
        for method, latent in (
            (OURS, salient),
            (OURS_RESPONSE, rna.obsm["X_contrastive_response"]),
        ):
            leakage[method].append(
                technical_leakage(latent[perturbed], replicate[perturbed], log_library[perturbed])
            )
        start = time.perf_counter()
        vi_salient = contrastive_vi_salient(data, seed, args.epochs)
        vi_seconds = time.perf_counter() - start
        leakage[CONTRASTIVE_VI].append(
            technical_leakage(vi_salient[perturbed], replicate[perturbed], log_library[perturbed])
        )
        print(
            {
                "seed": seed,
                "epochs_trained": n_epochs,
                "train_seconds": round(train_seconds),
                "contrastive_vi_seconds": round(vi_seconds),
                "called_KO": int(ko_calls[-1].sum()),
                **{
                    f"{m} {k}": round(v[-1][k], 3)
                    for m, v in leakage.items()
                    if m != PCA
                    for k in v[-1]
                },
            },
            flush=True,
        )
    ko_calls = np.array(ko_calls)  # (seeds, cells)

    # 1. Calls per target.
    by_seed = pd.DataFrame(
        {
            seed: pd.Series(calls[perturbed], index=labels[perturbed]).groupby(level=0).mean()
            for seed, calls in zip(args.model_seeds, ko_calls, strict=True)
        }
    )
    mixscape_fraction = (
        pd.Series(mixscape_ko[perturbed], index=labels[perturbed]).groupby(level=0).mean()
    )
    stacked = pd.concat(fractions, keys=args.model_seeds, names=["seed", "target_index"])
    fraction_mean = stacked.groupby(level="target_index")[
        ["responder_fraction", "ci_low", "ci_high"]
    ].mean()
    fraction_sd = stacked.groupby(level="target_index")["responder_fraction"].std(ddof=0)
    others = sorted(set(targets) - set(ordered_targets), key=lambda t: -by_seed.loc[t].mean())
    n_cells = labels.value_counts()
    lines = [
        "### Responder calls per target",
        "",
        "IFN-γ pathway targets first (bold), then the others by fraction called KO. Fractions "
        "are the mean over model seeds (± sd where there are several); the 95% interval is the "
        "mean of the seeds' interval bounds.",
        "",
        "| target | cells | fraction called KO (ours) | responder fraction (ours) | 95% interval "
        "| fraction called KO (Mixscape) |",
        "|---|---|---|---|---|---|",
    ]
    for target in [*ordered_targets, *others]:
        name = f"**{target}**" if target in IFNG_PATHWAY else target
        lines.append(
            f"| {name} | {n_cells[target]} | {mean_sd(by_seed.loc[target])} "
            f"| {fraction_mean.loc[target, 'responder_fraction']:.3f}"
            + (f" ± {fraction_sd[target]:.3f}" if len(args.model_seeds) > 1 else "")
            + f" | {fraction_mean.loc[target, 'ci_low']:.3f}–{fraction_mean.loc[target, 'ci_high']:.3f} "
            f"| {mixscape_fraction[target]:.3f} |"
        )
    lines.append(f"| {CONTROL} | {n_cells[CONTROL]} | 0 (by construction) | – | – | – |")

    # 2. The target gene's own mRNA.
    measured = [t for t in [*ordered_targets, *sorted(targets)] if t in data.var_names]
    measured = list(dict.fromkeys(measured))
    control_mean = {}
    lines += [
        "",
        "### The knocked-out gene's own mRNA",
        "",
        "Mean log-normalised expression (log1p of counts per 10,000) of the target gene in the "
        "target's cells called KO and NP (ours: mean over model seeds; cell counts are the "
        "mean over seeds), in non-targeting controls, and in Mixscape's KO and NP cells of the "
        "same target. Difference = KO − NP.",
        "",
        "| target gene | ours KO (cells) | ours NP (cells) | ours KO − NP | non-targeting "
        f"({int(is_control.sum())} cells) | Mixscape KO (cells) | Mixscape NP (cells) "
        "| Mixscape KO − NP |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def group_mean(values, mask):
        return float(values[mask].mean()) if mask.any() else float("nan")

    def seed_mean(values):  # mean over the seeds that have cells in the group
        values = np.asarray(values, dtype=float)
        return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else np.nan

    for gene in measured:
        values = log_expression[:, data.var_names.get_loc(gene)]
        in_target = (labels == gene).to_numpy()
        control_mean[gene] = group_mean(values, is_control)
        ko_mean = seed_mean([group_mean(values, in_target & calls) for calls in ko_calls])
        np_mean = seed_mean([group_mean(values, in_target & ~calls) for calls in ko_calls])
        n_ko = np.mean([(in_target & calls).sum() for calls in ko_calls])
        n_np = np.mean([(in_target & ~calls).sum() for calls in ko_calls])
        mix_ko = group_mean(values, in_target & mixscape_ko)
        mix_np = group_mean(values, in_target & ~mixscape_ko)
        name = f"**{gene}**" if gene in IFNG_PATHWAY else gene
        lines.append(
            f"| {name} | {number(ko_mean)} ({n_ko:.0f}) | {number(np_mean)} ({n_np:.0f}) "
            f"| {number(ko_mean - np_mean, '+.3f')} | {number(control_mean[gene])} "
            f"| {number(mix_ko)} ({(in_target & mixscape_ko).sum()}) "
            f"| {number(mix_np)} ({(in_target & ~mixscape_ko).sum()}) "
            f"| {number(mix_ko - mix_np, '+.3f')} |"
        )

    # 3. Agreement with Mixscape.
    first = args.model_seeds[0]
    lines += [
        "",
        "### Agreement with Mixscape (KO calls)",
        "",
        f"Cell counts for model seed {first}; Cohen's kappa for seed {first} and the mean ± sd "
        "over seeds (– when both methods call every cell of the target alike).",
        "",
        f"| target | KO by both | ours only | Mixscape only | neither | kappa (seed {first}) "
        "| kappa (all seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [*ordered_targets, *others, "all targets"]
    for target in rows:
        cells = perturbed if target == "all targets" else (labels == target).to_numpy()
        ours, theirs = ko_calls[0][cells], mixscape_ko[cells]
        kappas = [kappa(calls[cells], theirs) for calls in ko_calls]
        name = f"**{target}**" if target in IFNG_PATHWAY or target == "all targets" else target
        lines.append(
            f"| {name} | {(ours & theirs).sum()} | {(ours & ~theirs).sum()} "
            f"| {(~ours & theirs).sum()} | {(~ours & ~theirs).sum()} "
            f"| {mean_sd([kappas[0]])} | {mean_sd(kappas)} |"
        )

    # 4. Technical covariates in the salient latent.
    lines += [
        "",
        "### Technical covariates in the salient latent",
        "",
        f"Over the {int(perturbed.sum())} labelled perturbed cells; 15-NN, 5-fold CV with "
        "shuffled folds; mean ± sd over model seeds. Lower means less technical signal. "
        f"Chance: balanced accuracy {1 / len(set(replicate)):.3f}, R² 0.",
        "",
        "| embedding | replicate (balanced accuracy) | log library size (R²) |",
        "|---|---|---|",
    ]
    for method in (OURS, OURS_RESPONSE, CONTRASTIVE_VI, PCA):
        runs = leakage[method]
        lines.append(
            f"| {method} | {mean_sd([r['replicate'] for r in runs])} "
            f"| {mean_sd([r['library'] for r in runs])} |"
        )

    seeds = " ".join(map(str, args.model_seeds))
    command = (
        f"`.venv/bin/python benchmarks/papalexi_responders.py --epochs {args.epochs} "
        f"--model-seeds {seeds}"
        + (f" --train '{args.train}'" if json.loads(args.train) else "")
        + (f" --model '{args.model}'" if json.loads(args.model) else "")
        + f" --output {args.output}`"
    )
    rna_all = load_papalexi()["rna"]
    overrides = {**json.loads(args.model), **json.loads(args.train)}
    settings = "default settings" + (
        " except " + ", ".join(f"{key}={value}" for key, value in overrides.items())
        if overrides
        else ""
    )
    header = (
        f"Bundled Papalexi 2021 THP-1 subset: {rna_all.n_obs} cells × {rna_all.n_vars} genes, "
        f"{data.n_obs} with a single-target guide label ({int(is_control.sum())} non-targeting "
        f"controls, {int(perturbed.sum())} perturbed cells of {len(targets)} targets), "
        f"{rna_all.n_obs - data.n_obs} without a label (not scored), "
        f"{len(set(replicate))} replicates. ContrastiveVAE: {settings}, at most "
        f"{args.epochs} epochs with early stopping (epochs trained per seed: "
        f"{', '.join(map(str, epochs_trained))}; training seconds: "
        f"{', '.join(f'{s:.0f}' for s in seconds)}), KO = responder probability > 0.5; model "
        f"seeds {args.model_seeds}. ContrastiveVI: {args.epochs} epochs, no early stopping, "
        f"latent sizes {N_LATENT}/{N_LATENT}, same seeds. Mixscape: deterministic, run once. "
        f"{torch.get_num_threads()} torch threads, CPU only."
    )
    write_results(args.output, "Papalexi subset: responder calls", command, header, lines)


if __name__ == "__main__":
    main()
