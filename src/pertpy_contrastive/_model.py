"""The user-facing model: registration, training, latents, save and load."""

from __future__ import annotations

import contextlib
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
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import TrainerStatus
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
from scvi.train import LoudEarlyStopping, TrainRunner

from ._calling import CallingMixin
from ._constants import (
    BACKGROUND_MMD_WEIGHT,
    COUNTERFACTUAL_CONTROLS,
    GROUP_KEY,
    INDEPENDENCE_WEIGHT,
    INFERENCE_BATCH_SIZE,
    LATENT_KINDS,
    LEARNING_RATE,
    TARGET_KEY,
    TRAINING_BATCH_SIZE,
    CellGroup,
)
from ._data import (
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
from ._responders import ResponderMixin, response_latent
from ._training_plan import ContrastiveTrainingPlan

logger = logging.getLogger(__name__)


class ContrastiveVAE(
    CallingMixin, ResponderMixin, DifferentialExpressionMixin, ExpressionMixin, BaseModelClass
):
    """Contrastive VAE for CRISPR screens, written in Pyro.

    Every cell has a background latent; only perturbed (target) cells use the salient latent,
    which the decoder holds at zero for control cells. Background variation that controls share
    with perturbed cells (cell cycle, subclones, stress, replicates) therefore stays out of the
    salient space. With ``responder=True`` (experimental), whether a perturbed cell responded is
    a latent variable of the model, summed out in training, with a responder fraction per
    target; :meth:`get_responder_probability` gives its posterior. Covariates are given to the
    encoders and the decoder.

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
    wasserstein_weight
        Opt-in weight of the penalty ``||mu||^2 + sum(sigma^2)`` that pulls control cells'
        salient posterior to the point mass at zero. Without it (the default), controls' salient
        posterior is pulled to the prior, centred on zero, like that of perturbed cells that did
        not respond; the penalty makes the encoder memorise the training controls, which shifts
        every perturbed training cell away from them (see the model docs).
    background_mmd_weight
        Weight of the squared maximum mean discrepancy between the background latents of the
        controls and the perturbed cells of each training step. Guides are assigned at random, so
        both groups share one background distribution; the penalty moves perturbation effects that
        the background latent picked up into the salient latent. ``0`` turns it off.
    salient_encoder_sees_group
        Opt-in: give the salient encoder each cell's group (control / perturbed / excluded). This
        can sharpen the contrast, but the salient latent then depends on the guide label and can
        no longer show that a labelled cell looks unperturbed (an escaper) on its own.
    responder
        Experimental: model whether each perturbed cell responded, and give
        :meth:`get_responder_probability`. The background encoder then learns from controls
        only, so that a non-responder's background latent cannot be trained to explain a
        responder's effect. Off by default: on the benchmark screens it does not yet give
        reliable calls (docs/benchmarks.md, "Responders"). ``False`` is the plain contrastive
        VAE, in which every perturbed cell uses its salient latent.
    responder_salient_scale
        Standard deviation of a responder's salient latent around its target's centre mu_t;
        ``None`` learns one per target.
    salient_effect
        Experimental: ``"additive"`` decodes the salient latent as a linear shift of the log
        proportions along unit-norm gene directions, instead of through the non-linear decoder
        (``"nonlinear"``, the default).
    encoder_library_size
        Total that the encoders scale each cell's counts to before ``log1p``. Default: the
        median total count of ``adata``, which keeps sequencing depth out of the latents (a
        fixed 1e4, the choice before, taught the salient latent depth on shallow data).
    independence_weight
        Weight of a per-step penalty on the dependence (HSIC, on standardised latents) between
        the perturbed cells' salient and background latents (default 10; 0 turns it off).
        Guides are assigned at random, so a cell's perturbation effect is independent of its
        background state; the penalty keeps background (subclone, cell cycle, library size)
        out of the salient latent, at some cost in program separation (docs/benchmarks.md,
        "Keeping the background out of the salient latent").
    salient_cross_fitting
        Experimental, off by default. Train two salient encoders, each on one half of the cells,
        and read every cell's salient latent with the encoder that never trained on it, so that
        the latent cannot fit a perturbed training cell's counting noise.
    counterfactual_controls
        How controls train the salient pathway. A control is decoded without its salient latent,
        so the ELBO alone pulls only training controls' salient latent to 0, while the decoder
        learns its salient pathway from perturbed training cells and fits their noise through
        it: perturbed training cells then sit apart from training controls even when nothing
        perturbed them. ``"decoder"`` (the default) also scores each control decoded with its
        own salient latent, a term that trains the salient encoder and the decoder, so that
        noise fitting is the same for every training cell: training escapers sit where training
        controls sit, and non-targeting guides look far less perturbed. Use it with
        ``independence_weight`` (default 10), which keeps out the background that the term lets
        into the salient latent. ``True`` trains the encoder only (the decoder held fixed);
        ``False`` is the plain contrastive VAE. The term costs a second decoder pass over the
        controls: at 10,000 cells an epoch takes 0.80 times ContrastiveVI's, against 0.70 with
        ``False`` and ``independence_weight=0`` (docs/benchmarks.md, "The defaults from
        0.2.0").
    counterfactual_share
        Share of each step's cells that the pass of ``counterfactual_controls`` decodes, chosen
        at random; the controls among them are scored, weighted so that the term's expectation
        does not change. Lower is faster, and noisier.
    seed
        Seed of the initial network weights (training has its own seed, see :meth:`train`).
    modality
        Modality to model when ``adata`` is a MuData.

    Examples
    --------
    >>> ContrastiveVAE.setup_anndata(adata, perturbation_key="target", control="non-targeting")
    >>> model = ContrastiveVAE(adata)
    >>> model.train()
    >>> adata.obsm["X_salient"] = model.get_latent_representation(kind="salient")
    """

    _module_cls = ContrastivePyroModule
    _training_plan_cls = ContrastiveTrainingPlan
    _data_splitter_cls = PairedDataSplitter
    _train_runner_cls = TrainRunner

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
        wasserstein_weight: float = 0.0,
        background_mmd_weight: float = BACKGROUND_MMD_WEIGHT,
        salient_encoder_sees_group: bool = False,
        responder: bool = False,
        responder_salient_scale: float | None = 0.25,
        salient_effect: Literal["nonlinear", "additive"] = "nonlinear",
        encoder_library_size: float | None = None,
        independence_weight: float = INDEPENDENCE_WEIGHT,
        salient_cross_fitting: bool = False,
        counterfactual_controls: bool | Literal["decoder"] = COUNTERFACTUAL_CONTROLS,
        counterfactual_share: float = 1.0,
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
                n_targets=self.summary_stats.n_targets,
                n_cats_per_cov=tuple(cat_covs_registry.get("n_cats_per_key", ())),
                n_continuous_cov=self.summary_stats.get("n_extra_continuous_covs", 0),
                n_hidden=n_hidden,
                n_layers=n_layers,
                dropout_rate=dropout_rate,
                likelihood=likelihood,
                use_observed_library=use_observed_library,
                library_log_means=None if library_log_means is None else library_log_means.ravel(),
                library_log_vars=None if library_log_vars is None else library_log_vars.ravel(),
                wasserstein_weight=wasserstein_weight,
                background_mmd_weight=background_mmd_weight,
                salient_encoder_sees_group=salient_encoder_sees_group,
                responder=responder,
                responder_salient_scale=responder_salient_scale,
                salient_effect=salient_effect,
                # It raised the responder model's calls, but lowered the plain model's calling
                # and program separation (docs/benchmarks.md, "Responders").
                background_from_controls=responder,
                encoder_library_size=encoder_library_size,
                independence_weight=independence_weight,
                salient_cross_fitting=salient_cross_fitting,
                counterfactual_controls=counterfactual_controls,
                counterfactual_share=counterfactual_share,
            )
        self._model_summary_string = (
            f"ContrastiveVAE: n_salient={n_salient}, n_background={n_background}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}, likelihood={likelihood}, "
            f"observed library={use_observed_library}, wasserstein_weight={wasserstein_weight}, "
            f"background_mmd_weight={background_mmd_weight}, responder={responder}"
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

        Cells whose ``perturbation_key`` label is in ``control`` are the background; missing
        labels and labels in ``exclude`` are excluded from training (they still get latents);
        every other label is a perturbation target.

        Everything is validated before anything is written. Besides scvi-tools' registry
        (``uns['_scvi_uuid']``, ``uns['_scvi_manager_uuid']``), registration writes only these
        obs/obsm entries: ``obs['_scvi_contrastive_group']`` (0 control, 1 target, 2 excluded),
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
            Label(s) of control cells, e.g. ``"non-targeting"``.
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
        setup_method_args = cls._get_setup_method_args(**locals())
        parent_obs = adata.obs if isinstance(adata, MuData) else None
        adata = resolve_modality(adata, modality)
        control_labels = as_label_list(control)
        excluded_labels = as_label_list(exclude)
        categorical_covariate_keys = list(categorical_covariate_keys or [])
        continuous_covariate_keys = list(continuous_covariate_keys or [])
        transferring = kwargs.get("source_registry") is not None

        if not control_labels:
            raise ValueError("control must name at least one control label, e.g. 'non-targeting'.")
        overlap = set(control_labels) & set(excluded_labels)
        if overlap:
            raise ValueError(f"Labels {sorted(overlap)} are both control and excluded.")
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

        fields = [
            # Counts were validated above, with clearer messages than the field's own check.
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
        train_size: float = 0.9,
        lr: float = LEARNING_RATE,
        n_epochs_kl_warmup: int | None = None,
        n_epochs_responder_warmup: int | None = None,
        n_epochs_responder_refinement: int = 0,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        stratify_by_batch: bool = True,
        seed: int = 0,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        strategy: str | Strategy = "auto",
        num_nodes: int = 1,
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train on paired control/perturbed minibatches.

        Interrupting training (Ctrl-C, e.g. in a notebook) keeps the weights and the history
        trained so far, with a warning, and the model can be used. The global random states of
        Python, NumPy and torch are left as they were: training seeds its own, from ``seed``.

        Parameters
        ----------
        max_epochs
            Maximum passes over the larger of the two groups. Default: scvi-tools' heuristic
            (400, fewer above 20,000 training cells).
        batch_size
            Cells per group per step (a step holds a control and a perturbed minibatch).
        train_size
            Fraction of each group and batch used for training; the rest is the validation set.
        lr
            Adam learning rate.
        n_epochs_kl_warmup
            Epochs over which the KL and Wasserstein weight rises from ~0 to 1. Default: a
            quarter of ``max_epochs``.
        n_epochs_responder_warmup
            Epochs during which every perturbed cell is trained as a responder, so that the
            decoder learns to use the salient latent before the responder variable is switched
            on. Default: ``n_epochs_kl_warmup``. Ignored with ``responder=False``.
        n_epochs_responder_refinement
            Experimental, plain model only: after training, compute each training cell's
            responder probability with :meth:`get_responder_probability` (on the training cells
            alone) and train this many more epochs with it as the fixed posterior of the
            responder variable. A cell called a non-responder is then trained like a control:
            decoded without its salient latent and, with ``counterfactual_controls``, also with
            it, through the controls' counterfactual term, so its salient latent no longer fits
            its noise. The validation loss of these epochs is the ordinary one, and they do not
            stop early.
            ``0`` (the default) skips the stage.
        early_stopping
            Stop when the validation ELBO has not improved for ``early_stopping_patience``
            epochs (counted after the warm-up).
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
        plan_kwargs
            Further arguments of :class:`~pertpy_contrastive._training_plan.ContrastiveTrainingPlan`.
        **trainer_kwargs
            Further arguments of :class:`~scvi.train.Trainer` (e.g. ``gradient_clip_val``).
        """
        if n_epochs_responder_refinement and self.module.responder:
            raise ValueError(
                "n_epochs_responder_refinement refines the plain model (responder=False); the "
                "responder=True model sums over its own responder variable. Pass one or the other."
            )
        splitter_kwargs = {
            "train_size": train_size,
            "batch_size": batch_size,
            "seed": seed,
            "stratify_by_batch": stratify_by_batch,
        }
        data_splitter = self._data_splitter_cls(self.adata_manager, **splitter_kwargs)
        if max_epochs is None:
            max_epochs = get_max_epochs_heuristic(data_splitter.n_train)
        if n_epochs_kl_warmup is None:
            n_epochs_kl_warmup = max(1, math.ceil(max_epochs / 4))
        if early_stopping and data_splitter.val_sampler is None:
            logger.warning(
                "No validation cells (train_size=%s): early stopping is off.", train_size
            )
            early_stopping = False
        if n_epochs_responder_warmup is None:
            n_epochs_responder_warmup = n_epochs_kl_warmup
        plan_kwargs = {"lr": lr, **(plan_kwargs or {})}
        trainer_kwargs = {
            "accelerator": accelerator,
            "devices": devices,
            "strategy": strategy,
            "num_nodes": num_nodes,
            # PairedDataSplitter shards its own steps across processes (see PairedBatchSampler).
            "use_distributed_sampler": False,
            "early_stopping_monitor": "loss_validation",
            "early_stopping_patience": early_stopping_patience,
            **trainer_kwargs,
        }
        trainer_kwargs.setdefault(
            "early_stopping_warmup_epochs", min(n_epochs_kl_warmup, max_epochs)
        )
        warmups = {
            "n_epochs_kl_warmup": n_epochs_kl_warmup,
            "n_epochs_responder_warmup": n_epochs_responder_warmup,
        }
        completed = self._run_training(
            data_splitter,
            {**warmups, **plan_kwargs},
            max_epochs,
            early_stopping,
            seed,
            trainer_kwargs,
        )
        if not (completed and n_epochs_responder_refinement):
            return
        responder_weights = self._training_responder_weights(data_splitter.train_idx)
        data_splitter = self._data_splitter_cls(
            self.adata_manager, responder_weights=responder_weights, **splitter_kwargs
        )
        # The refinement continues a trained model: the KL terms keep their full weight.
        refinement_plan = {"n_epochs_kl_warmup": None, "n_steps_kl_warmup": None, **plan_kwargs}
        trainer_kwargs["early_stopping_warmup_epochs"] = 0
        self._run_training(
            data_splitter,
            refinement_plan,
            n_epochs_responder_refinement,
            False,
            seed + 1,
            trainer_kwargs,
        )

    def _run_training(
        self, data_splitter, plan_kwargs, max_epochs, early_stopping, seed, trainer_kwargs
    ) -> bool:
        """One Lightning run through scvi-tools' runner; ``False`` if Ctrl-C interrupted it."""
        self.module.train()  # a trained model is left in eval mode; training resumes from it
        training_plan = self._training_plan_cls(self.module, **plan_kwargs)
        trainer_kwargs = dict(trainer_kwargs)
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
                max_epochs=max_epochs,
                early_stopping=early_stopping,
                **trainer_kwargs,
            )
        interrupt_handler = signal.getsignal(signal.SIGINT)
        try:
            with _seeded_random_state(seed):
                runner()
        except SystemExit:
            # Lightning turns Ctrl-C into a graceful shutdown followed by sys.exit(1), and
            # leaves Ctrl-C ignored for the rest of the session.
            if runner.trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            signal.signal(signal.SIGINT, interrupt_handler)
            self._keep_interrupted_training(data_splitter)
            return False
        finally:
            self.module.eval()  # also after a diverged run, so latents stay deterministic
        if torch.distributed.is_initialized():
            # scvi-tools' logger records the history on rank 0 only; every process returns the
            # same trained model, so it gets the same history too. (Spawn-based strategies
            # return to a process outside the group, which reads rank 0's saved history.)
            self.history_ = runner.trainer.strategy.broadcast(self.history_, src=0)
        return True

    def _training_responder_weights(self, train_indices: np.ndarray) -> np.ndarray:
        """Responder probabilities of the training cells, from a mixture fitted on them alone.

        Held-out cells stay out of the fit, so that the encoder the refinement trains is still
        a function of the training cells only, and the held-out distance test stays exact.
        Controls get 0 and are decoded without s anyway; cells without a trained target are not
        in the training set.
        """
        training_cells = self.adata[train_indices].copy()
        probability = self.get_responder_probability(training_cells)
        weights = np.zeros(self.adata.n_obs, dtype=np.float32)
        weights[train_indices] = np.nan_to_num(probability, nan=0.0)
        return weights

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
        kind: Literal["salient", "background", "response"] = "salient",
        give_mean: bool = True,
        batch_size: int = INFERENCE_BATCH_SIZE,
        modality: str = "rna",
    ) -> np.ndarray:
        """Posterior mean (or one sample) of the salient or background latent of each cell.

        Control cells' salient latents are their encoder output, which training pulls towards 0;
        it is not forced to 0, so it still shows whether a control looks perturbed.

        ``kind="response"`` is the salient latent a cell's expression actually uses, y · s,
        with y the responder variable: its posterior mean P(y = 1 | x) · E[s | x] (with
        :meth:`get_responder_probability` at its defaults). A control or an escaper is decoded
        with s = 0, so its response latent is 0 (near 0 for a likely escaper) and the noise the
        salient encoder fits in a non-responder does not reach it. Use it to rank targets with
        ``pt.tl.Distance``. Its permutation p-values are not calibrated (a control is 0 by
        construction, so controls and a target's cells are not exchangeable): test targets
        with :meth:`distance_test`, on held-out cells. Cells whose label is not a trained
        target get NaN rows; subset to labelled cells first.

        Parameters
        ----------
        adata
            Data to encode; defaults to the data the model was set up with. Must have the
            model's genes in the same order.
        indices
            Cells to encode; default all.
        kind
            ``"salient"`` (perturbation-specific), ``"background"`` (shared) or ``"response"``
            (the salient latent weighted by the responder probability; posterior mean only).
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
            raise ValueError(f"kind must be one of {LATENT_KINDS}, got {kind!r}.")
        if kind == "response":
            if not give_mean:
                raise ValueError(
                    'kind="response" is a posterior mean; pass give_mean=True, or sample '
                    'kind="salient" and get_responder_probability separately.'
                )
            salient = self.get_latent_representation(
                adata, indices, "salient", batch_size=batch_size, modality=modality
            )
            probability = self.get_responder_probability(adata, indices, modality=modality)
            return response_latent(salient, probability)
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
        """:class:`~pertpy_contrastive._constants.CellGroup` code of each registered cell."""
        return self.adata_manager.get_from_registry(GROUP_KEY).ravel().astype(int)

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
            raise FileNotFoundError(
                f"No saved ContrastiveVAE in {str(dir_path)!r}: {model_file} does not exist. Pass "
                "the directory given to model.save() (and its prefix= if one was used)."
            )
        # Read here and again by scvi-tools' load, which has no hook between reading the file and
        # building the model; the checks need the registry first, and the file is a few MB.
        try:
            attributes, var_names, _, _ = _load_saved_files(
                dir_path, load_adata=False, prefix=kwargs.get("prefix"), map_location="cpu"
            )
            registry = attributes["registry_"]
        except Exception as error:
            # torch.load of a damaged or foreign file fails deep in pickle (UnicodeDecodeError,
            # UnpicklingError, RuntimeError, EOFError, ...), with no hint of the file.
            raise ValueError(
                f"{model_file} is not a valid saved ContrastiveVAE: it could not be read "
                f"({type(error).__name__}: {error}). The file is damaged or was not written by "
                "model.save(); save the model again."
            ) from error
        _check_saved_model(registry, dir_path, cls.__name__)
        if adata is not None:
            adata = resolve_modality(adata, modality)
            _check_same_genes(np.asarray(var_names), adata)
        return super().load(dir_path, adata=adata, **kwargs)


def _check_saved_model(registry: dict, dir_path: str, expected: str) -> None:
    """Refuse, with the way out, other models and models saved before the responder model (0.1)."""
    model_name = registry.get("model_name")
    if model_name != expected:
        raise ValueError(
            f"{str(dir_path)!r} holds a saved {model_name or 'unknown'} model, not a "
            f"{expected}. Load it with its own class (e.g. scvi.model.{model_name}.load)."
        )
    fields = registry["field_registries"]
    if GROUP_KEY in fields and TARGET_KEY not in fields:
        raise ValueError(
            f"The model in {dir_path!r} was saved by pertpy-contrastive 0.1, before the responder "
            "model: it has no target registry and no responder parameters, so it cannot be "
            "loaded by this version. Retrain it with this version (its default, "
            "responder=False, is the 0.1 model), or load it with `pip install 'pertpy-contrastive<0.2'`."
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
    raise ValueError(
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
