"""Negative-control calibration on the Papalexi 2021 subset: non-targeting guides as null targets.

``pc.tl.calibration_check`` on the bundled THP-1 subset (guides assigned with pertpy's
``assign_to_max_guide``, 5 UMIs; batch key ``replicate``): half of the non-targeting guides
(drawn with ``--check-seeds``) become pseudo-targets and the default model is trained on them
with the real targets: default settings and early stopping, except ``train_size`` 0.75
(``--train-size``), which holds out a quarter of the cells for the held-out distance test. Every
significant distance, DE gene and responder on a pseudo-target is a false positive; the real
targets' held-out tests show what power is left. As an anchor that no training touches, the
same pseudo-targets are tested on a 10-PC PCA of log-normalised counts, every cell, with
pertpy's permutations and permuted within replicates: what it calls, the data itself sets
apart (the non-targeting guides' replicate shares differ). Reported per check: the observed rate
against its nominal level (mean over check seeds) and, for p-values, a Kolmogorov-Smirnov test
of uniformity of the pooled p-values. The QQ plot of the last seed is written beside the page.
``--model`` and ``--train`` pass JSON of further ContrastiveVAE and ``train`` arguments.
``--cross-fitting-folds K`` also tests the salient latent of every cell cross-fitted over K
folds (``pc.tl.cross_fitted_salient``, K more models per check seed), for the pseudo-targets and
the real targets.

Run by hand (about 10 minutes per check seed on 2 cores):

    .venv/bin/python benchmarks/papalexi_calibration.py
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pertpy as pt
import scanpy as sc
import torch
from benchmark_core import CONTROL, write_results
from scipy import stats

import pertpy_contrastive as pc

matplotlib.use("Agg")

IFN_GAMMA_PATHWAY = ["IFNGR1", "IFNGR2", "JAK2", "STAT1", "IRF1"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--train-size",
        type=float,
        default=0.75,
        help="Held-out share is 1 - train size: the cells of the held-out distance test.",
    )
    parser.add_argument(
        "--cross-fitting-folds",
        type=int,
        default=0,
        help="Also test the cross-fitted salient latent of every cell (pc.tl.cross_fitted_salient)",
    )
    parser.add_argument("--model", default="{}", help="JSON of ContrastiveVAE arguments")
    parser.add_argument(
        "--train", default="{}", help="JSON of further ContrastiveVAE.train arguments"
    )
    parser.add_argument(
        "--output", type=Path, default=Path("docs/benchmark_papalexi_calibration.md")
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    mdata = pc.datasets.papalexi2021_subset()
    pt.pp.GuideAssignment().assign_to_max_guide(mdata["gdo"], assignment_threshold=5)
    pc.pp.perturbation_labels(mdata, guide_key_added="guide")
    rna = mdata["rna"]
    rna = rna[rna.obs["perturbation"].notna()].copy()
    normalised = rna.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    sc.pp.pca(normalised, n_comps=10)
    checks, anchors = [], []
    for seed in args.check_seeds:
        check = pc.tl.calibration_check(
            rna,
            guide_key="guide",
            control=CONTROL,
            batch_key="replicate",
            model_kwargs=json.loads(args.model),
            train_kwargs={"train_size": args.train_size, **json.loads(args.train)},
            cross_fitting_folds=args.cross_fitting_folds,
            seed=seed,
        )
        print(check.summary.to_string(), flush=True)
        print(check.targets.loc[IFN_GAMMA_PATHWAY].to_string(), flush=True)
        checks.append(check)
        anchors.append(pca_anchor(normalised, sorted(set(check.p_values["pseudo_target"]))))
    figure_path = args.output.with_suffix(".qq.png")
    checks[-1].plot_qq(return_fig=True, save=figure_path)

    summaries = pd.concat([c.summary for c in checks] + [summarise(a) for a in anchors])
    table = summaries.groupby(["check", "level"], sort=False).agg(
        observed=("observed", "mean"), n=("n", "sum")
    )
    pooled = pd.concat([c.p_values for c in checks] + anchors)
    uniformity = {
        test: stats.kstest(values["p_value"], "uniform").pvalue
        for test, values in pooled.groupby("test")
    }
    lines = [
        "| check | nominal level | observed (mean over check seeds) | tests or cells (all seeds) "
        "| KS test of uniform p-values (pooled) |",
        "|---|---|---|---|---|",
    ]
    for (check_name, level), row in table.iterrows():
        test = check_name.split(":")[0]
        ks = f"{uniformity[test]:.2g}" if test in uniformity else "–"
        lines.append(
            f"| {check_name} | {level:g} | {row['observed']:.3f} | {int(row['n'])} | {ks} |"
        )
    lines += ["", *pseudo_target_table(args.check_seeds, checks, anchors)]
    pseudo = [
        f"seed {seed}: {', '.join(sorted(set(c.p_values['pseudo_target'])))}"
        for seed, c in zip(args.check_seeds, checks, strict=True)
    ]
    targets = pd.concat(
        {seed: c.targets for seed, c in zip(args.check_seeds, checks, strict=True)},
        names=["check seed", "target"],
    ).reset_index()
    called = targets.groupby("target").agg(
        held_out_cells=("n_cells", "mean"),
        significant=("pvalue", lambda p: int((p < 0.05).sum())),
        median_p=("pvalue", "median"),
        significant_within=("pvalue_within_batches", lambda p: int((p < 0.05).sum())),
        median_p_within=("pvalue_within_batches", "median"),
        **(
            {
                "significant_cross_fitted": (
                    "pvalue_cross_fitted",
                    lambda p: int((p < 0.05).sum()),
                ),
                "median_p_cross_fitted": ("pvalue_cross_fitted", "median"),
            }
            if args.cross_fitting_folds
            else {}
        ),
    )
    lines += [
        "",
        "Real targets in the same runs, held-out distance test (`model.distance_test()`): "
        f"check seeds with p < 0.05, of {len(checks)}; the IFN-γ pathway first.",
        "",
        "| target | held-out cells (mean) | significant | median p | significant, permuted "
        "within replicates | median p, within replicates |"
        + (
            " significant, cross-fitted, every cell | median p, cross-fitted |"
            if args.cross_fitting_folds
            else ""
        ),
        "|---|---|---|---|---|---|" + ("---|---|" if args.cross_fitting_folds else ""),
    ]
    order = IFN_GAMMA_PATHWAY + sorted(set(called.index) - set(IFN_GAMMA_PATHWAY))
    for target in order:
        row = called.loc[target]
        lines.append(
            f"| {target} | {row['held_out_cells']:.0f} | {int(row['significant'])} "
            f"| {row['median_p']:.3f} | {int(row['significant_within'])} "
            f"| {row['median_p_within']:.3f} |"
            + (
                f" {int(row['significant_cross_fitted'])} | {row['median_p_cross_fitted']:.3f} |"
                if args.cross_fitting_folds
                else ""
            )
        )
    lines += ["", f"QQ plot (seed {args.check_seeds[-1]}): ![QQ]({figure_path.name})"]
    command = (
        "`.venv/bin/python benchmarks/papalexi_calibration.py --check-seeds "
        f"{' '.join(map(str, args.check_seeds))} --train-size {args.train_size} "
        + (f"--model '{args.model}' " if json.loads(args.model) else "")
        + (f"--train '{args.train}' " if json.loads(args.train) else "")
        + (f"--cross-fitting-folds {args.cross_fitting_folds} " if args.cross_fitting_folds else "")
        + f"--output {args.output}`"
    )
    header = (
        f"Bundled Papalexi 2021 THP-1 subset, {rna.n_obs} labelled cells × {rna.n_vars} genes; "
        f"pseudo-targets: {'; '.join(pseudo)}. Default ContrastiveVAE, early stopping, "
        f"train_size={args.train_size}"
        + (f", model arguments {args.model}" if json.loads(args.model) else "")
        + (f", further train arguments {args.train}" if json.loads(args.train) else "")
        + "; "
        f"DistanceTest with 1,000 permutations. {torch.get_num_threads()} torch threads, CPU "
        f"only. Fraction of the {int(np.mean([len(c.responder_probability) for c in checks]))} "
        "pseudo-target cells per seed called KO is in the last row."
    )
    write_results(args.output, "Papalexi negative-control calibration", command, header, lines)


def pseudo_target_table(check_seeds, checks, anchors):
    """Markdown rows: each pseudo-target's p-value in every distance test, per check seed.

    Shows whether the model's every-cell calls are the pseudo-targets that PCA of the counts
    sets apart too (the data's) or others (the model's).
    """
    p_values = pd.concat(
        [
            pd.concat([check.p_values, anchor]).assign(check_seed=seed)
            for seed, check, anchor in zip(check_seeds, checks, anchors, strict=True)
        ]
    )
    p_values = p_values[p_values["test"] != "differential_expression"]
    wide = p_values.pivot_table(
        index=["check_seed", "pseudo_target"], columns="test", values="p_value", sort=False
    )
    lines = [
        "Each pseudo-target's p-value in each distance test (below 0.05 in bold).",
        "",
        "| check seed | pseudo-target | " + " | ".join(wide.columns) + " |",
        "|---|---|" + "---|" * len(wide.columns),
    ]
    for (seed, pseudo_target), row in wide.iterrows():
        cells = [f"**{p:.3f}**" if p < 0.05 else f"{p:.3f}" for p in row]
        lines.append(f"| {seed} | {pseudo_target} | " + " | ".join(cells) + " |")
    return lines


def summarise(p_values, levels=(0.01, 0.05, 0.1)):
    """One check seed's rows in ``CalibrationCheck.summary``'s form: the rate below each level."""
    return pd.DataFrame(
        [
            {
                "check": f"{test}: p-values below level",
                "level": level,
                "observed": float((table["p_value"] < level).mean()),
                "n": len(table),
            }
            for test, table in p_values.groupby("test", sort=False)
            for level in levels
        ]
    )


def pca_anchor(normalised, pseudo_labels):
    """DistanceTest p-values of the pseudo-targets on the PCA of log-normalised counts."""
    labels = normalised.obs["perturbation"].astype(str).to_numpy().copy()
    is_control = labels == CONTROL
    relabelled = ("pseudo:" + normalised.obs["guide"].astype(str)).to_numpy()
    is_pseudo = is_control & np.isin(relabelled, pseudo_labels)
    labels[is_pseudo] = relabelled[is_pseudo]
    tested = normalised[is_control].copy()
    tested.obs["perturbation"] = labels[is_control]
    tests = {
        "PCA of log-normalised counts (anchor), every cell": pt.tl.DistanceTest(
            "edistance", n_perms=1000, obsm_key="X_pca"
        )(tested, groupby="perturbation", contrast=CONTROL, show_progressbar=False),
        "PCA of log-normalised counts (anchor), every cell, within batches": (
            pc.tl.distance_test(
                tested,
                groupby="perturbation",
                contrast=CONTROL,
                obsm_key="X_pca",
                strata_key="replicate",
            )
        ),
    }
    return pd.concat(
        pd.DataFrame(
            {
                "test": test,
                "pseudo_target": pseudo_labels,
                "p_value": table["pvalue"].reindex(pseudo_labels).to_numpy(dtype=float),
            }
        )
        for test, table in tests.items()
    )


if __name__ == "__main__":
    main()
