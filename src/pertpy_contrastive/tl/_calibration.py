"""A negative-control calibration check, in the spirit of SCEPTRE's: null pseudo-targets.

Some control guides are relabelled as pseudo-targets and the model is trained on them as on any
perturbation. They are null by construction (the same non-targeting biology as the controls),
so every significant distance, every responder and every DE gene found for them is a false
positive. The observed rates, against the nominal levels, show whether the screen's p-values,
FDRs and calls can be trusted before anyone reads its real targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pertpy as pt
from anndata import AnnData
from scipy import stats

from .._constants import DE_DELTA, DE_FDR_TARGET, CellGroup
from .._expression import check_finite_latent
from .._model import ContrastiveVAE
from .._responders import response_latent
from ..pl._plots import finish_figure
from ._cross_fitting import (
    CROSS_FITTED_SALIENT_KEY,
    cross_fitted_salient,
    distance_test_within_folds,
)
from ._distance import distance_test

PSEUDO_PREFIX = "pseudo:"


@dataclass(frozen=True)
class CalibrationCheck:
    """Result of :func:`calibration_check`."""

    summary: pd.DataFrame
    """One row per check and level: ``check``, ``level``, ``observed``, ``n``, ``ks_p_value``."""
    p_values: pd.DataFrame
    """Every p-value of the pseudo-targets: ``test``, ``pseudo_target``, ``gene``, ``p_value``."""
    responder_probability: pd.Series
    """P(perturbed) of each pseudo-target cell, indexed by cell."""
    targets: pd.DataFrame
    """The real targets' held-out distance test (:meth:`ContrastiveVAE.distance_test`), to
    check that they are still found; empty with ``keep_targets=False``. With a ``batch_key``,
    ``pvalue_within_batches`` is the same test with the labels permuted within batches; with
    ``cross_fitting_folds``, ``pvalue_cross_fitted`` is the cross-fitted test within folds."""

    def plot_qq(self, *, return_fig: bool = False, save: str | None = None):
        """QQ plot of the pseudo-targets' p-values against the uniform, one line per test.

        Points on the diagonal mean calibrated p-values; points above it (smaller observed than
        expected p-values), false positives.

        Parameters
        ----------
        return_fig
            Return the figure instead of showing it.
        save
            Path to save the figure to.
        """
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(4.5, 4.5))
        for test, table in self.p_values.groupby("test"):
            observed = np.sort(table["p_value"].to_numpy())
            expected = (np.arange(1, len(observed) + 1) - 0.5) / len(observed)
            axis.plot(
                -np.log10(expected),
                -np.log10(np.clip(observed, 1e-300, None)),
                marker="o" if len(observed) < 50 else None,
                markersize=4,
                label=f"{test} (n={len(observed)})",
            )
        limit = axis.get_xlim()[1]
        axis.plot([0, limit], [0, limit], color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel("expected −log10 p (uniform)")
        axis.set_ylabel("observed −log10 p")
        axis.set_title("Negative-control pseudo-targets")
        axis.legend(fontsize="small")
        figure.tight_layout()
        return finish_figure(figure, return_fig=return_fig, save=save)


def calibration_check(
    adata: AnnData,
    *,
    guide_key: str,
    perturbation_key: str = "perturbation",
    control: str = "non-targeting",
    n_pseudo_targets: int | None = None,
    keep_targets: bool = True,
    batch_key: str | None = None,
    layer: str | None = None,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    levels: tuple[float, ...] = (0.01, 0.05, 0.1),
    n_perms: int = 1000,
    cross_fitting_folds: int = 0,
    seed: int = 0,
) -> CalibrationCheck:
    """Train on control guides relabelled as pseudo-targets and count what is found in them.

    The cells of ``n_pseudo_targets`` control guides (drawn with ``seed``) get the label
    ``"pseudo:<guide>"``; the other control guides stay controls. A
    :class:`~pertpy_contrastive.ContrastiveVAE` is set up and trained on a copy (``adata`` is
    not changed), then the whole pipeline runs on the pseudo-targets:

    - ``"distance_test, held-out cells"``:
      :meth:`~pertpy_contrastive.ContrastiveVAE.distance_test`, the E-distance permutation test
      on the salient latent of the validation cells, the test to call targets with;
    - ``"DistanceTest, salient latent"``: ``pt.tl.DistanceTest("edistance")`` on the salient
      latent of every cell, training cells included, for reference: the encoder fitted those
      cells, so this one is not calibrated;
    - ``"distance_test, response latent"``: :func:`~pertpy_contrastive.tl.distance_test` on
      the response latent (``get_latent_representation(kind="response")``);
    - with a ``batch_key``, the held-out and the every-cell salient tests again with the labels
      permuted within batches (``strata_key``; ``"... within batches"``), since control guides
      can be spread over the batches unequally;
    - with ``cross_fitting_folds``, ``"DistanceTest, cross-fitted salient latent"``:
      ``pt.tl.DistanceTest("edistance")`` on every cell's salient latent from
      :func:`~pertpy_contrastive.tl.cross_fitted_salient`, each cell read by a model that did
      not train on it, and ``"distance_test, cross-fitted salient latent, within folds"``, the
      same with the labels permuted within folds (and batches, with a ``batch_key``);
    - ``"differential_expression"``: the Wald p-values of
      :meth:`~pertpy_contrastive.ContrastiveVAE.differential_expression` with every cell
      counting (``responders_only=False``);
    - ``"DE genes at 5% FDR"``: the fraction of pseudo-targets with any gene flagged
      ``is_de_fdr_0.05`` by the default (responder-weighted) DE;
    - ``"responders"``: the fraction of pseudo-targets with any cell called KO
      (P(perturbed) > 0.5), and the fraction of their cells called.

    For the p-value tests, ``observed`` is the fraction of p-values below each level (the
    false-positive rate, to compare with ``level``), and ``ks_p_value`` a Kolmogorov-Smirnov
    test of uniformity. For the others, ``level`` is the nominal rate they are built to hold.

    Parameters
    ----------
    adata
        Raw counts with perturbation labels and guides (e.g. ``mdata["rna"]`` after
        ``pc.pp.perturbation_labels(mdata, guide_key_added="guide")``).
    guide_key
        obs column of each cell's guide.
    perturbation_key, control
        obs column of the labels, and the control label.
    n_pseudo_targets
        Control guides turned into pseudo-targets; default half of them. At least one control
        guide must stay a control.
    keep_targets
        Train with the real targets too, as the screen itself is trained; otherwise only on
        the control cells (faster).
    batch_key, layer
        Passed to :meth:`~pertpy_contrastive.ContrastiveVAE.setup_anndata`.
    model_kwargs, train_kwargs
        Passed to the model and to ``train``.
    levels
        Nominal levels of the p-value checks.
    n_perms
        Permutations of ``DistanceTest``.
    cross_fitting_folds
        Folds of the cross-fitted salient latent to test too (``n_folds`` of
        :func:`~pertpy_contrastive.tl.cross_fitted_salient`, one more model trained per fold,
        with ``model_kwargs`` and ``train_kwargs``); ``0`` (the default) skips it.
    seed
        Seed of the choice of pseudo-target guides.

    Returns
    -------
    The summary table, every p-value, the pseudo-targets' responder probabilities, the real
    targets' held-out distance test (and their cross-fitted one), and
    :meth:`CalibrationCheck.plot_qq`.
    """
    for key in (guide_key, perturbation_key):
        if key not in adata.obs:
            raise KeyError(
                f"obs[{key!r}] is missing. Pass the obs columns of the guides (guide_key=) and "
                "the perturbation labels (perturbation_key=), e.g. from "
                "pc.pp.perturbation_labels(mdata, guide_key_added='guide')."
            )
    is_control = (adata.obs[perturbation_key] == control).to_numpy()
    control_guides = sorted(adata.obs.loc[is_control, guide_key].dropna().astype(str).unique())
    if n_pseudo_targets is None:
        n_pseudo_targets = max(1, len(control_guides) // 2)
    if not 1 <= n_pseudo_targets < len(control_guides):
        raise ValueError(
            f"The controls have {len(control_guides)} guides ({control_guides}), so "
            f"n_pseudo_targets={n_pseudo_targets} leaves no control or makes no pseudo-target. "
            "Pass 1 <= n_pseudo_targets < the number of control guides."
        )
    rng = np.random.default_rng(seed)
    pseudo_guides = sorted(rng.choice(control_guides, n_pseudo_targets, replace=False))
    guides = adata.obs[guide_key].astype(str).to_numpy()
    labels = adata.obs[perturbation_key].astype(object).to_numpy().copy()
    is_pseudo = is_control & np.isin(guides, pseudo_guides)
    labels[is_pseudo] = PSEUDO_PREFIX + guides[is_pseudo]
    cells = np.ones(adata.n_obs, bool) if keep_targets else is_control
    counts = adata.X if layer is None else adata.layers[layer]
    data = AnnData(
        X=counts[cells],
        obs=adata.obs.loc[cells, [c for c in (batch_key,) if c is not None]].copy(),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )
    data.obs[perturbation_key] = pd.Categorical(labels[cells])
    ContrastiveVAE.setup_anndata(
        data, perturbation_key=perturbation_key, control=control, batch_key=batch_key
    )
    model = ContrastiveVAE(data, **(model_kwargs or {}))
    model.train(**{"enable_progress_bar": False, **(train_kwargs or {})})

    pseudo_labels = [PSEUDO_PREFIX + guide for guide in pseudo_guides]
    # One encoding pass and one decoding of the background serve the salient latent, the
    # responder calls and both DE tests (as in write_outputs).
    posterior_means = model._posterior_means(data, None)
    checked, cells = model._calibrated_background(data, "rna", posterior_means=posterior_means)
    probability = model._responder_evidence(checked, cells).probability
    salient = posterior_means["s"].cpu().numpy()
    check_finite_latent(salient)
    data.obsm["X_salient"] = salient
    data.obsm["X_response"] = response_latent(salient, probability)
    if cross_fitting_folds:
        cross_fitted_salient(
            data,
            n_folds=cross_fitting_folds,
            model_kwargs=model_kwargs,
            train_kwargs=train_kwargs,
            seed=seed,
        )
    tested = data[data.obs[perturbation_key].isin([control, *pseudo_labels])].copy()
    tested.obs[perturbation_key] = tested.obs[perturbation_key].astype(str)
    held_out = model.distance_test(n_perms=n_perms)
    is_target = ~held_out.index.isin([control, *pseudo_labels])
    within_batches = {}
    if batch_key is not None:
        within_batches = {
            "distance_test, held-out cells, within batches": model.distance_test(
                n_perms=n_perms, strata_key=batch_key
            ),
            "DistanceTest, salient latent, within batches": distance_test(
                tested,
                groupby=perturbation_key,
                contrast=control,
                obsm_key="X_salient",
                n_perms=n_perms,
                strata_key=batch_key,
            ),
        }
    distance_p_values = {
        "distance_test, held-out cells": held_out,
        "DistanceTest, salient latent": pt.tl.DistanceTest(
            "edistance", n_perms=n_perms, obsm_key="X_salient"
        )(tested, groupby=perturbation_key, contrast=control, show_progressbar=False),
        "distance_test, response latent": distance_test(
            tested,
            groupby=perturbation_key,
            contrast=control,
            obsm_key="X_response",
            n_perms=n_perms,
        ),
        **within_batches,
    }
    cross_fitted_targets = None
    if cross_fitting_folds:
        distance_p_values["DistanceTest, cross-fitted salient latent"] = pt.tl.DistanceTest(
            "edistance", n_perms=n_perms, obsm_key=CROSS_FITTED_SALIENT_KEY
        )(tested, groupby=perturbation_key, contrast=control, show_progressbar=False)
        # Every labelled cell: the real targets' tests ride along, to show the power kept.
        cross_fitted_targets = distance_test_within_folds(
            data,
            model.cell_groups != CellGroup.EXCLUDED,
            perturbation_key=perturbation_key,
            control=control,
            batch_key=batch_key,
            n_perms=n_perms,
        )
        distance_p_values["distance_test, cross-fitted salient latent, within folds"] = (
            cross_fitted_targets
        )
    every_cell = model._differential_expression(
        checked, cells, pseudo_labels, None, DE_DELTA, DE_FDR_TARGET
    )
    responders_de = model._differential_expression(
        checked, cells, pseudo_labels, probability, DE_DELTA, DE_FDR_TARGET
    )

    p_values = pd.concat(
        [
            *(
                pd.DataFrame(
                    {
                        "test": test,
                        "pseudo_target": pseudo_labels,
                        "gene": None,
                        # A pseudo-target without held-out cells is not tested.
                        "p_value": table["pvalue"].reindex(pseudo_labels).to_numpy(dtype=float),
                    }
                ).dropna(subset="p_value")
                for test, table in distance_p_values.items()
            ),
            pd.DataFrame(
                {
                    "test": "differential_expression",
                    "pseudo_target": every_cell["group1"].to_numpy(),
                    "gene": every_cell.index.to_numpy(),
                    "p_value": every_cell["p_value"].to_numpy(),
                }
            ),
        ],
        ignore_index=True,
    )
    in_pseudo = data.obs[perturbation_key].isin(pseudo_labels).to_numpy()
    pseudo_probability = pd.Series(probability[in_pseudo], index=data.obs_names[in_pseudo])
    called = pd.Series(pseudo_probability > 0.5).groupby(
        data.obs.loc[in_pseudo, perturbation_key].astype(str).to_numpy()
    )
    flagged = responders_de.groupby("group1")[f"is_de_fdr_{DE_FDR_TARGET}"].any()
    rows = []
    for test, table in p_values.groupby("test"):
        uniformity = stats.kstest(table["p_value"], "uniform").pvalue
        rows += [
            {
                "check": f"{test}: p-values below level",
                "level": level,
                "observed": float((table["p_value"] < level).mean()),
                "n": len(table),
                "ks_p_value": uniformity,
            }
            for level in levels
        ]
    rows += [
        {
            "check": "DE genes at 5% FDR: pseudo-targets with any",
            "level": 0.05,
            "observed": float(flagged.mean()),
            "n": len(flagged),
        },
        {
            "check": "responders: pseudo-targets with any cell called KO",
            "level": 0.05,
            "observed": float(called.any().mean()),
            "n": n_pseudo_targets,
        },
        {
            "check": "responders: pseudo-target cells called KO",
            "level": 0.0,
            "observed": float((pseudo_probability > 0.5).mean()),
            "n": len(pseudo_probability),
        },
    ]
    targets = held_out[is_target].copy()
    if batch_key is not None:
        stratified = within_batches["distance_test, held-out cells, within batches"]
        targets["pvalue_within_batches"] = stratified["pvalue"].reindex(targets.index)
    if cross_fitted_targets is not None:
        targets["pvalue_cross_fitted"] = cross_fitted_targets["pvalue"].reindex(targets.index)
    return CalibrationCheck(
        summary=pd.DataFrame(rows),
        p_values=p_values,
        responder_probability=pseudo_probability,
        targets=targets,
    )
