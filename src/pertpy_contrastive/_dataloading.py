"""Paired, batch-stratified minibatches of background and target cells.

scvi-tools' ``ContrastiveDataLoader`` zips a background and a target loader, so one step can
contrast controls of one replicate with targets of another. Here each step draws both halves from
the same stratum (batch / replicate), and carries the per-cell ELBO weights that make the
minibatch loss an unbiased estimate of the training-set ELBO.

The sampler yields whole steps and is seeded by ``(seed, epoch)``, so a distributed variant only
has to hand each rank its share of the same step list.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from torch.utils.data import DataLoader, Dataset, Sampler

from ._constants import CELL_WEIGHT_KEY, GROUP_KEY, TRAIN_SIZE, TRAINING_BATCH_SIZE, CellGroup
from ._data import InvalidValueError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _StratumPool:
    """The background controls and the cells decoded with s of one stratum, and how a step draws.

    ``perturbed`` holds the target cells and the contrast controls, which train alike.
    """

    stratum: int
    background: np.ndarray
    perturbed: np.ndarray
    step_size: int
    n_steps: int


def _chunks(pool: np.ndarray, n_chunks: int, size: int, rng: np.random.Generator | None):
    """``n_chunks`` chunks of ``size`` distinct cells, cycling through (shuffled) passes of pool."""
    chunks: list[np.ndarray] = []
    while len(chunks) < n_chunks:
        order = rng.permutation(pool) if rng is not None else pool
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            if len(chunk) < size:  # top up from the same pass, so no cell repeats within a chunk
                chunk = np.concatenate([chunk, order[: size - len(chunk)]])
            chunks.append(chunk)
    return chunks[:n_chunks]


class PairedBatchSampler(Sampler):
    """Yields ``(cell indices, cell weights)`` for one step: a control and a perturbed minibatch.

    The control half holds background controls; the perturbed half holds target cells and
    contrast controls, which are trained alike.

    Both halves of a step come from one stratum. A stratum's steps cover its larger group once
    per epoch and cycle through the smaller one, as scvi-tools' contrastive loader does overall.

    Parameters
    ----------
    groups
        :class:`~pertpy_contrastive._constants.CellGroup` code of every cell in the AnnData.
    strata
        Stratum (batch) code of every cell in the AnnData.
    indices
        The cells of this split.
    batch_size
        Cells per group per step (a step holds up to twice this many cells).
    shuffle
        Draw a new random pairing every epoch; otherwise the pairing is fixed.
    seed
        Seed of the pairing; combined with the epoch set by Lightning.
    strict
        For the training split: raise if a stratum has cells of only one group, and warn when
        a stratum is smaller than a minibatch. Otherwise such strata are skipped or shrunk
        silently.
    stratum_names
        The user's name of each stratum code, for messages (e.g. ``"batch 'rep2' of
        obs['replicate']"``); default: the code.

    Under distributed training (:meth:`shard`), every rank builds the same ordered step list
    from ``(seed, epoch)`` and takes every ``num_replicas``-th step from its rank on, so the
    ranks cover disjoint shares of one epoch's steps. Lightning's own distributed sampler is not
    used: it would shuffle our steps a second time and never pass the epoch on to this sampler,
    so every epoch would repeat the first epoch's pairing.
    """

    def __init__(
        self,
        groups: np.ndarray,
        strata: np.ndarray,
        indices: np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int,
        strict: bool = True,
        stratum_names: Sequence[str] | None = None,
    ):
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank = 0
        self.num_replicas = 1
        self.pools: list[_StratumPool] = []
        for stratum in np.unique(strata[indices]):
            name = f"batch {stratum}" if stratum_names is None else stratum_names[stratum]
            in_stratum = indices[strata[indices] == stratum]
            background = in_stratum[groups[in_stratum] == CellGroup.BACKGROUND]
            perturbed = in_stratum[
                np.isin(groups[in_stratum], [CellGroup.TARGET, CellGroup.CONTRAST])
            ]
            if len(background) == 0 or len(perturbed) == 0:
                if strict:
                    missing = "control" if len(background) == 0 else "perturbed"
                    raise InvalidValueError(
                        f"The {name} has no {missing} cells to train on, so its cells cannot be "
                        "contrasted within their batch. Drop that batch, merge it with another, "
                        "or pass batch_key=None."
                    )
                continue
            step_size = min(batch_size, len(background), len(perturbed))
            if strict and step_size < batch_size:
                logger.warning(
                    "The %s has only %d control or perturbed cells; its steps use %d cells per "
                    "group instead of %d.",
                    name,
                    step_size,
                    step_size,
                    batch_size,
                )
            n_steps = math.ceil(max(len(background), len(perturbed)) / step_size)
            self.pools.append(_StratumPool(int(stratum), background, perturbed, step_size, n_steps))

        self.n_steps = sum(pool.n_steps for pool in self.pools)
        n_cells = sum(len(pool.background) + len(pool.perturbed) for pool in self.pools)
        # Weight = (cells of the group in the stratum) / (draws of that group in the stratum per
        # epoch) * (steps per epoch) / (cells in the split): each step's weighted loss is then an
        # unbiased estimate of the split's mean per-cell negative ELBO.
        self.weights = {
            pool.stratum: tuple(
                self.n_steps * len(cells) / (pool.n_steps * pool.step_size * n_cells)
                for cells in (pool.background, pool.perturbed)
            )
            for pool in self.pools
        }

    def set_epoch(self, epoch: int) -> None:
        """Select the pairing of ``epoch`` (called by Lightning at the start of each epoch)."""
        self.epoch = epoch

    def shard(self, rank: int, num_replicas: int) -> None:
        """Yield only the share of the steps of ``rank`` out of ``num_replicas`` processes."""
        if not 0 <= rank < num_replicas:
            raise InvalidValueError(f"rank must be in [0, {num_replicas}), got {rank}.")
        self.rank = rank
        self.num_replicas = num_replicas

    def __len__(self) -> int:
        return math.ceil(self.n_steps / self.num_replicas)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        steps = []
        for pool in self.pools:
            background = _chunks(pool.background, pool.n_steps, pool.step_size, rng)
            perturbed = _chunks(pool.perturbed, pool.n_steps, pool.step_size, rng)
            weights = np.repeat(
                np.array(self.weights[pool.stratum], dtype=np.float32), pool.step_size
            )
            steps.extend(
                (np.concatenate([controls, cells]), weights)
                for controls, cells in zip(background, perturbed, strict=True)
            )
        order = rng.permutation(len(steps)) if rng is not None else np.arange(len(steps))
        # Every rank must run the same number of steps (DDP averages gradients at each one):
        # the list wraps around to a multiple of num_replicas, so at most num_replicas - 1
        # steps are seen twice per epoch, as with torch's DistributedSampler.
        padded = np.resize(order, len(self) * self.num_replicas)
        for step in padded[self.rank :: self.num_replicas]:
            cells, weights = steps[step]
            # Sorted reads are faster on CSR matrices and required by backed (h5py) data.
            by_position = np.argsort(cells, kind="stable")
            yield cells[by_position], weights[by_position]


class _StepDataset(Dataset):
    """Reads one step's cells from scvi-tools' AnnTorchDataset and attaches their weights."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, step):
        cells, weights = step
        tensors = self.dataset[cells]
        tensors[CELL_WEIGHT_KEY] = weights[:, None]
        return tensors


class PairedDataSplitter(pl.LightningDataModule):
    """Splits each group's cells into train and validation sets, per stratum.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    train_size
        Fraction of each (group, stratum) used for training; the rest validates.
    batch_size
        Cells per group per step.
    seed
        Seed of the split and of the pairing.
    stratify_by_batch
        Pair cells within the registered batch only.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_size: float = TRAIN_SIZE,
        batch_size: int = TRAINING_BATCH_SIZE,
        seed: int = 0,
        stratify_by_batch: bool = True,
    ):
        super().__init__()
        if not 0 < train_size <= 1:
            raise InvalidValueError(f"train_size must be in (0, 1], got {train_size}.")
        self.adata_manager = adata_manager
        self.batch_size = batch_size
        self.seed = seed
        self.groups = adata_manager.get_from_registry(GROUP_KEY).ravel().astype(np.int64)
        if stratify_by_batch:
            self.strata = adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY).ravel()
        else:
            self.strata = np.zeros_like(self.groups)

        rng = np.random.default_rng(seed)
        train, validation = [], []
        # Target cells and contrast controls are split together, as they are trained: which of
        # them trains must not depend on the label (_calling.py relies on it).
        perturbed = np.isin(self.groups, [CellGroup.TARGET, CellGroup.CONTRAST])
        for in_group in (self.groups == CellGroup.BACKGROUND, perturbed):
            for stratum in np.unique(self.strata):
                cells = np.flatnonzero(in_group & (self.strata == stratum))
                cells = rng.permutation(cells)
                n_validation = round((1 - train_size) * len(cells))
                validation.append(cells[:n_validation])
                train.append(cells[n_validation:])
        self.train_idx = np.sort(np.concatenate(train))
        self.val_idx = np.sort(np.concatenate(validation))
        self.test_idx = np.array([], dtype=np.int64)
        self.n_train = len(self.train_idx)
        self.n_val = len(self.val_idx)

        trained = self.groups[self.train_idx]
        for name, n_group in (
            (
                "background controls (the half of the controls that trains the background)",
                int((trained == CellGroup.BACKGROUND).sum()),
            ),
            (
                "perturbed cells and contrast controls",
                int(np.isin(trained, [CellGroup.TARGET, CellGroup.CONTRAST]).sum()),
            ),
        ):
            if n_group < batch_size:
                raise InvalidValueError(
                    f"Only {n_group} {name} are available for training, fewer than one "
                    f"minibatch (batch_size={batch_size}). Pass a smaller batch_size, e.g. "
                    f"batch_size={max(2, n_group // 2)}."
                )
        self.train_sampler = PairedBatchSampler(
            self.groups,
            self.strata,
            self.train_idx,
            batch_size,
            shuffle=True,
            seed=seed,
            stratum_names=_batch_names(adata_manager) if stratify_by_batch else None,
        )
        self.val_sampler = None
        if self.n_val:
            sampler = PairedBatchSampler(
                self.groups,
                self.strata,
                self.val_idx,
                batch_size,
                shuffle=False,
                seed=seed,
                strict=False,
            )
            self.val_sampler = sampler if len(sampler) else None

    def _loader(self, sampler: PairedBatchSampler) -> DataLoader:
        if self.trainer is not None:
            sampler.shard(self.trainer.global_rank, self.trainer.world_size)
        dataset = _StepDataset(self.adata_manager.create_torch_dataset())
        # batch_size=None: the sampler already yields whole steps, read with one call each.
        return DataLoader(dataset, sampler=sampler, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_sampler)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_sampler) if self.val_sampler is not None else []


def _batch_names(adata_manager: AnnDataManager) -> list[str]:
    """How the user names each registered batch code: ``"batch 'rep2' of obs['replicate']"``."""
    registry = adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY)
    return [
        f"batch {str(label)!r} of obs[{registry.original_key!r}]"
        for label in registry.categorical_mapping
    ]
