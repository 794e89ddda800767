"""How far the salient latent of controls, escapers and responders lies from 0, in and out of training.

On the calling benchmark's screen (24 targets, 8 null, program log fold change 0.4), trains
ContrastiveVAE with its defaults (60 epochs) and prints the mean norm of the salient posterior
mean for each kind of cell, split into training and validation cells. Escapers express like
controls, so in a calibrated model the two have the same norm. Also prints the calling AUROC of
``benchmark_calling_de.py`` (effect against null targets, by E-distance to the controls) on the
salient and the response latent, the responder AUROC of ``benchmark_responders.py``, and
``benchmark_core.py``'s program separation and background leakage of both latents. With
``salient_cross_fitting``, also how far the two salient encoders agree: on held-out cells
(which neither trained on) the distance between their reads relative to the read's norm, and the
program separation of each encoder's read of every cell beside that of the output, which mixes
the two, and the norms of each cell's read by the encoder that trains on it (the one the
training step uses). One torch thread, so that two settings can run side by side. Run by hand (about 5 minutes alone):

    .venv/bin/python benchmarks/salient_calibration.py
    .venv/bin/python benchmarks/salient_calibration.py --train '{"n_epochs_responder_refinement": 20}'
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings

import numpy as np
import torch
from benchmark_calling_de import calling_auroc
from benchmark_core import fit_contrastive_vae, leakage, program_separation
from benchmark_responders import SCREENS, latent_norms, responder_aurocs

import pertpy_contrastive as pc
from pertpy_contrastive._responders import response_latent


@torch.inference_mode()
def salient_reads(model) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's salient mean as output (parity k: encoder k) and by the other encoder."""
    module = model.module.eval()
    output, other = [], []
    for tensors in model._make_data_loader(adata=model.adata, batch_size=1024):
        inputs, _ = module._get_fn_args_from_batch(tensors)
        output.append(module.encode(*inputs.encoder_inputs)["salient"][0].cpu().numpy())
        other.append(
            module.encode(*inputs.encoder_inputs, fitting=True)["salient"][0].cpu().numpy()
        )
    return np.concatenate(output), np.concatenate(other)


def encoder_agreement(model, obs) -> None:
    """Print how far the two cross-fitted salient encoders agree."""
    output, other = salient_reads(model)
    totals = np.asarray(model.adata_manager.get_from_registry("X").sum(1)).reshape(-1, 1)
    parity = model.module.cross_fitting_half(torch.as_tensor(totals)).numpy()
    held_out = np.ones(len(obs), dtype=bool)
    held_out[model.train_indices] = False
    gap = np.linalg.norm(output - other, axis=1) / np.linalg.norm(output, axis=1).clip(1e-8)
    print(
        f"  encoders' disagreement on held-out cells (median relative distance): "
        f"{np.median(gap[held_out]):.2f}"
    )
    for kind, (training, held) in latent_norms(model, obs, other).items():
        print(
            f"  {kind}, read by the encoder that trains on them: training cells {training:.2f}, "
            f"validation cells {held:.2f}"
        )
    for k in (0, 1):
        single = np.where((parity == k)[:, None], output, other)
        print(
            f"  program separation of encoder {k}'s read of every cell: "
            f"{program_separation(single, obs):.3f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="{}", help="JSON of ContrastiveVAE arguments")
    parser.add_argument("--train", default="{}", help="JSON of ContrastiveVAE.train arguments")
    parser.add_argument("--screen", default="calling", choices=list(SCREENS))
    parser.add_argument("--seed", type=int, default=0, help="model seed")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    adata = pc.datasets.simulate_screen(
        n_cells=10_000, n_genes=2_000, seed=0, **SCREENS[args.screen]
    )
    model, _ = fit_contrastive_vae(
        adata, args.seed, 60, json.loads(args.model), json.loads(args.train)
    )
    salient = model.get_latent_representation(kind="salient")
    obs = adata.obs
    print(
        f"{args.screen} screen, seed {args.seed}, model {args.model}, train {args.train}: "
        "mean norm of the salient latent"
    )
    for kind, (training, held_out) in latent_norms(model, obs, salient).items():
        print(f"  {kind}: training cells {training:.2f}, validation cells {held_out:.2f}")
    programs = adata.uns["simulation"]["target_program"]
    effect_targets = {t for t, p in programs.items() if p != "none"}
    probability = model.get_responder_probability()
    response = response_latent(salient, probability)
    print(
        f"  calling AUROC: salient {calling_auroc(adata, salient, effect_targets):.3f}, "
        f"response {calling_auroc(adata, response, effect_targets):.3f}"
    )
    aurocs = responder_aurocs(adata.obs, probability)
    print("  responder AUROC: " + ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items()))
    if model.module.salient_cross_fitting:
        encoder_agreement(model, obs)
    for name, latent in (("salient", salient), ("response", response)):
        background = {k: round(v, 3) for k, v in leakage(latent, obs).items()}
        print(
            f"  {name} latent: program separation {program_separation(latent, obs):.3f}, "
            f"background leakage {background}"
        )


if __name__ == "__main__":
    main()
