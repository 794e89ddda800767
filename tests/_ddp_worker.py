"""One process of a DDP training run, launched by ``torchrun`` from ``test_distributed.py``.

Every process trains on the same small screen and writes what the test compares: the final
parameters, its steps per epoch and (from every rank, to check they agree) the history.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _helpers import setup, strong_program_screen

import pertpy_contrastive as pc

INTERRUPTED_AT_EPOCH = 3


class StepCounter(pl.Callback):
    """Training steps this process ran in each epoch."""

    def __init__(self):
        self.steps: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.steps.append(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1] += 1


class Preemption(pl.Callback):
    """Fails every process at the start of an epoch, as a preempted job would stop."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == INTERRUPTED_AT_EPOCH:
            raise RuntimeError("preempted")


def resume(out_dir: Path, n_processes: int, mode: str) -> None:
    """Train 6 epochs whole ("full"), stop at an epoch ("interrupt"), or resume ("resume")."""
    adata = setup(strong_program_screen(), batch_key="batch")
    model = pc.ContrastiveVAE(adata, n_salient=4, n_background=4, seed=0)
    checkpoints = out_dir.parent / "checkpoints"
    arguments = {
        "max_epochs": 6,
        "batch_size": 64,
        "early_stopping": False,
        "accelerator": "cpu",
        "devices": n_processes,
        "strategy": "ddp" if n_processes > 1 else "auto",
        "enable_progress_bar": False,
    }
    if mode == "interrupt":
        try:
            model.train(checkpoint_dir=checkpoints, callbacks=[Preemption()], **arguments)
        except RuntimeError:
            return
        raise AssertionError("training was not interrupted")
    resume_from = checkpoints / "last.ckpt" if mode == "resume" else None
    model.train(resume_from=resume_from, **arguments)
    rank = model.trainer.global_rank
    parameters = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    torch.save(parameters, out_dir / f"parameters_{rank}.pt")
    history = {key: frame.iloc[:, 0].tolist() for key, frame in model.history.items()}
    (out_dir / f"result_{rank}.json").write_text(json.dumps({"history": history}))


def main(out_dir: Path, n_processes: int) -> None:
    adata = setup(strong_program_screen(), batch_key="batch")
    model = pc.ContrastiveVAE(adata, n_salient=4, n_background=4, seed=0)
    counter = StepCounter()
    model.train(
        max_epochs=6,
        batch_size=64,
        accelerator="cpu",
        devices=n_processes,
        strategy="ddp" if n_processes > 1 else "auto",
        # No epoch improves on the first checked one by 1e6, so early stopping must end
        # training at epoch 3 of 6 (1 warm-up epoch, then a patience of 1), on every rank.
        n_epochs_kl_warmup=1,
        early_stopping_patience=1,
        early_stopping_min_delta=1e6,
        enable_progress_bar=False,
        callbacks=[counter],
    )
    rank = model.trainer.global_rank
    parameters = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    torch.save(parameters, out_dir / f"parameters_{rank}.pt")
    history = {key: frame.iloc[:, 0].tolist() for key, frame in model.history.items()}
    result = {"steps": counter.steps, "history": history, "world_size": model.trainer.world_size}
    (out_dir / f"result_{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 3:
        resume(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    else:
        main(Path(sys.argv[1]), int(sys.argv[2]))
