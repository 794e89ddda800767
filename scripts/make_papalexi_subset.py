"""Build the bundled Papalexi 2021 subset from ../shared/data/papalexi2021_thp1_subset.h5mu.

Source: Papalexi et al. 2021, Nature Genetics 53:322-331 (GEO GSE153056), as distributed by the
sceptredata R package (MIT licence). Cells are subsampled per assigned target (pertpy's
assign_to_max_guide, threshold 5) so that controls and every target stay represented; the
counts, guides, genes and obs are unchanged.

Usage: python scripts/make_papalexi_subset.py [SOURCE.h5mu]
"""

import sys
from pathlib import Path

import mudata as md
import numpy as np
import pertpy as pt

SOURCE = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/papalexi2021_thp1_subset.h5mu")
DESTINATION = Path("src/pertpy_contrastive/datasets/data/papalexi2021_thp1_small.h5mu")
N_CONTROLS = 1200
N_PER_TARGET = 200
SEED = 0

mdata = md.read_h5mu(SOURCE)
guides = mdata["gdo"].copy()
pt.pp.GuideAssignment().assign_to_max_guide(guides, assignment_threshold=5)
target = guides.obs["assigned_guide"].map(guides.var["target_gene"].to_dict()).astype(object)
rng = np.random.default_rng(SEED)
keep = []
for label, cells in target.groupby(target, dropna=True).groups.items():
    n_keep = N_CONTROLS if label == "non-targeting" else N_PER_TARGET
    keep.extend(rng.choice(np.asarray(cells), size=min(n_keep, len(cells)), replace=False))
keep = [name for name in mdata.obs_names if name in set(keep)]
subset = mdata[keep].copy()
subset.uns["source"] = (
    "Papalexi et al. 2021, Nature Genetics 53:322-331 (GEO GSE153056); subset of the "
    "sceptredata R package's lowmoi_example_data (MIT licence), subsampled by "
    "scripts/make_papalexi_subset.py"
)
DESTINATION.parent.mkdir(parents=True, exist_ok=True)
subset.write_h5mu(DESTINATION, compression="gzip")
print(f"{subset.n_obs} cells -> {DESTINATION} ({DESTINATION.stat().st_size / 1e6:.2f} MB)")
