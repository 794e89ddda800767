"""Diagnostics of the responder variable on one simulated screen and one model seed.

Trains ContrastiveVAE with ``responder=True`` (plus any ``--model`` / ``--train`` options, as
JSON) on a screen of ``benchmark_responders.SCREENS`` and prints:

- the responder AUROC of P(perturbed) (the responder mixture on this model's background)
  against the simulator's true responders (all targeting cells, effect targets' cells) and the
  calling AUROC by salient E-distance;
- the mean salient norm of controls, escapers and responders (training / held-out cells);
- per target: its program, the learned responder fraction pi_t, the true responder fraction and
  the norm of the learned salient centre mu_t;
- how well a 15-NN classifier (5-fold CV, AUROC) tells effect targets' responders from their
  escapers in the background and in the salient latent: whether the information is in the
  latents even when the responder posterior misses it.

Run by hand (about 8 minutes on 2 cores at 10,000 cells × 2,000 genes), for example:

    .venv/bin/python benchmarks/responder_diagnostics.py core --model '{"salient_effect": "additive"}'
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings

import numpy as np
from benchmark_calling_de import calling_auroc
from benchmark_core import CONTROL, fit_contrastive_vae
from benchmark_responders import SCREENS, latent_norms, responder_aurocs
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.neighbors import KNeighborsClassifier

import pertpy_contrastive as pc


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("screen", choices=list(SCREENS))
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--model", type=json.loads, default={}, help="ContrastiveVAE options")
    parser.add_argument("--train", type=json.loads, default={}, help="train options")
    parser.add_argument("--seed", type=int, default=0, help="model seed")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    adata = pc.datasets.simulate_screen(
        n_cells=args.cells, n_genes=args.genes, seed=0, **SCREENS[args.screen]
    )
    programs = adata.uns["simulation"]["target_program"]
    effect_targets = {t for t, p in programs.items() if p != "none"}
    model, seconds_per_epoch = fit_contrastive_vae(
        adata, args.seed, args.epochs, {"responder": True, **args.model}, args.train
    )
    probability = model.get_responder_probability()
    salient = model.get_latent_representation(kind="salient")
    print(f"seconds per epoch: {seconds_per_epoch:.1f}")
    print("responder AUROC:", responder_aurocs(adata.obs, probability))
    print(f"calling AUROC: {calling_auroc(adata, salient, effect_targets):.3f}")
    norms = latent_norms(model, adata.obs, salient)
    print("salient norm, training / held-out:", {k: np.round(v, 2) for k, v in norms.items()})

    module = model.module
    labels = model.adata_manager.get_state_registry("contrastive_target")["target_labels"]
    fraction = expit(module.responder_logits.detach().cpu().numpy())
    centre = module.target_salient_loc.detach().norm(dim=1).cpu().numpy()
    truth = adata.obs.groupby("perturbation", observed=True)["responder"].mean()
    print("target  program  pi_t  true fraction  |mu_t|")
    for label, pi, norm in zip(labels, fraction, centre, strict=True):
        print(f"{label:7s} {programs[label]:8s} {pi:.2f}  {truth[label]:.2f}           {norm:.2f}")

    obs = adata.obs
    effect = ((obs["perturbation"] != CONTROL) & (obs["program"] != "none")).to_numpy()
    responded = obs["responder"].to_numpy()[effect]
    for kind in ("background", "salient"):
        latent = model.get_latent_representation(kind=kind)[effect]
        score = cross_val_predict(
            KNeighborsClassifier(15), latent, responded, cv=5, method="predict_proba"
        )[:, 1]
        print(
            f"responders vs escapers by 15-NN on the {kind} latent: AUROC "
            f"{roc_auc_score(responded, score):.3f}"
        )


if __name__ == "__main__":
    main()
