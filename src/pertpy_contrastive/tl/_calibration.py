"""A negative-control calibration check, in the spirit of SCEPTRE's: null pseudo-targets.

Some control guides are relabelled as pseudo-targets and the model is trained on them as on any
perturbation. They are null by construction (the same non-targeting biology as the controls),
so every significant distance, every responder and every DE gene found for them is a false
positive. The observed rates, against the nominal levels, show whether the screen's p-values,
FDRs and calls can be trusted before anyone reads its real targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import stats

from .._constants import DE_FDR_TARGET
from .._data import InvalidValueError, MissingKeyError, as_label_list
from .._figures import finish_figure
from .._model import ContrastiveVAE

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
    """The real targets' distance test (:meth:`ContrastiveVAE.distance_test`), to check that
    they are still found; empty with ``keep_targets=False``. With a ``batch_key``,
    ``pvalue_within_batches`` is the same test with the labels permuted within batches."""

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


DISTANCE_TEST = "distance_test, every cell"
DISTANCE_TEST_WITHIN_BATCHES = "distance_test, every cell, within batches"
DIFFERENTIAL_EXPRESSION = "differential_expression"


def calibration_check(
    adata: AnnData,
    *,
    guide_key: str,
    perturbation_key: str = "perturbation",
    control: str | Sequence[str] = "non-targeting",
    n_pseudo_targets: int | None = None,
    keep_targets: bool = True,
    batch_key: str | None = None,
    layer: str | None = None,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    levels: tuple[float, ...] = (0.01, 0.05, 0.1),
    n_perms: int = 1000,
    seed: int = 0,
    progress_bar: bool = True,
) -> CalibrationCheck:
    """Train on control guides relabelled as pseudo-targets and count what is found in them.

    The cells of ``n_pseudo_targets`` control guides (drawn with ``seed``) get the label
    ``"pseudo:<guide>"``; the other control guides stay controls. A
    :class:`~pertpy_contrastive.ContrastiveVAE` is set up and trained on a copy (``adata`` is
    not changed), then the whole pipeline runs on the pseudo-targets:

    - ``"distance_test, every cell"``:
      :meth:`~pertpy_contrastive.ContrastiveVAE.distance_test`, the E-distance permutation test
      on the salient latent of every cell against the contrast controls, the test that calls
      targets (``uns['<prefix>_target_calls']`` of ``write_outputs``);
    - with a ``batch_key``, the same test with the labels permuted within batches
      (``"... within batches"``), since control guides can be spread over the batches
      unequally;
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
        obs column of the labels, and the control label(s).
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
        Permutations of the distance tests.
    seed
        Seed of the choice of pseudo-target guides.
    progress_bar
        Show progress bars: the training's, then over the targets of each test.

    Returns
    -------
    The summary table, every p-value, the pseudo-targets' responder probabilities, the real
    targets' distance test, and :meth:`CalibrationCheck.plot_qq`.
    """
    control_labels = as_label_list(control)
    data, pseudo_labels = _with_pseudo_targets(
        adata,
        guide_key,
        perturbation_key,
        control_labels,
        n_pseudo_targets,
        keep_targets,
        batch_key,
        layer,
        seed,
    )
    # A control label whose guides all became pseudo-targets has no cells left.
    remaining = [label for label in control_labels if (data.obs[perturbation_key] == label).any()]
    ContrastiveVAE.setup_anndata(
        data, perturbation_key=perturbation_key, control=remaining, batch_key=batch_key
    )
    model = ContrastiveVAE(data, **(model_kwargs or {}))
    model.train(**{"enable_progress_bar": progress_bar, **(train_kwargs or {})})
    return _check_pseudo_targets(
        model, perturbation_key, pseudo_labels, batch_key, levels, n_perms, progress_bar
    )


def _check_pseudo_targets(
    model, perturbation_key, pseudo_labels, batch_key, levels, n_perms, progress_bar
) -> CalibrationCheck:
    """Count what the trained ``model``'s tests and calls find in the pseudo-targets."""
    shown = {"progress_bar": progress_bar}
    distance_tests = {DISTANCE_TEST: model.distance_test(n_perms=n_perms, **shown)}
    if batch_key is not None:
        distance_tests[DISTANCE_TEST_WITHIN_BATCHES] = model.distance_test(
            n_perms=n_perms, strata_key=batch_key, **shown
        )
    probability = model.get_responder_probability(**shown)
    every_cell = model.differential_expression(group1=pseudo_labels, responders_only=False, **shown)
    responders_de = model.differential_expression(
        group1=pseudo_labels, probability=probability, **shown
    )
    p_values = _pseudo_target_p_values(distance_tests, every_cell, pseudo_labels)
    obs = model.adata.obs
    in_pseudo = obs[perturbation_key].isin(pseudo_labels).to_numpy()
    pseudo_probability = pd.Series(probability[in_pseudo], index=obs.index[in_pseudo])
    summary = _summary(
        p_values,
        levels,
        pseudo_probability,
        obs.loc[in_pseudo, perturbation_key].astype(str).to_numpy(),
        responders_de.groupby("group1")[f"is_de_fdr_{DE_FDR_TARGET}"].any(),
        len(pseudo_labels),
    )
    targets = distance_tests[DISTANCE_TEST].drop(index=pseudo_labels, errors="ignore")
    if batch_key is not None:
        stratified = distance_tests[DISTANCE_TEST_WITHIN_BATCHES]
        targets["pvalue_within_batches"] = stratified["pvalue"].reindex(targets.index)
    return CalibrationCheck(
        summary=summary,
        p_values=p_values,
        responder_probability=pseudo_probability,
        targets=targets,
    )


def _with_pseudo_targets(
    adata,
    guide_key,
    perturbation_key,
    control_labels,
    n_pseudo_targets,
    keep_targets,
    batch_key,
    layer,
    seed,
) -> tuple[AnnData, list[str]]:
    """Return a new AnnData of the counts in which some control guides are pseudo-targets."""
    for key in (guide_key, perturbation_key):
        if key not in adata.obs:
            raise MissingKeyError(
                f"obs[{key!r}] is missing. Pass the obs columns of the guides (guide_key=) and "
                "the perturbation labels (perturbation_key=), e.g. from "
                "pc.pp.perturbation_labels(mdata, guide_key_added='guide')."
            )
    is_control = adata.obs[perturbation_key].isin(control_labels).to_numpy()
    control_guides = sorted(adata.obs.loc[is_control, guide_key].dropna().astype(str).unique())
    if n_pseudo_targets is None:
        n_pseudo_targets = max(1, len(control_guides) // 2)
    if not 1 <= n_pseudo_targets < len(control_guides):
        raise InvalidValueError(
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
    return data, [PSEUDO_PREFIX + guide for guide in pseudo_guides]


def _pseudo_target_p_values(distance_tests, every_cell, pseudo_labels) -> pd.DataFrame:
    """Every p-value of the pseudo-targets, one row per test, pseudo-target and gene."""
    distance_rows = [
        pd.DataFrame(
            {
                "test": test,
                "pseudo_target": pseudo_labels,
                "gene": None,
                "p_value": table["pvalue"].reindex(pseudo_labels).to_numpy(dtype=float),
            }
        ).dropna(subset="p_value")
        for test, table in distance_tests.items()
    ]
    de_rows = pd.DataFrame(
        {
            "test": DIFFERENTIAL_EXPRESSION,
            "pseudo_target": every_cell["group1"].to_numpy(),
            "gene": every_cell.index.to_numpy(),
            "p_value": every_cell["p_value"].to_numpy(),
        }
    )
    return pd.concat([*distance_rows, de_rows], ignore_index=True)


def _summary(p_values, levels, pseudo_probability, pseudo_labels, flagged, n_pseudo_targets):
    """One row per check and level: the observed rate against the nominal one."""
    called = pd.Series(pseudo_probability.to_numpy() > 0.5).groupby(pseudo_labels)
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
    return pd.DataFrame(rows)
