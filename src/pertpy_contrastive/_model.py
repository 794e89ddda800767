"""The user-facing model: registration, training, latents, save and load."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyro
import torch
from anndata import AnnData
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LayerField,
    NumericalJointObsField,
)
from scvi.model._utils import (
    _init_library_size,
    get_max_epochs_heuristic,
    use_distributed_sampler,
)
from scvi.model.base import BaseModelClass
from scvi.model.base._constants import SAVE_KEYS
from scvi.model.base._save_load import _load_saved_files
from scvi.train import LoudEarlyStopping

from ._background import CalibratedBackgroundMixin
from ._calling import CallingMixin
from ._constants import (
    BACKGROUND_MMD_WEIGHT,
    GROUP_KEY,
    INFERENCE_BATCH_SIZE,
    LATENT_KINDS,
    LEARNING_RATE,
    TARGET_KEY,
    TRAIN_SIZE,
    TRAINING_BATCH_SIZE,
    CellGroup,
)
from ._data import (
    InvalidValueError,
    MissingFileError,
    PerturbationGroupField,
    PerturbationTargetField,
    as_label_list,
    assign_groups,
    get_count_matrix,
    median_library_size,
    resolve_modality,
    validate_counts,
    validate_covariates,
)
from ._dataloading import PairedDataSplitter
from ._differential import DifferentialExpressionMixin
from ._expression import ExpressionMixin, check_finite_latent
from ._likelihoods import Likelihood
from ._module import ContrastivePyroModule
from ._responders import ResponderMixin
from ._training_plan import (
    MONITORED,
    ContrastiveTrainingPlan,
    ContrastiveTrainRunner,
    TrainingTerminatedError,
)

logger = logging.getLogger(__name__)


class ContrastiveVAE(
    CallingMixin,
    ResponderMixin,
    DifferentialExpressionMixin,
    ExpressionMixin,
    CalibratedBackgroundMixin,
    BaseModelClass,
):
    """Contrastive VAE for CRISPR screens, written in Pyro.

    Every cell has a background latent; perturbed cells also use the salient latent, which the
    decoder holds at zero for the controls that train the background. The other half of the
    controls, the contrast controls, are trained exactly as perturbed cells are, and every test
    compares a target with them: a target without an effect and the contrast controls are two
    samples of one population, so the salient latent of every cell can be tested
    (docs/model.md). Covariates are given to the encoders and the decoder.

    Parameters
    ----------
    adata
        AnnData (or MuData) registered with :meth:`setup_anndata`.
    n_salient
        Dimension of the salient (perturbation-specific) latent.
    n_background
        Dimension of the background (shared) latent.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers in encoders and decoder.
    dropout_rate
        Dropout in the encoders.
    likelihood
        ``"zinb"`` (default), ``"nb"`` or ``"poisson"``.
    use_observed_library
        Use each cell's total count as its library size (default); otherwise it is latent.
    background_mmd_weight
        Weight of the squared maximum mean discrepancy between the background latents of the
        background controls and of the perturbed cells of each training step. Guides are
        assigned at random, so both groups share one background distribution; the penalty
        moves perturbation effects that the background latent picked up into the salient
        latent. ``0`` turns it off.
    encoder_library_size
        Total that the encoders scale each cell's counts to before ``log1p``. Default: the
        median total count of ``adata``, which keeps sequencing depth out of the latents.
    seed
        Seed of the initial network weights (training has its own seed, see :meth:`train`).
    modality
        Modality to model when ``adata`` is a MuData.

    Examples
    --------
    >>> ContrastiveVAE.setup_anndata(adata, perturbation_key="target", control="non-targeting")
    >>> model = ContrastiveVAE(adata)
    >>> model.train()
    >>> model.write_outputs(adata)
    """

    _module_cls = ContrastivePyroModule
    _training_plan_cls = ContrastiveTrainingPlan
    _data_splitter_cls = PairedDataSplitter
    _train_runner_cls = ContrastiveTrainRunner

    def __init__(
        self,
        adata: AnnData | MuData,
        n_salient: int = 10,
        n_background: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        likelihood: Likelihood = "zinb",
        use_observed_library: bool = True,
        background_mmd_weight: float = BACKGROUND_MMD_WEIGHT,
        encoder_library_size: float | None = None,
        seed: int = 0,
        modality: str = "rna",
    ):
        adata = resolve_modality(adata, modality)
        super().__init__(adata)
        if encoder_library_size is None:
            counts = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
            encoder_library_size = median_library_size(counts)
        n_batch = self.summary_stats.n_batch
        library_log_means = library_log_vars = None
        if not use_observed_library:
            library_log_means, library_log_vars = _init_library_size(self.adata_manager, n_batch)
        cat_covs_registry = self.adata_manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY)
        with torch.random.fork_rng(devices=[]):  # seeds the initial weights, not the session
            torch.manual_seed(seed)
            self.module = self._module_cls(
                n_genes=self.summary_stats.n_vars,
                n_background=n_background,
                n_salient=n_salient,
                n_batch=n_batch,
                n_cats_per_cov=tuple(cat_covs_registry.get("n_cats_per_key", ())),
                n_continuous_cov=self.summary_stats.get("n_extra_continuous_covs", 0),
                n_hidden=n_hidden,
                n_layers=n_layers,
                dropout_rate=dropout_rate,
                likelihood=likelihood,
                use_observed_library=use_observed_library,
                library_log_means=None if library_log_means is None else library_log_means.ravel(),
                library_log_vars=None if library_log_vars is None else library_log_vars.ravel(),
                background_mmd_weight=background_mmd_weight,
                encoder_library_size=encoder_library_size,
            )
        self._model_summary_string = (
            f"ContrastiveVAE: n_salient={n_salient}, n_background={n_background}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}, likelihood={likelihood}, "
            f"observed library={use_observed_library}, "
            f"background_mmd_weight={background_mmd_weight}"
        )
        self.init_params_ = self._get_init_params(locals())

    # -- registration -------------------------------------------------------------------------

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData | MuData,
        perturbation_key: str,
        control: str | Sequence[str],
        exclude: str | Sequence[str] | None = None,
        layer: str | None = None,
        batch_key: str | None = None,
        guide_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        modality: str = "rna",
        **kwargs,
    ) -> None:
        """Register raw counts, perturbation groups and covariates.

        Cells whose ``perturbation_key`` label is in ``control`` are controls: half of them (by
        a hash of the cell's name, so the same cell has the same role in every copy of the
        data) train the background, the other half are the contrast that targets are tested
        against. Missing labels and labels in ``exclude`` are excluded from training (they
        still get latents); every other label is a perturbation target.

        Everything is validated before anything is written. Besides scvi-tools' registry
        (``uns['_scvi_uuid']``, ``uns['_scvi_manager_uuid']``), registration writes only these
        obs/obsm entries: ``obs['_scvi_contrastive_group']`` (0 background control, 1 target,
        2 excluded, 3 contrast control; :class:`~pertpy_contrastive.CellGroup`),
        ``obs['_scvi_contrastive_target']`` (index of the cell's target among the trained targets,
        -1 for controls and other labels), ``obs['_scvi_batch']``, and, when covariates are given,
        ``obsm['_scvi_extra_categorical_covs']`` / ``obsm['_scvi_extra_continuous_covs']``.

        Parameters
        ----------
        adata
            AnnData, or MuData whose ``modality`` holds the RNA counts and the obs columns below.
        perturbation_key
            obs column with each cell's perturbation label (e.g. its target gene).
        control
            Label(s) of control cells, e.g. ``"non-targeting"`` or ``["NT1", "NT2"]``.
        exclude
            Label(s) to leave out of training, e.g. ``["multiple"]``.
        layer
            Layer with raw UMI counts; ``None`` uses ``X``. Kept sparse.
        batch_key
            obs column of the batch / replicate. Steps pair controls and targets within a batch.
        guide_key
            obs column with each cell's guide (e.g. from
            :func:`~pertpy_contrastive.pp.perturbation_labels`, ``guide_key_added``). The model
            does not train on it; :meth:`get_responder_fractions` reports the responder
            fraction per guide with ``by="guide"``.
        categorical_covariate_keys
            Further categorical obs columns (cell line, ...), given to encoders and decoder.
        continuous_covariate_keys
            Continuous obs columns (e.g. percent mito), given to encoders and decoder.
        modality
            Modality to register when ``adata`` is a MuData.
        """
        # One form for every later use: a list of labels, also in the saved setup arguments.
        control = as_label_list(control)
        setup_method_args = cls._get_setup_method_args(**locals())
        parent_obs = adata.obs if isinstance(adata, MuData) else None
        adata = resolve_modality(adata, modality)
        control_labels = control
        excluded_labels = as_label_list(exclude)
        categorical_covariate_keys = list(categorical_covariate_keys or [])
        continuous_covariate_keys = list(continuous_covariate_keys or [])
        _validate_setup(
            adata,
            parent_obs,
            perturbation_key,
            control_labels,
            excluded_labels,
            layer,
            batch_key,
            guide_key,
            categorical_covariate_keys,
            continuous_covariate_keys,
            transferring=kwargs.get("source_registry") is not None,
        )
        fields = [
            # Counts were validated by _validate_setup, with clearer messages than the field's.
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            PerturbationGroupField(perturbation_key, control_labels, excluded_labels),
            PerturbationTargetField(perturbation_key, control_labels, excluded_labels),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
            NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
        ]
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # -- training -----------------------------------------------------------------------------

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = TRAINING_BATCH_SIZE,
        train_size: float = TRAIN_SIZE,
        lr: float = LEARNING_RATE,
        n_epochs_kl_warmup: int | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        stratify_by_batch: bool = True,
        seed: int = 0,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        strategy: str | Strategy = "auto",
        num_nodes: int = 1,
        precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true",
        checkpoint_dir: str | Path | None = None,
        checkpoint_every_n_epochs: int = 1,
        resume_from: str | Path | None = None,
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train on paired control/perturbed minibatches.

        Interrupting training with Ctrl-C (e.g. in a notebook) keeps the weights and the history
        trained so far, with a warning, and the model can be used. SIGTERM (a scheduler's time
        limit, a preemption) raises :class:`~pertpy_contrastive.TrainingTerminatedError`, and
        any other error raised in training propagates: the model then stays untrained.
        :attr:`training_status` records how training ended. The global random states of Python,
        NumPy and torch are left as they were: training seeds its own, from ``seed``.

        Parameters
        ----------
        max_epochs
            Maximum passes over the larger of the two groups. Default: scvi-tools' heuristic
            (400, fewer above 20,000 training cells).
        batch_size
            Cells per group per step (a step holds a control and a perturbed minibatch).
        train_size
            Fraction of each group and batch used for training; the rest is the validation set
            of early stopping. Every cell is tested afterwards, so the validation set needs only
            to be large enough to tell when the ELBO stops improving.
        lr
            Adam learning rate.
        n_epochs_kl_warmup
            Epochs over which the weight of the ELBO's KL part rises from ~0 to 1. Default: a
            quarter of ``max_epochs``.
        early_stopping
            Stop when the negative ELBO of the validation cells (``elbo_validation``, at full KL
            weight, without the penalties) has not fallen for ``early_stopping_patience`` epochs
            (counted after the warm-up).
        early_stopping_patience
            See ``early_stopping``.
        stratify_by_batch
            Draw each step's controls and perturbed cells from the same batch.
        seed
            Seed of the split, the pairing, the initialisation and the sampling.
        accelerator, devices
            Lightning accelerator and devices; ``"auto"`` uses a GPU when present.
        strategy, num_nodes
            Lightning strategy and number of machines. ``strategy="ddp"`` trains one copy of
            the model per device (a process each) on disjoint shares of every epoch's paired
            steps and averages their gradients; validation losses are averaged over the
            processes, and early stopping works as on one device. Every process ends with the
            same trained model. See :doc:`/distributed` for launching it with ``torchrun`` or
            SLURM.
        precision
            ``"bf16-mixed"`` or ``"16-mixed"`` (CUDA only) run the networks' layers in 16 bits;
            the decoder's softmax, the likelihood, the KL terms and the MMD stay in float32.
        checkpoint_dir
            Directory to save a Lightning checkpoint in (``last.ckpt``) every
            ``checkpoint_every_n_epochs`` epochs: the module, the optimiser, the training plan's
            state (KL warm-up position, early-stopping state, history so far) and the training
            arguments.
        checkpoint_every_n_epochs
            See ``checkpoint_dir``.
        resume_from
            A checkpoint of the same model, data and training arguments to continue from. With
            the same ``seed``, the resumed run ends with the weights of an uninterrupted one.
        plan_kwargs
            Further arguments of :class:`~pertpy_contrastive._training_plan.ContrastiveTrainingPlan`.
        **trainer_kwargs
            Further arguments of :class:`~scvi.train.Trainer` (e.g. ``gradient_clip_val``).
        """
        # This call's arguments; the defaults that depend on the training cells are filled in
        # once the cells are split.
        arguments = {name: value for name, value in locals().items() if name != "self"}
        _check_precision(precision, accelerator)
        data_splitter = self._data_splitter_cls(
            self.adata_manager,
            train_size=train_size,
            batch_size=batch_size,
            seed=seed,
            stratify_by_batch=stratify_by_batch,
        )
        arguments |= _epoch_schedule(
            data_splitter, max_epochs, n_epochs_kl_warmup, early_stopping, train_size
        )
        self._run_training(data_splitter, arguments)

    def _plan_kwargs(self, arguments: dict) -> dict:
        """Return the training plan's arguments; with checkpoints, the run they must match."""
        plan_kwargs = {
            "lr": arguments["lr"],
            "n_epochs_kl_warmup": arguments["n_epochs_kl_warmup"],
            "seed": arguments["seed"],
            **(arguments["plan_kwargs"] or {}),
        }
        if arguments["checkpoint_dir"] is not None or arguments["resume_from"] is not None:
            plan_kwargs["run_arguments"] = self._run_arguments(
                **{key: arguments[key] for key in _RUN_SETTINGS},
                **{key: plan_kwargs[key] for key in ("lr", "n_epochs_kl_warmup")},
            )
        return plan_kwargs

    def _run_arguments(self, **train_arguments) -> dict:
        """Return what a checkpoint must share with a run that resumes from it."""
        return {
            "train": train_arguments,
            "model": json.loads(json.dumps(self.init_params_["non_kwargs"], default=str)),
            "cells": self.adata.n_obs,
            "genes": self.adata.n_vars,
        }

    def _run_training(self, data_splitter, arguments: dict) -> None:
        """One Lightning run through scvi-tools' runner, given the arguments of :meth:`train`."""
        plan_kwargs = self._plan_kwargs(arguments)
        trainer_kwargs = _trainer_kwargs(arguments)
        checkpoint = _checkpoint_callback(
            arguments["checkpoint_dir"], arguments["checkpoint_every_n_epochs"]
        )
        early_stopping = arguments["early_stopping"]
        self.module.train()  # a trained model is left in eval mode; training resumes from it
        training_plan = self._training_plan_cls(self.module, **plan_kwargs)
        if use_distributed_sampler(trainer_kwargs["strategy"]):
            trainer_kwargs = _distributed_early_stopping(trainer_kwargs, early_stopping)
            early_stopping = False
        with warnings.catch_warnings():
            # Issued under DDP whatever early_stopping is; the callback above replaces it.
            warnings.filterwarnings("ignore", message="early_stopping was automatically disabled")
            runner = self._train_runner_cls(
                self,
                training_plan=training_plan,
                data_splitter=data_splitter,
                max_epochs=arguments["max_epochs"],
                early_stopping=early_stopping,
                **trainer_kwargs,
            )
        if checkpoint is not None:
            # Added after the Trainer is built: scvi-tools' Trainer, when checkpointing is on,
            # adds its own callback, which saves scvi-tools model directories and monitors a
            # 'validation_loss' this model does not log; Lightning refuses a checkpoint callback
            # when it is off. Appended here, it is Lightning's plain ModelCheckpoint.
            runner.trainer.callbacks.append(checkpoint)
        interrupt_handler = signal.getsignal(signal.SIGINT)
        try:
            with _seeded_random_state(arguments["seed"]):
                runner()
        except SIGTERMException as error:
            # Lightning raises it, a SystemExit with exit code 0, at the step after SIGTERM.
            raise TrainingTerminatedError(
                f"Training received SIGTERM after {self.epochs_trained} completed epochs and "
                "stopped; the model is not trained. Train again (with checkpoint_dir=..., "
                "model.train(resume_from=...) continues where a checkpoint left off)."
            ) from error
        except SystemExit:
            # Lightning turns Ctrl-C into a graceful shutdown followed by sys.exit(1), and
            # leaves Ctrl-C ignored for the rest of the session.
            if runner.trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            signal.signal(signal.SIGINT, interrupt_handler)
            self._keep_interrupted_training(data_splitter)
            return
        finally:
            self.module.eval()  # also after a diverged run, so latents stay deterministic
        stopped = any(
            isinstance(callback, EarlyStopping) and callback.stopped_epoch > 0
            for callback in runner.trainer.callbacks
        )
        self.training_status_ = "stopped early" if stopped else "completed"
        if torch.distributed.is_initialized():
            # scvi-tools' logger records the history on rank 0 only; every process returns the
            # same trained model, so it gets the same history too. (Spawn-based strategies
            # return to a process outside the group, which reads rank 0's saved history.)
            self.history_ = runner.trainer.strategy.broadcast(self.history_, src=0)

    @property
    def training_status(self) -> str | None:
        """How the last training ended, or ``None`` before any training ended.

        ``"completed"`` (``max_epochs``), ``"stopped early"`` (early stopping) or
        ``"interrupted"`` (Ctrl-C; the weights so far are kept).
        """
        return getattr(self, "training_status_", None)

    @property
    def epochs_trained(self) -> int:
        """Training epochs completed, over all calls of :meth:`train` (0 if untrained)."""
        # kl_weight is logged once per training epoch, by every version of the training plan.
        return len(self.history["kl_weight"]) if self.history else 0

    def _keep_interrupted_training(self, data_splitter) -> None:
        """After Ctrl-C, keep the weights and the history trained so far, as a trained model.

        scvi-tools' runner has already stored the history; it re-raises and would leave the
        model untrained, so every latent would be refused and the training lost.
        """
        self.train_indices = data_splitter.train_idx
        self.validation_indices = data_splitter.val_idx
        self.test_indices = data_splitter.test_idx
        self.is_trained_ = True
        self.training_status_ = "interrupted"
        epochs = "epoch" if self.epochs_trained == 1 else "epochs"
        warnings.warn(
            f"Training was interrupted after {self.epochs_trained} completed {epochs}. The model "
            "keeps the weights and the history trained so far and can be used, or trained "
            "further with model.train().",
            UserWarning,
            stacklevel=3,
        )

    # -- inference ----------------------------------------------------------------------------

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        kind: Literal["salient", "background"] = "salient",
        give_mean: bool = True,
        batch_size: int = INFERENCE_BATCH_SIZE,
        modality: str = "rna",
    ) -> np.ndarray:
        """Posterior mean (or one sample) of the salient or background latent of each cell.

        The salient latent of every cell may be compared across labels as long as the controls
        compared with are the contrast controls (:meth:`distance_test` does so): training
        treated them exactly as perturbed cells. The background controls, decoded without it,
        sit nearer the origin by construction.

        Parameters
        ----------
        adata
            Data to encode; defaults to the data the model was set up with. Must have the
            model's genes in the same order.
        indices
            Cells to encode; default all.
        kind
            ``"salient"`` (perturbation-specific) or ``"background"`` (shared).
        give_mean
            Return the posterior mean; otherwise one posterior sample.
        batch_size
            Cells per inference minibatch.
        modality
            Modality to encode when ``adata`` is a MuData.

        Returns
        -------
        Array of shape ``(n_cells, n_salient)`` or ``(n_cells, n_background)``.
        """
        if kind not in LATENT_KINDS:
            raise InvalidValueError(f"kind must be one of {LATENT_KINDS}, got {kind!r}.")
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(None if adata is None else resolve_modality(adata, modality))
        n_cells = adata.n_obs if indices is None else len(indices)
        dimension = self.module.n_salient if kind == "salient" else self.module.n_background
        # Filled in place: concatenating the minibatches' results fragments the heap, and the
        # resident memory then grows with the cells (see ``_posterior_means``).
        latent, start = np.empty((n_cells, dimension), dtype=np.float32), 0
        for tensors in self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
            inputs, _ = self.module._get_fn_args_from_batch(tensors)
            loc, scale = self.module.encode(*inputs.encoder_inputs)[kind]
            sample = loc if give_mean else torch.distributions.Normal(loc, scale).sample()
            latent[start : start + len(sample)] = sample.cpu().numpy()
            start += len(sample)
        check_finite_latent(latent)
        return latent

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        if adata is not None and adata is not self.adata:
            _check_same_genes(np.asarray(self.adata.var_names), adata)
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    @property
    def cell_groups(self) -> np.ndarray:
        """:class:`~pertpy_contrastive.CellGroup` code of each registered cell."""
        return self.adata_manager.get_from_registry(GROUP_KEY).ravel().astype(int)

    @property
    def control_labels(self) -> list[str]:
        """The labels of the control cells, as given to :meth:`setup_anndata`."""
        return list(self.adata_manager.get_state_registry(GROUP_KEY)["control_labels"])

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | MuData | None = None,
        modality: str = "rna",
        **kwargs,
    ) -> ContrastiveVAE:
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        dir_path
            Directory the model was saved to.
        adata
            Data to attach (AnnData or MuData); must have the training genes, in order. Default:
            the AnnData saved with the model (``save(..., save_anndata=True)``).
        modality
            Modality to attach when ``adata`` is a MuData.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load`.
        """
        model_file = Path(dir_path) / f"{kwargs.get('prefix') or ''}{SAVE_KEYS.MODEL_FNAME}"
        if not model_file.is_file():
            raise MissingFileError(
                f"No saved ContrastiveVAE in {str(dir_path)!r}: {model_file} does not exist. Pass "
                "the directory given to model.save() (and its prefix= if one was used)."
            )
        # Read here and again by scvi-tools' load, which has no hook between reading the file and
        # building the model; the checks need the registry first, and the file is a few MB.
        try:
            attributes, var_names, _, _ = _load_saved_files(
                dir_path, load_adata=False, prefix=kwargs.get("prefix"), map_location="cpu"
            )
            attributes["registry_"]
        except Exception as error:
            # torch.load of a damaged or foreign file fails deep in pickle (UnicodeDecodeError,
            # UnpicklingError, RuntimeError, EOFError, ...), with no hint of the file.
            raise InvalidValueError(
                f"{model_file} is not a valid saved ContrastiveVAE: it could not be read "
                f"({type(error).__name__}: {error}). The file is damaged or was not written by "
                "model.save(); save the model again."
            ) from error
        _check_saved_model(attributes, dir_path, cls.__name__)
        if adata is not None:
            adata = resolve_modality(adata, modality)
            _check_same_genes(np.asarray(var_names), adata)
        return super().load(dir_path, adata=adata, **kwargs)


def _validate_setup(
    adata: AnnData,
    parent_obs,
    perturbation_key: str,
    control_labels: list[str],
    excluded_labels: list[str],
    layer: str | None,
    batch_key: str | None,
    guide_key: str | None,
    categorical_covariate_keys: list[str],
    continuous_covariate_keys: list[str],
    transferring: bool,
) -> None:
    """Check the arguments of :meth:`ContrastiveVAE.setup_anndata` against ``adata``.

    ``transferring`` (registering new data on a trained model's registry) skips the checks of
    the perturbation and guide columns, which new data need not have.
    """
    if not control_labels:
        raise InvalidValueError(
            "control must name at least one control label, e.g. 'non-targeting'."
        )
    overlap = set(control_labels) & set(excluded_labels)
    if overlap:
        raise InvalidValueError(f"Labels {sorted(overlap)} are both control and excluded.")
    if perturbation_key not in adata.obs and not transferring:
        validate_covariates(adata, {perturbation_key: "Perturbation key"}, [], parent_obs)
    categorical = {key: "Categorical covariate" for key in categorical_covariate_keys}
    if batch_key is not None:
        categorical[batch_key] = "Batch key"
    validate_covariates(adata, categorical, continuous_covariate_keys, parent_obs)
    if guide_key is not None and guide_key not in adata.obs and not transferring:
        validate_covariates(adata, {guide_key: "Guide key"}, [], parent_obs)
    source = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    validate_counts(get_count_matrix(adata, layer), source, adata.obs_names)
    if not transferring:
        assign_groups(
            adata.obs[perturbation_key], control_labels, excluded_labels, perturbation_key
        )


_REMOVED_OPTIONS = (
    "wasserstein_weight",
    "salient_encoder_sees_group",
    "responder",
    "responder_salient_scale",
    "salient_effect",
    "salient_cross_fitting",
    "counterfactual_controls",
    "counterfactual_share",
    "independence_weight",
)
"""Constructor options of 0.2 that 0.3 removed (docs/design_notes.md tells why)."""


def _check_saved_model(attributes: dict, dir_path: str, expected: str) -> None:
    """Refuse, with the way out, other models and models of earlier versions."""
    registry = attributes["registry_"]
    model_name = registry.get("model_name")
    if model_name != expected:
        raise InvalidValueError(
            f"{str(dir_path)!r} holds a saved {model_name or 'unknown'} model, not a "
            f"{expected}. Load it with its own class (e.g. scvi.model.{model_name}.load)."
        )
    fields = registry["field_registries"]
    if GROUP_KEY in fields and TARGET_KEY not in fields:
        raise InvalidValueError(
            f"The model in {dir_path!r} was saved by pertpy-contrastive 0.1, which this version "
            "cannot load: retrain it, or load it with `pip install 'pertpy-contrastive<0.2'`."
        )
    init_params = attributes.get("init_params_", {})
    saved = {**init_params.get("non_kwargs", {}), **init_params.get("kwargs", {})}
    removed = [f"{name}={saved[name]!r}" for name in _REMOVED_OPTIONS if name in saved]
    if removed:
        raise InvalidValueError(
            f"The model in {dir_path!r} was saved by pertpy-contrastive 0.2 with options that "
            f"0.3 removed ({', '.join(removed)}), and its controls all trained the background, "
            "so this version cannot load it. Retrain it with this version, or load it with "
            "`pip install 'pertpy-contrastive<0.3'` (the last version that loads it)."
        )


def _check_same_genes(expected: np.ndarray, adata: AnnData) -> None:
    observed = np.asarray(adata.var_names).astype(str)
    expected = expected.astype(str)
    if np.array_equal(observed, expected):
        return
    if len(observed) == len(expected) and set(observed) == set(expected):
        problem = "the same genes in a different order"
    else:
        missing = np.setdiff1d(expected, observed)
        problem = (
            f"{len(observed)} genes where the model has {len(expected)}; "
            f"{len(missing)} model genes are missing (e.g. {list(missing[:5])})"
        )
    raise InvalidValueError(
        f"This AnnData has {problem}. The model needs exactly its training genes, in order: "
        "subset and reorder with `adata = adata[:, model.adata.var_names].copy()` (genes absent "
        "from your data cannot be filled in)."
    )


__all__ = ["CellGroup", "ContrastiveVAE"]


@contextlib.contextmanager
def _seeded_random_state(seed: int):
    """Seed Python, NumPy, torch and Pyro for training, and restore the caller's states after.

    Training draws from the global generators (dropout, the reparametrised samples, Lightning),
    so it cannot use private ones; restoring them keeps the user's session unaffected.
    """
    # The legacy global state is the one to restore: it is what Pyro seeds.
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        pyro.set_rng_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)  # noqa: NPY002


_RUN_SETTINGS = (
    "max_epochs",
    "batch_size",
    "train_size",
    "seed",
    "early_stopping",
    "early_stopping_patience",
    "stratify_by_batch",
)
"""Arguments of :meth:`ContrastiveVAE.train` that a checkpoint records (with the training plan's
``lr`` and ``n_epochs_kl_warmup``): a run resumed from it must have the same."""


def _epoch_schedule(
    data_splitter, max_epochs, n_epochs_kl_warmup, early_stopping, train_size
) -> dict:
    """Fill in the defaults that depend on the training cells.

    The epochs (scvi-tools' heuristic), the KL warm-up (a quarter of them), and early stopping,
    which needs validation cells.
    """
    if max_epochs is None:
        max_epochs = get_max_epochs_heuristic(data_splitter.n_train)
    if n_epochs_kl_warmup is None:
        n_epochs_kl_warmup = max(1, math.ceil(max_epochs / 4))
    if early_stopping and data_splitter.val_sampler is None:
        logger.warning("No validation cells (train_size=%s): early stopping is off.", train_size)
        early_stopping = False
    return {
        "max_epochs": max_epochs,
        "n_epochs_kl_warmup": n_epochs_kl_warmup,
        "early_stopping": early_stopping,
    }


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
"""Lightning precisions that :meth:`ContrastiveVAE.train` accepts."""


def _check_precision(precision: str, accelerator: str) -> None:
    """Raise for a precision that training does not support, naming the ones it does."""
    if precision not in PRECISIONS:
        raise InvalidValueError(
            f"precision={precision!r} is not supported. Use one of {PRECISIONS}: the count "
            "likelihood needs float32, and mixed precision keeps it there."
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision == "16-mixed" and on_cpu:
        raise InvalidValueError(
            "precision='16-mixed' needs a CUDA GPU, and training runs on the CPU. Use "
            "precision='bf16-mixed' (or '32-true') on a CPU."
        )


def _trainer_kwargs(arguments: dict) -> dict:
    """Return the Lightning Trainer's arguments, given the arguments of ``train``."""
    trainer_kwargs = {
        "accelerator": arguments["accelerator"],
        "devices": arguments["devices"],
        "strategy": arguments["strategy"],
        "num_nodes": arguments["num_nodes"],
        "precision": arguments["precision"],
        # PairedDataSplitter shards its own steps across processes (see PairedBatchSampler).
        "use_distributed_sampler": False,
        "early_stopping_monitor": MONITORED,
        "early_stopping_patience": arguments["early_stopping_patience"],
        **arguments["trainer_kwargs"],
    }
    trainer_kwargs.setdefault(
        "early_stopping_warmup_epochs",
        min(arguments["n_epochs_kl_warmup"], arguments["max_epochs"]),
    )
    if arguments["resume_from"] is not None:
        trainer_kwargs["ckpt_path"] = _checkpoint_file(arguments["resume_from"])
    return trainer_kwargs


def _distributed_early_stopping(trainer_kwargs: dict, early_stopping: bool) -> dict:
    """Trainer arguments under DDP, with early stopping added back when it was asked for.

    scvi-tools' Trainer switches early stopping off under DDP. Lightning's EarlyStopping is
    safe there: the monitored validation loss is averaged over the processes (``sync_dist``)
    and the callback reduces its decision across them, so all processes stop at one epoch.
    """
    stopping_kwargs = {
        key: trainer_kwargs.pop(f"early_stopping_{key}")
        for key in ("monitor", "patience", "warmup_epochs", "min_delta", "mode")
        if f"early_stopping_{key}" in trainer_kwargs
    }
    if not early_stopping:
        return trainer_kwargs
    stopping_kwargs = {"min_delta": 0.0, "mode": "min", **stopping_kwargs}
    trainer_kwargs["callbacks"] = [
        *trainer_kwargs.get("callbacks", []),
        LoudEarlyStopping(**stopping_kwargs),
    ]
    # scvi-tools' Trainer validates only when its own early stopping is on.
    trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
    return trainer_kwargs


CHECKPOINT_NAME = "last"
"""The file name (``last.ckpt``) of the checkpoint ``train(checkpoint_dir=...)`` keeps."""


def _checkpoint_callback(checkpoint_dir, every_n_epochs: int) -> ModelCheckpoint | None:
    """Lightning's checkpoint callback that keeps ``last.ckpt`` in ``checkpoint_dir``."""
    if checkpoint_dir is None:
        return None
    if every_n_epochs < 1:
        raise InvalidValueError(
            f"checkpoint_every_n_epochs must be at least 1, got {every_n_epochs}."
        )
    # One file, last.ckpt, replaced at every save.
    return ModelCheckpoint(
        dirpath=str(checkpoint_dir),
        filename=CHECKPOINT_NAME,
        save_top_k=1,
        every_n_epochs=every_n_epochs,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )


def _checkpoint_file(resume_from) -> str:
    """Return the checkpoint to resume from, checked to exist (the runner hands it to fit)."""
    if not Path(resume_from).is_file():
        raise MissingFileError(
            f"resume_from={str(resume_from)!r} is not a file. Pass the last.ckpt that "
            "train(checkpoint_dir=...) wrote."
        )
    return str(resume_from)
