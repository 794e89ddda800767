"""Papalexi 2021 subset: does the salient latent set training cells of null targets apart?

On the bundled THP-1 subset (guides assigned with pertpy's ``assign_to_max_guide``, 5 UMIs;
batch key ``replicate``), four non-targeting guides become pseudo-targets (those of
``pc.tl.calibration_check``'s check seed 0: NTg2, NTg4, NTg5, NTg8) and ContrastiveVAE is
trained on them with the real targets (default settings and early stopping, ``train_size``
0.75; ``--model`` passes JSON of further ContrastiveVAE arguments). A pseudo-target is null by
construction. pertpy's ``DistanceTest`` (E-distance, 1,000 permutations) of each pseudo-target
against the remaining controls is run on the salient latent of every cell, of training cells
only, of held-out cells only, across the split (training pseudo-target cells against held-out
controls, and the reverse), and with the labels permuted within replicates
(``pc.tl.distance_test(strata_key="replicate")``); the same tests on a 10-PC PCA of
log-normalised counts, which no training touches; the mean norm of the salient latent of
controls and pseudo-target cells in and out of training; and how the non-targeting guides'
cells spread over the replicates (a permutation test that ignores the replicate assumes they
spread alike). The calibration check (``papalexi_calibration.py``) reports the every-cell and
held-out rates; this page shows where a miscalibration comes from.

Run by hand (about 2 minutes per model on 2 cores):

    .venv/bin/python benchmarks/papalexi_training_split.py
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pertpy as pt
import scanpy as sc
from anndata import AnnData
from benchmark_core import CONTROL, write_results
from scipy import stats

import pertpy_contrastive as pc

PSEUDO_GUIDES = ["NTg2", "NTg4", "NTg5", "NTg8"]
PSEUDO_PREFIX = "pseudo:"


def papalexi_with_pseudo_targets() -> AnnData:
    """Labelled cells of the bundled subset, with ``PSEUDO_GUIDES``' controls relabelled."""
    mdata = pc.datasets.papalexi2021_subset()
    pt.pp.GuideAssignment().assign_to_max_guide(mdata["gdo"], assignment_threshold=5)
    pc.pp.perturbation_labels(mdata, guide_key_added="guide")
    rna = mdata["rna"]
    rna = rna[rna.obs["perturbation"].notna()]
    labels = rna.obs["perturbation"].astype(object).to_numpy().copy()
    guides = rna.obs["guide"].astype(str).to_numpy()
    is_pseudo = (labels == CONTROL) & np.isin(guides, PSEUDO_GUIDES)
    labels[is_pseudo] = PSEUDO_PREFIX + guides[is_pseudo]
    data = AnnData(
        X=rna.X.copy(),
        obs=rna.obs[["replicate", "guide"]].copy(),
        var=pd.DataFrame(index=rna.var_names),
    )
    data.obs["perturbation"] = pd.Categorical(labels)
    return data


def distance_p_values(data, obsm_key, pseudo_cells, control_cells, strata_key) -> dict[str, str]:
    """Distance test of each pseudo-target's ``pseudo_cells`` against the ``control_cells``.

    pertpy's ``DistanceTest`` without ``strata_key``, else labels permuted within its strata.
    """
    labels = data.obs["perturbation"].to_numpy()
    tested = data[pseudo_cells | control_cells].copy()
    tested.obs["perturbation"] = tested.obs["perturbation"].astype(str)
    if strata_key is None:
        table = pt.tl.DistanceTest("edistance", n_perms=1000, obsm_key=obsm_key)(
            tested, groupby="perturbation", contrast=CONTROL, show_progressbar=False
        )
    else:
        table = pc.tl.distance_test(
            tested,
            groupby="perturbation",
            contrast=CONTROL,
            obsm_key=obsm_key,
            strata_key=strata_key,
        )
    return {
        label: f"{table.loc[label, 'pvalue']:.3f} ({int((pseudo_cells & (labels == label)).sum())})"
        for label in sorted(set(labels[pseudo_cells]))
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="{}", help="JSON of ContrastiveVAE arguments")
    parser.add_argument("--seed", type=int, default=0, help="model seed")
    parser.add_argument(
        "--train", default="{}", help="JSON of further ContrastiveVAE.train arguments"
    )
    parser.add_argument(
        "--output", type=Path, default=Path("docs/benchmark_papalexi_training_split.md")
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    data = papalexi_with_pseudo_targets()
    pc.ContrastiveVAE.setup_anndata(
        data, perturbation_key="perturbation", control=CONTROL, batch_key="replicate"
    )
    model = pc.ContrastiveVAE(data, seed=args.seed, **json.loads(args.model))
    model.train(
        train_size=0.75, seed=args.seed, enable_progress_bar=False, **json.loads(args.train)
    )
    data.obsm["X_salient"] = model.get_latent_representation(kind="salient")
    normalised = data.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    sc.pp.pca(normalised, n_comps=10)
    data.obsm["X_pca"] = normalised.obsm["X_pca"]

    training = np.zeros(data.n_obs, bool)
    training[model.train_indices] = True
    labels = data.obs["perturbation"].astype(str)
    is_pseudo = labels.str.startswith(PSEUDO_PREFIX).to_numpy()
    is_control = (labels == CONTROL).to_numpy()
    every = np.ones(data.n_obs, bool)
    comparisons = {
        "every cell": ("X_salient", every, every, None),
        "training cells": ("X_salient", training, training, None),
        "held-out cells": ("X_salient", ~training, ~training, None),
        "training pseudo-target cells against held-out controls": (
            "X_salient",
            training,
            ~training,
            None,
        ),
        "held-out pseudo-target cells against training controls": (
            "X_salient",
            ~training,
            training,
            None,
        ),
        "every cell, permuted within replicates": ("X_salient", every, every, "replicate"),
        "held-out cells, permuted within replicates": (
            "X_salient",
            ~training,
            ~training,
            "replicate",
        ),
        "PCA of log-normalised counts, every cell": ("X_pca", every, every, None),
        "PCA of log-normalised counts, every cell, permuted within replicates": (
            "X_pca",
            every,
            every,
            "replicate",
        ),
    }
    pseudo_labels = sorted(set(labels[is_pseudo]))
    lines = [
        "DistanceTest p-value of each pseudo-target against the controls (pseudo-target cells "
        "tested):",
        "",
        "| cells compared | " + " | ".join(pseudo_labels) + " |",
        "|---|" + "---|" * len(pseudo_labels),
    ]
    for name, (obsm_key, pseudo_part, control_part, strata_key) in comparisons.items():
        p_values = distance_p_values(
            data, obsm_key, is_pseudo & pseudo_part, is_control & control_part, strata_key
        )
        lines.append(f"| {name} | " + " | ".join(p_values[p] for p in pseudo_labels) + " |")
        print(lines[-1], flush=True)
    norms = np.linalg.norm(data.obsm["X_salient"], axis=1)
    lines += [
        "",
        "Mean norm of the salient latent:",
        "",
        "| cells | training | held-out |",
        "|---|---|---|",
    ]
    for name, cells in (("controls", is_control), ("pseudo-targets", is_pseudo)):
        lines.append(
            f"| {name} | {norms[cells & training].mean():.3f} | "
            f"{norms[cells & ~training].mean():.3f} |"
        )
    non_targeting = is_control | is_pseudo
    spread = pd.crosstab(data.obs["guide"][non_targeting], data.obs["replicate"][non_targeting])
    chi2 = stats.chi2_contingency(spread)
    lines += [
        "",
        "Non-targeting cells per guide and replicate (chi-squared test of independence: "
        f"p = {chi2.pvalue:.1g}):",
        "",
        "| guide | " + " | ".join(spread.columns.astype(str)) + " |",
        "|---|" + "---|" * spread.shape[1],
    ]
    lines += [
        f"| {guide} | " + " | ".join(str(n) for n in row) + " |" for guide, row in spread.iterrows()
    ]
    command = (
        "`.venv/bin/python benchmarks/papalexi_training_split.py"
        + (f" --model '{args.model}'" if json.loads(args.model) else "")
        + (f" --train '{args.train}'" if json.loads(args.train) else "")
        + (f" --seed {args.seed}" if args.seed else "")
        + f" --output {args.output}`"
    )
    header = (
        f"Bundled Papalexi 2021 THP-1 subset, {data.n_obs} labelled cells; pseudo-targets "
        f"{', '.join(PSEUDO_GUIDES)}; model seed {args.seed}, model arguments {args.model}, "
        f"further train arguments {args.train}, train_size 0.75, early stopping. Every "
        "pseudo-target is null: a small p-value is a false positive."
    )
    write_results(
        args.output, "Salient latent of training and held-out cells", command, header, lines
    )


if __name__ == "__main__":
    main()
