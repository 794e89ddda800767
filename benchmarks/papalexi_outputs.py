"""Papalexi 2021 subset: salient E-distances and DE on the denoised layer vs log-normalised counts.

Reproduces the numbers in docs/outputs.md (about a minute on 2 cores):
    .venv/bin/python benchmarks/papalexi_outputs.py
"""

import logging
import warnings

import numpy as np
import pertpy as pt

import pertpy_contrastive as pc

CONTROL = "non-targeting"
TARGETS = ["IFNGR1", "IFNGR2", "JAK2", "STAT1", "CD86", "MYC", "SMAD4", "ATF2"]


def main():
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    mdata = pc.datasets.papalexi2021_subset()
    pt.pp.GuideAssignment().assign_to_max_guide(mdata["gdo"], assignment_threshold=5)
    pc.pp.perturbation_labels(mdata)
    pc.ContrastiveVAE.setup_anndata(
        mdata, perturbation_key="perturbation", control=CONTROL, batch_key="replicate"
    )
    model = pc.ContrastiveVAE(mdata)
    model.train(max_epochs=100, enable_progress_bar=False)
    rna = model.write_outputs(mdata)

    subset = rna[rna.obs["perturbation"].isin([CONTROL, *TARGETS])].copy()
    subset.obs["perturbation"] = subset.obs["perturbation"].astype(str)
    table = pt.tl.DistanceTest("edistance", n_perms=1000, obsm_key="X_contrastive_salient")(
        subset, groupby="perturbation", contrast=CONTROL, show_progressbar=False
    )
    print("E-distance test on the salient latent (1,000 permutations, Holm-Sidak):")
    print(table.drop(CONTROL)[["distance", "pvalue_adj"]].sort_values("distance").round(3))

    pair = subset[subset.obs["perturbation"].isin([CONTROL, "STAT1"])].copy()
    counts = pair.X.toarray()
    pair.layers["log_normalised"] = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    pair.layers["log_denoised"] = np.log1p(pair.layers["contrastive_denoised"])
    print("\nWilcoxon, STAT1 knockouts against controls:")
    for layer in ("log_normalised", "log_denoised"):
        result = pt.tl.WilcoxonTest.compare_groups(
            pair, column="perturbation", baseline=CONTROL, groups_to_compare=["STAT1"], layer=layer
        ).set_index("variable")
        stat1 = result.loc["STAT1"]
        print(
            f"  {layer}: {int((result['adj_p_value'] < 0.05).sum())}/{len(result)} genes at adj. "
            f"p < 0.05; STAT1 gene log_fc {stat1['log_fc']:.2f}, rank by fold change "
            f"{int((result['log_fc'] < stat1['log_fc']).sum()) + 1}, rank by p-value "
            f"{int((result['p_value'] < stat1['p_value']).sum()) + 1}"
        )


if __name__ == "__main__":
    main()
