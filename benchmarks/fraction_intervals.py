"""Coverage of the responder-fraction intervals, now and with the cells' spread alone.

For each screen of ``benchmark_responders.py``, loads a model saved in ``--models/<screen>``
(trained and saved there first if missing: screen seed 0, model seed 0, 60 epochs, the
responder benchmark's settings) and scores ``get_responder_fractions`` against the simulated
responders of the effect targets: how often the 95% interval covers the true fraction, and the
mean absolute error of the fraction. The same is printed for the interval used until
2026-12-02, the spread of the cells' probabilities ``Beta(1 + sum p, 1 + sum (1 - p))``, around
the same estimates. Rescoring a saved model takes about a minute; training one about 8 minutes
alone. Run by hand:

    .venv/bin/python benchmarks/fraction_intervals.py --screens calling core
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import pandas as pd
from benchmark_core import fit_contrastive_vae
from benchmark_responders import SCREENS, fraction_accuracy
from scipy import stats

import pertpy_contrastive as pc


def cells_spread_interval(fractions: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """The same table with the interval of the cells' probabilities alone (the old interval)."""
    responded = fractions["responder_fraction"] * (fractions["n_cells"] + 2) - 1
    spread = stats.beta(1 + responded, 1 + fractions["n_cells"] - responded)
    old = fractions.copy()
    old["ci_low"], old["ci_high"] = spread.interval(level)
    return old


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screens", nargs="+", default=["calling", "core"], choices=list(SCREENS))
    parser.add_argument("--models", type=Path, default=Path("benchmarks/saved_models"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for screen in args.screens:
        path = args.models / screen
        if not path.is_dir():
            adata = pc.datasets.simulate_screen(
                n_cells=10_000, n_genes=2_000, seed=0, **SCREENS[screen]
            )
            model, _ = fit_contrastive_vae(adata, 0, 60)
            model.save(path, save_anndata=True)
        model = pc.ContrastiveVAE.load(path)
        fractions = model.get_responder_fractions()
        programs = model.adata.uns["simulation"]["target_program"]
        truth = model.adata.obs.groupby("perturbation", observed=True)["responder"].mean()
        for name, table in (
            ("interval now", fractions),
            ("cells' spread alone", cells_spread_interval(fractions)),
        ):
            coverage, error = fraction_accuracy(model.adata, table)
            print(f"{screen}, {name}: coverage {coverage:.4f}, mean absolute error {error:.4f}")
        fractions["true fraction"] = truth.reindex(fractions.index)
        fractions["program"] = [programs[target] for target in fractions.index]
        print(fractions.round(3).to_string(), flush=True)


if __name__ == "__main__":
    main()
