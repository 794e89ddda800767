"""A salient latent of every cell that no part of the model was trained on: cross-fitting.

A model's salient latent of its own training cells is not exchangeable between a null target
and the controls: the decoder and the encoder both learnt those cells' noise
(docs/benchmarks.md, "When noise fitting starts, and where it lives"), and on the Papalexi data
``pt.tl.DistanceTest`` over every cell calls non-targeting guides trained as targets. Its
held-out cells are exchangeable, but they are only the validation share. Here the cells are
split into folds, one model is trained per fold on the other folds' cells, and each cell is
read by the model that never saw it. Every cell then counts, as in the held-out test.

The models' salient spaces are identified only up to rotation, so each is rotated onto the
first (orthogonal Procrustes on the posterior means of every cell, which uses no label): a
distance between cells read by different models then measures expression, not the models'
arbitrary axes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from scipy.linalg import orthogonal_procrustes

from .._data import get_count_matrix, resolve_modality
from .._model import ContrastiveVAE
from ._distance import distance_test

CROSS_FITTED_SALIENT_KEY = "X_contrastive_salient_cross_fitted"
CROSS_FITTING_FOLD_KEY = "contrastive_cross_fitting_fold"


def cross_fitted_salient(
    adata: AnnData | MuData,
    *,
    n_folds: int = 2,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    seed: int = 0,
    key_added: str = CROSS_FITTED_SALIENT_KEY,
    fold_key_added: str = CROSS_FITTING_FOLD_KEY,
    overwrite: bool = False,
    modality: str = "rna",
) -> None:
    """Salient latent of every cell, each read by a model not trained on it.

    The cells are split into ``n_folds`` folds (at random, in equal shares of every
    perturbation label and batch), and one :class:`~pertpy_contrastive.ContrastiveVAE` is
    trained per fold, on the cells of the other folds, with the set-up arguments that
    ``adata`` was registered with. Each cell's salient latent (posterior mean) comes from the
    model of its fold; the models' latents are rotated onto the first model's.

    Use it to call targets with ``pt.tl.DistanceTest(obsm_key=key_added)`` over every cell,
    or with :func:`~pertpy_contrastive.tl.distance_test` and ``strata_key=fold_key_added``,
    which permutes the labels within folds and is exact whatever the models' differences. On
    the salient latent of a single model's training cells (``obsm['X_contrastive_salient']``)
    that test is not calibrated; :meth:`~pertpy_contrastive.ContrastiveVAE.distance_test`
    tests only the held-out cells. This latent costs ``n_folds`` trainings, each on
    ``1 - 1 / n_folds`` of the cells. It is for testing, not for plotting: two cells read by
    different models are comparable only up to the rotation's fit.

    Parameters
    ----------
    adata
        Data registered with :meth:`~pertpy_contrastive.ContrastiveVAE.setup_anndata`, or a
        MuData whose ``modality`` was.
    n_folds
        Folds, and models trained (at least 2).
    model_kwargs, train_kwargs
        Passed to each model and to its ``train`` (e.g. ``{"max_epochs": 100}``).
    seed
        Seed of the folds; the model of fold ``k`` is initialised and trained with ``seed + k``.
    key_added
        obsm key of the latent.
    fold_key_added
        obs column of each cell's fold (0 to ``n_folds - 1``).
    overwrite
        Replace existing keys; otherwise an existing key is an error and nothing is written.
    modality
        Modality of a MuData.

    Returns
    -------
    Nothing; writes ``obsm[key_added]`` and ``obs[fold_key_added]`` into the registered
    AnnData (``adata`` itself, or its ``modality``).
    """
    rna = resolve_modality(adata, modality)
    manager = ContrastiveVAE._get_most_recent_anndata_manager(rna)
    if manager is None:
        raise ValueError(
            "adata is not registered with ContrastiveVAE. Call "
            "pc.ContrastiveVAE.setup_anndata(adata, perturbation_key=..., control=...) first."
        )
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}.")
    taken = existing_keys(rna, key_added, fold_key_added)
    if taken and not overwrite:
        raise KeyError(
            f"{' and '.join(taken)} already exist. Pass overwrite=True to replace them, or "
            "other key_added= / fold_key_added=."
        )
    setup_args = dict(manager.registry["setup_args"])
    setup_args.pop("modality", None)
    layer = setup_args.pop("layer", None)
    cells = _fresh_anndata(rna, layer, setup_args)
    folds = _assign_folds(cells.obs, setup_args, n_folds, seed)

    latents = []
    for fold in range(n_folds):
        training = cells[folds != fold].copy()
        ContrastiveVAE.setup_anndata(training, **setup_args)
        model = ContrastiveVAE(training, **{"seed": seed + fold, **(model_kwargs or {})})
        model.train(**{"seed": seed + fold, "enable_progress_bar": False, **(train_kwargs or {})})
        # Every cell, for the rotation; a copy, since encoding registers the data it reads and
        # the next fold's cells must reach setup_anndata unregistered.
        latents.append(model.get_latent_representation(cells.copy()))
    cross_fitted = np.empty_like(latents[0])
    for fold, latent in enumerate(latents):
        rotation, _ = orthogonal_procrustes(latent, latents[0])
        cross_fitted[folds == fold] = latent[folds == fold] @ rotation
    rna.obsm[key_added] = cross_fitted
    rna.obs[fold_key_added] = pd.Categorical(folds)


def existing_keys(rna: AnnData, key_added: str, fold_key_added: str) -> list[str]:
    """Return the outputs of :func:`cross_fitted_salient` that ``rna`` already holds."""
    taken = [f"obsm[{key_added!r}]"] if key_added in rna.obsm else []
    if fold_key_added in rna.obs:
        taken.append(f"obs[{fold_key_added!r}]")
    return taken


def distance_test_within_folds(
    rna: AnnData,
    cells: np.ndarray,
    *,
    perturbation_key: str,
    control: str,
    batch_key: str | None,
    key_added: str = CROSS_FITTED_SALIENT_KEY,
    fold_key_added: str = CROSS_FITTING_FOLD_KEY,
    n_perms: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """E-distance test of each label of ``cells`` against ``control`` on the cross-fitted latent.

    The labels are permuted within folds, and within batches too with a ``batch_key``: the
    folds' models differ, and a permutation that keeps each fold's share of a label is exact
    whatever their differences.
    """
    strata = rna.obs[fold_key_added].astype(str)
    if batch_key is not None:
        strata = strata + "/" + rna.obs[batch_key].astype(str)
    obs = pd.DataFrame(
        {"label": rna.obs[perturbation_key].astype(str), "stratum": strata}, index=rna.obs_names
    )
    tested = AnnData(obs=obs[cells], obsm={"salient": rna.obsm[key_added][cells]})
    return distance_test(
        tested,
        groupby="label",
        contrast=control,
        obsm_key="salient",
        n_perms=n_perms,
        strata_key="stratum",
        seed=seed,
    )


def _fresh_anndata(rna: AnnData, layer: str | None, setup_args: dict) -> AnnData:
    """Copy the registered counts and obs columns, unregistered, so that each fold registers anew."""
    columns = [
        setup_args.get("perturbation_key"),
        setup_args.get("batch_key"),
        setup_args.get("guide_key"),
        *(setup_args.get("categorical_covariate_keys") or ()),
        *(setup_args.get("continuous_covariate_keys") or ()),
    ]
    columns = list(dict.fromkeys(c for c in columns if c is not None))
    return AnnData(
        X=get_count_matrix(rna, layer),
        obs=rna.obs[columns].copy(),
        var=pd.DataFrame(index=rna.var_names.copy()),
    )


def _assign_folds(obs: pd.DataFrame, setup_args: dict, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each cell: every (label, batch) stratum is shuffled and dealt out in turn.

    Equal shares keep every target in every training set and make each fold's cells of a label
    a random sample of them, so labels stay exchangeable within a fold.
    """
    strata_columns = [setup_args["perturbation_key"]]
    if setup_args.get("batch_key") is not None:
        strata_columns.append(setup_args["batch_key"])
    strata = obs[strata_columns].astype(str).agg("\t".join, axis=1).to_numpy()
    rng = np.random.default_rng(seed)
    folds = np.empty(len(obs), dtype=np.int64)
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        folds[members] = (np.arange(len(members)) + rng.integers(n_folds)) % n_folds
    return folds
