"""The bundled Papalexi 2021 THP-1 subset: negative controls, real targets, leakage, responders.

Guides are assigned with pertpy's ``assign_to_max_guide`` (5 UMIs); the batch key is the
replicate. Two parts:

- ``calibration`` (per check seed): ``pc.tl.calibration_check`` trains the default model with
  half of the non-targeting guides relabelled as pseudo-targets (null by construction). Recorded:
  each pseudo-target's p-value in ``model.distance_test()`` (every cell against the contrast
  controls) and the same permuted within replicates; as the anchor that no training touches,
  pertpy's ``DistanceTest`` on a 10-PC PCA of log-normalised counts of the same cells against all
  remaining controls; the DE and responder checks; and the real targets' p-values.
- ``model`` (per model seed): the default model on the real labels, with ``write_outputs``:
  epochs trained, the replicate (15-NN balanced accuracy) and the log library size (15-NN R²)
  read from the salient latent of the perturbed cells, against scvi-tools' ContrastiveVI (200
  epochs) and PCA; the share of each IFN-γ pathway knockout's cells called KO, and the targets
  called.

Run by hand (about 5 minutes per seed on 2 cores):

    .venv/bin/python benchmarks/papalexi.py --part calibration --seeds 0 1 2
    .venv/bin/python benchmarks/papalexi.py --part model --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pertpy as pt
import scanpy as sc
import scvi
from _common import CONTROL, command_line, log_normalised, machine, quiet, save_records
from anndata import AnnData
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

import pertpy_contrastive as pc

BATCH = "replicate"
IFN_GAMMA_PATHWAY = ["IFNGR1", "IFNGR2", "JAK2", "STAT1", "IRF1"]
KEYS = ("part", "seed", "method", "label")


def load_papalexi():
    """The bundled subset with guides assigned and ``rna.obs['perturbation']`` written."""
    mdata = pc.datasets.papalexi2021_subset()
    pt.pp.GuideAssignment().assign_to_max_guide(mdata["gdo"], assignment_threshold=5)
    pc.pp.perturbation_labels(mdata, guide_key_added="guide")
    return mdata


def labelled_rna() -> AnnData:
    rna = load_papalexi()["rna"]
    return rna[rna.obs["perturbation"].notna()].copy()


def pca_anchor(rna, pseudo_labels) -> dict[str, float]:
    """PCA of log-normalised counts: each pseudo-target against the remaining controls."""
    normalised = log_normalised(rna)
    sc.pp.pca(normalised, n_comps=10)
    labels = rna.obs["perturbation"].astype(str).to_numpy().copy()
    relabelled = ("pseudo:" + rna.obs["guide"].astype(str)).to_numpy()
    is_pseudo = (labels == CONTROL) & np.isin(relabelled, pseudo_labels)
    labels[is_pseudo] = relabelled[is_pseudo]
    tested = labels == CONTROL
    tested |= is_pseudo
    cells = AnnData(
        obs=pd.DataFrame({"label": labels[tested]}, index=rna.obs_names[tested]),
        obsm={"pca": normalised.obsm["X_pca"][tested]},
    )
    table = pt.tl.DistanceTest("edistance", n_perms=1000, obsm_key="pca")(
        cells, groupby="label", contrast=CONTROL, show_progressbar=False
    )
    return table["pvalue"].reindex(pseudo_labels).to_dict()


def calibration(seed: int, args) -> dict:
    rna = labelled_rna()
    check = pc.tl.calibration_check(
        rna,
        guide_key="guide",
        control=CONTROL,
        batch_key=BATCH,
        model_kwargs=json.loads(args.model),
        train_kwargs=json.loads(args.train),
        seed=seed,
    )
    p_values = check.p_values
    distance = p_values[p_values["test"] != "differential_expression"]
    pseudo = {
        test: dict(zip(table["pseudo_target"], table["p_value"], strict=True))
        for test, table in distance.groupby("test")
    }
    summary = check.summary.set_index(["check", "level"])["observed"]
    return {
        "pseudo_target_p_values": pseudo,
        "pca_p_values": pca_anchor(rna, sorted(set(distance["pseudo_target"]))),
        "de_p_below": {
            str(level): float(summary[("differential_expression: p-values below level", level)])
            for level in (0.01, 0.05, 0.1)
        },
        "de_genes_pseudo_targets_with_any": float(
            summary[("DE genes at 5% FDR: pseudo-targets with any", 0.05)]
        ),
        "responders_pseudo_targets_with_any": float(
            summary[("responders: pseudo-target cells called KO", 0.0)]
        ),
        "target_p_values": check.targets["pvalue"].to_dict(),
        "target_p_values_within_batches": check.targets["pvalue_within_batches"].to_dict(),
    }


def technical_leakage(embedding, replicate, log_library) -> dict[str, float]:
    """15-NN replicate balanced accuracy and log-library R² (5-fold CV, shuffled folds)."""
    predicted = cross_val_predict(
        KNeighborsClassifier(15),
        embedding,
        replicate,
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
    )
    fitted = cross_val_predict(
        KNeighborsRegressor(15), embedding, log_library, cv=KFold(5, shuffle=True, random_state=0)
    )
    return {
        "replicate_accuracy": float(balanced_accuracy_score(replicate, predicted)),
        "library_r2": float(r2_score(log_library, fitted)),
    }


def trained_model(seed: int, args) -> dict:
    mdata = load_papalexi()
    pc.ContrastiveVAE.setup_anndata(
        mdata, perturbation_key="perturbation", control=CONTROL, batch_key=BATCH
    )
    model = pc.ContrastiveVAE(mdata, seed=seed, **json.loads(args.model))
    model.train(seed=seed, enable_progress_bar=False, **json.loads(args.train))
    rna = model.write_outputs(mdata)
    perturbed = (rna.obs["perturbation"].notna() & (rna.obs["perturbation"] != CONTROL)).to_numpy()
    log_library = np.log(np.asarray(rna.X.sum(1)).ravel())
    called = rna.obs["contrastive_class_global"].astype(str).to_numpy() == "KO"
    labels = rna.obs["perturbation"].astype(str).to_numpy()
    # 0.2 wrote no calls: its road was the held-out test.
    calls = rna.uns.get("contrastive_target_calls")
    if calls is None:
        calls = model.distance_test().drop(index=CONTROL)
    return {
        "epochs": model.epochs_trained,
        **technical_leakage(
            rna.obsm["X_contrastive_salient"][perturbed],
            rna.obs[BATCH].to_numpy()[perturbed],
            log_library[perturbed],
        ),
        "called_ko": {t: float(called[labels == t].mean()) for t in IFN_GAMMA_PATHWAY},
        "targets_called": sorted(calls.index[calls["pvalue"] < 0.05]),
        "target_p_values": calls["pvalue"].to_dict(),
    }


def contrastive_vi(seed: int) -> dict:
    rna = labelled_rna()
    data = AnnData(X=rna.X.copy(), obs=rna.obs[[BATCH, "perturbation"]].astype(str))
    scvi.settings.seed = seed
    scvi.external.ContrastiveVI.setup_anndata(data, batch_key=BATCH)
    model = scvi.external.ContrastiveVI(data, n_salient_latent=10, n_background_latent=10)
    is_control = (data.obs["perturbation"] == CONTROL).to_numpy()
    model.train(
        background_indices=np.flatnonzero(is_control).tolist(),
        target_indices=np.flatnonzero(~is_control).tolist(),
        max_epochs=200,
        early_stopping=False,
        enable_progress_bar=False,
    )
    salient = model.get_latent_representation(representation_kind="salient")
    log_library = np.log(np.asarray(data.X.sum(1)).ravel())
    return technical_leakage(
        salient[~is_control], data.obs[BATCH].to_numpy()[~is_control], log_library[~is_control]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["calibration", "model"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="{}", help="JSON of further ContrastiveVAE arguments")
    parser.add_argument("--train", default="{}", help="JSON of further train arguments")
    parser.add_argument("--label", default="defaults", help="name of this ContrastiveVAE run")
    parser.add_argument("--anchors", action="store_true", help="also ContrastiveVI (model part)")
    args = parser.parse_args()
    quiet()
    for seed in args.seeds:
        scores = (
            calibration(seed, args) if args.part == "calibration" else trained_model(seed, args)
        )
        records = [
            {
                "part": args.part,
                "seed": seed,
                "method": "ContrastiveVAE",
                "label": args.label,
                **scores,
            }
        ]
        if args.anchors and args.part == "model":
            records.append(
                {
                    "part": "model",
                    "seed": seed,
                    "method": "scvi-tools ContrastiveVI",
                    "label": "anchor",
                    **contrastive_vi(seed),
                }
            )
        for record in records:
            print(json.dumps(record, default=str), flush=True)
        save_records(
            "papalexi", [{**r, "command": command_line(), **machine()} for r in records], KEYS
        )


if __name__ == "__main__":
    main()
