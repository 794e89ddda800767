# %% [markdown]
# # Quick start: removing the background of a CRISPR screen
#
# This tutorial is a script in jupytext "percent" format: run it with
# `.venv/bin/python tutorials/01_quickstart.py`, or open it as a notebook with jupytext.
# It takes a few minutes on a laptop CPU and downloads nothing.
#
# 1. A simulated screen with known truth: in PCA, controls and perturbed cells mix. The salient
#    latent separates the perturbation programs and leaves the cell cycle, subclones and stress
#    out.
# 2. The bundled Papalexi 2021 THP-1 screen: guides assigned with pertpy, the model trained
#    within replicates, and the targets ranked by how far their cells move in the salient space.

# %%
import logging
import warnings

import numpy as np
import pandas as pd
import pertpy as pt
import scanpy as sc
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import pertpy_contrastive as pc

warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def knn_accuracy(embedding, labels):
    """5-fold cross-validated accuracy of a 15-nearest-neighbour classifier."""
    return cross_val_score(KNeighborsClassifier(15), embedding, labels, cv=5).mean()


# %% [markdown]
# ## 1. A simulated screen
#
# `simulate_screen` draws a heterogeneous cell line (cell cycle, three subclones, a stress
# state, two batches) and twelve targets. Nine of them drive one of three gene programs; three
# have no effect. About 30% of perturbed cells escape the knockout.

# %%
adata = pc.datasets.simulate_screen(n_cells=4_000, n_genes=1_000, seed=0)
responders = adata.obs["responder"].to_numpy()

pca = adata.copy()
sc.pp.normalize_total(pca, target_sum=1e4)
sc.pp.log1p(pca)
sc.pp.pca(pca, n_comps=10)
print(
    "PCA: subclone predicted from the embedding (accuracy):",
    round(knn_accuracy(pca.obsm["X_pca"], adata.obs["subclone"]), 3),
)

# %% [markdown]
# Register the counts, name the control label and the batch, and train. Each step contrasts
# controls and perturbed cells of the same batch.

# %%
pc.ContrastiveVAE.setup_anndata(
    adata, perturbation_key="perturbation", control="non-targeting", batch_key="batch"
)
model = pc.ContrastiveVAE(adata, n_salient=10, n_background=10)
model.train(max_epochs=60, enable_progress_bar=False)
salient = model.get_latent_representation(kind="salient")
background = model.get_latent_representation(kind="background")

# %% [markdown]
# The salient space should know the program of responding cells but not the subclone. The
# background space should be the other way round.

# %%
summary = pd.DataFrame(
    {
        "program of responders": [
            knn_accuracy(e[responders], adata.obs["program"][responders])
            for e in (pca.obsm["X_pca"], salient, background)
        ],
        "subclone": [
            knn_accuracy(e, adata.obs["subclone"]) for e in (pca.obsm["X_pca"], salient, background)
        ],
    },
    index=["PCA", "salient", "background"],
).round(3)
print(summary)

# %% [markdown]
# ## 2. The Papalexi 2021 THP-1 screen
#
# The bundled subset has the `rna` and `gdo` (guide counts) modalities. pertpy assigns each
# cell its strongest guide (at least 5 UMIs). `pc.pp.perturbation_labels` maps the guide to its
# target through `var['target_gene']`; cells without a guide stay unlabelled, which excludes them
# from training.

# %%
mdata = pc.datasets.papalexi2021_subset()
pt.pp.GuideAssignment().assign_to_max_guide(mdata["gdo"], assignment_threshold=5)
pc.pp.perturbation_labels(mdata)  # writes mdata["rna"].obs["perturbation"]

pc.ContrastiveVAE.setup_anndata(
    mdata, perturbation_key="perturbation", control="non-targeting", batch_key="replicate"
)
papalexi = pc.ContrastiveVAE(mdata)
papalexi.train(max_epochs=150, enable_progress_bar=False)
rna = mdata["rna"]
rna.obsm["X_salient"] = papalexi.get_latent_representation(mdata)

# %% [markdown]
# Rank the targets by their cells' mean salient norm, relative to the controls. The IFN-γ
# pathway (IFNGR1, IFNGR2, JAK2, STAT1) and IRF1 have the strongest known effects in this
# screen.

# %%
norm = pd.Series(np.linalg.norm(rna.obsm["X_salient"], axis=1), index=rna.obs_names)
by_target = norm.groupby(rna.obs["perturbation"]).mean()
print((by_target / by_target["non-targeting"]).sort_values(ascending=False).round(2).head(10))
