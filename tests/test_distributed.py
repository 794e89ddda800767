"""Distributed data-parallel training: two CPU processes (gloo) launched by torchrun."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pertpy_contrastive._dataloading import PairedBatchSampler

TESTS = Path(__file__).parent


def _run(n_processes: int, out_dir: Path, mode: str | None = None) -> list[dict]:
    out_dir.mkdir()
    worker = [str(TESTS / "_ddp_worker.py"), str(out_dir), str(n_processes)]
    worker += [mode] if mode else []
    if n_processes > 1:
        launcher = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n_processes}",
        ]
        worker = launcher + worker
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    # scvi-tools' logger writes lightning_logs/ into the working directory.
    done = subprocess.run(
        [sys.executable, *worker], cwd=out_dir, env=environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if mode == "interrupt":
        return []
    return [
        json.loads((out_dir / f"result_{rank}.json").read_text()) for rank in range(n_processes)
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return {n: (_run(n, root / str(n)), root / str(n)) for n in (1, 2)}


def test_two_processes_share_each_epoch_and_end_with_one_model(runs):
    (single,), _ = runs[1]
    ranks, out_dir = runs[2]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    steps = single["steps"][0]
    for rank in ranks:
        assert rank["steps"] == [math.ceil(steps / 2)] * len(rank["steps"])
    parameters = [torch.load(out_dir / f"parameters_{rank}.pt") for rank in (0, 1)]
    torch.testing.assert_close(parameters[0], parameters[1], rtol=0, atol=0)


def test_history_and_early_stopping_agree_across_processes(runs):
    (single,), _ = runs[1]
    ranks, _ = runs[2]
    assert ranks[0]["history"] == ranks[1]["history"]
    for history in (single["history"], ranks[0]["history"]):
        assert len(history["loss_validation"]) == 3  # stopped early, at epoch 3 of 6
    single_loss = single["history"]["elbo_validation"][-1]
    distributed_loss = ranks[0]["history"]["elbo_validation"][-1]
    # Two processes take half as many optimiser steps per epoch, each on two minibatches.
    assert abs(distributed_loss - single_loss) / single_loss < 0.1


def test_two_processes_resume_from_a_checkpoint_to_the_uninterrupted_weights(tmp_path):
    """Stopped at epoch 3 of 6 and resumed, DDP training ends where it would have ended.

    Exactly: every step's sampling noise is seeded from (seed, epoch, step, process), and the
    checkpoint holds the weights, Adam's state, the epoch and the history so far.
    """
    _run(2, tmp_path / "interrupt", "interrupt")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    resumed = _run(2, tmp_path / "resume", "resume")
    whole = _run(2, tmp_path / "full", "full")
    for rank in (0, 1):
        torch.testing.assert_close(
            torch.load(tmp_path / "resume" / f"parameters_{rank}.pt"),
            torch.load(tmp_path / "full" / f"parameters_{rank}.pt"),
            rtol=0,
            atol=0,
        )
    assert resumed[0]["history"] == whole[0]["history"]
    assert len(whole[0]["history"]["elbo_train"]) == 6


@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_take_disjoint_shares_of_the_same_steps(shuffle):
    groups = np.repeat([0, 1], [70, 130])
    strata = np.zeros(200, dtype=np.int64)
    sampler = PairedBatchSampler(groups, strata, np.arange(200), 16, shuffle=shuffle, seed=4)
    sampler.set_epoch(2)
    unsharded = [tuple(cells) for cells, _ in sampler]
    shares = []
    for rank in range(3):
        sampler.shard(rank, 3)
        sampler.set_epoch(2)
        shares.append([tuple(cells) for cells, _ in sampler])
    assert len(unsharded) == 9
    assert [len(share) for share in shares] == [3, 3, 3]
    assert sorted(step for share in shares for step in share) == sorted(unsharded)
    # 9 steps over 4 ranks: each runs 3, so 3 steps are run twice.
    padded = []
    for rank in range(4):
        sampler.shard(rank, 4)
        padded.extend(tuple(cells) for cells, _ in sampler)
    assert len(padded) == 12 and set(padded) == set(unsharded)
    with pytest.raises(ValueError, match="rank must be in"):
        sampler.shard(4, 4)
