"""Paired, batch-stratified steps and their ELBO weights."""

import numpy as np
import pytest
from _helpers import setup

import pertpy_contrastive as pc
from pertpy_contrastive._constants import CellGroup
from pertpy_contrastive._dataloading import PairedBatchSampler, PairedDataSplitter

BACKGROUND, TARGET, EXCLUDED = CellGroup.BACKGROUND, CellGroup.TARGET, CellGroup.EXCLUDED
CONTRAST = CellGroup.CONTRAST
PERTURBED = [TARGET, CONTRAST]  # decoded with the salient latent: one half of each step


@pytest.fixture
def design():
    rng = np.random.default_rng(0)
    n_cells = 1000
    groups = rng.choice(
        [BACKGROUND, TARGET, CONTRAST, EXCLUDED], size=n_cells, p=[0.1, 0.75, 0.1, 0.05]
    )
    strata = rng.choice(3, size=n_cells, p=[0.5, 0.3, 0.2])
    training = np.flatnonzero(groups != EXCLUDED)
    return groups, strata, training


def _epoch(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_steps_pair_equal_halves_from_one_stratum(design):
    groups, strata, training = design
    sampler = PairedBatchSampler(groups, strata, training, batch_size=32, shuffle=True, seed=0)
    steps = _epoch(sampler)
    assert len(steps) == len(sampler)
    for cells, weights in steps:
        assert len(np.unique(strata[cells])) == 1
        assert (groups[cells] == BACKGROUND).sum() == np.isin(groups[cells], PERTURBED).sum()
        assert not (groups[cells] == EXCLUDED).any()
        assert len(np.unique(cells)) == len(cells)
        assert np.all(np.diff(cells) > 0)
        assert weights.shape == cells.shape and (weights > 0).all()


def test_every_cell_of_the_larger_group_is_seen_each_epoch(design):
    groups, strata, training = design
    sampler = PairedBatchSampler(groups, strata, training, batch_size=32, shuffle=True, seed=0)
    seen = np.concatenate([cells for cells, _ in _epoch(sampler)])
    assert set(training[np.isin(groups[training], PERTURBED)]) <= set(seen)
    expected_steps = 0
    for stratum in range(3):
        n_controls = ((groups == BACKGROUND) & (strata == stratum)).sum()
        n_perturbed = (np.isin(groups, PERTURBED) & (strata == stratum)).sum()
        step_size = min(32, n_controls, n_perturbed)
        expected_steps += int(np.ceil(max(n_controls, n_perturbed) / step_size))
    assert len(sampler) == expected_steps


def test_weights_make_each_step_an_unbiased_estimate(design):
    groups, strata, training = design
    sampler = PairedBatchSampler(groups, strata, training, batch_size=32, shuffle=True, seed=0)
    steps = _epoch(sampler)
    n_steps = len(steps)
    # Averaged over an epoch, the weights of a group sum to its share of the training cells.
    for group in ([BACKGROUND], PERTURBED):
        total = sum(weights[np.isin(groups[cells], group)].sum() for cells, weights in steps)
        share = np.isin(groups[training], group).mean()
        assert total / n_steps == pytest.approx(share, rel=1e-5)
    # And a per-cell quantity averages to its mean over training cells (up to the cycling of
    # the smaller group within an epoch).
    values = np.random.default_rng(1).normal(5, 1, len(groups))
    estimate = np.mean([(weights * values[cells]).sum() for cells, weights in steps])
    assert estimate == pytest.approx(values[training].mean(), rel=0.02)


def test_pairing_is_seeded_by_epoch(design):
    groups, strata, training = design
    sampler = PairedBatchSampler(groups, strata, training, batch_size=32, shuffle=True, seed=0)
    again = PairedBatchSampler(groups, strata, training, batch_size=32, shuffle=True, seed=0)
    first = [cells for cells, _ in _epoch(sampler, 0)]
    assert all(
        np.array_equal(a, b) for a, b in zip(first, [c for c, _ in _epoch(again, 0)], strict=False)
    )
    second = [cells for cells, _ in _epoch(sampler, 1)]
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=False))
    fixed = PairedBatchSampler(groups, strata, training, batch_size=32, shuffle=False, seed=0)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            [c for c, _ in _epoch(fixed, 0)], [c for c, _ in _epoch(fixed, 5)], strict=False
        )
    )


def test_small_stratum_uses_smaller_steps_without_repeats():
    groups = np.array([BACKGROUND] * 5 + [TARGET] * 40 + [BACKGROUND] * 50 + [TARGET] * 60)
    strata = np.array([0] * 45 + [1] * 110)
    sampler = PairedBatchSampler(
        groups, strata, np.arange(len(groups)), batch_size=16, shuffle=True, seed=0
    )
    for cells, _ in sampler:
        assert len(np.unique(cells)) == len(cells)
        if strata[cells[0]] == 0:
            assert len(cells) == 10


def test_stratum_without_controls_is_an_error_only_for_training():
    groups = np.array([TARGET] * 20 + [BACKGROUND] * 10 + [TARGET] * 10)
    strata = np.array([0] * 20 + [1] * 20)
    with pytest.raises(ValueError, match="The batch 0 has no control cells"):
        PairedBatchSampler(groups, strata, np.arange(40), batch_size=4, shuffle=True, seed=0)
    lenient = PairedBatchSampler(
        groups, strata, np.arange(40), batch_size=4, shuffle=False, seed=0, strict=False
    )
    assert all(strata[cells[0]] == 1 for cells, _ in lenient)


def test_controls_and_perturbed_cells_are_split_between_training_and_validation(screen):
    setup(screen)
    model = pc.ContrastiveVAE(screen, n_hidden=8)
    splitter = PairedDataSplitter(model.adata_manager, train_size=0.8, batch_size=32)
    groups = model.cell_groups
    # Target cells and contrast controls are split as one group, whatever their labels.
    for group in ([BACKGROUND], PERTURBED):
        in_group = np.flatnonzero(np.isin(groups, group))
        validation = np.intersect1d(in_group, splitter.val_idx)
        assert len(validation) == pytest.approx(0.2 * len(in_group), abs=2)
        assert not np.intersect1d(validation, splitter.train_idx).size
    assert not np.isin(np.flatnonzero(groups == EXCLUDED), splitter.train_idx).any()
