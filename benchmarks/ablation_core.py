"""ContrastiveVAE alone on the core benchmark's screen, with chosen model and training settings.

For ablations of the defaults: reports the core benchmark's program separation and leakage per
model seed, with the metrics of ``benchmark_core.py``, and how well the background latent
separates the programs (perturbation that leaked into it). One torch thread, so that two settings can
run side by side on 2 cores (about 5 minutes per seed each). Example:

    .venv/bin/python benchmarks/ablation_core.py --model '{"background_mmd_weight": 0}' \
        --train '{"lr": 0.001}'
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings

import numpy as np
import torch
from benchmark_core import fit_contrastive_vae, leakage, program_separation

import pertpy_contrastive as pc


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="{}", help="JSON of ContrastiveVAE arguments")
    parser.add_argument("--train", default="{}", help="JSON of ContrastiveVAE.train arguments")
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    adata = pc.datasets.simulate_screen(n_cells=10_000, n_genes=2_000, seed=0)
    separation = []
    for seed in args.model_seeds:
        model, _ = fit_contrastive_vae(
            adata, seed, args.epochs, json.loads(args.model), json.loads(args.train)
        )
        salient = model.get_latent_representation(kind="salient")
        background = model.get_latent_representation(kind="background")
        separation.append(program_separation(salient, adata.obs))
        print(
            {
                "seed": seed,
                "program_separation": separation[-1],
                **leakage(salient, adata.obs),
                # Perturbation that the background latent took up instead of the salient one.
                "program_separation_in_background": program_separation(background, adata.obs),
            },
            flush=True,
        )
    print(
        f"model {args.model}, train {args.train}: program separation "
        f"{np.mean(separation):.3f} ± {np.std(separation):.3f}"
    )


if __name__ == "__main__":
    main()
