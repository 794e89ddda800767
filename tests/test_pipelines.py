"""Safe in pipelines: signals, exit codes, outputs written whole, checkpoints and resuming."""

import json
import os
import signal
import subprocess
import sys
import time

import anndata
import numpy as np
import pytest
import torch
from _helpers import RUN_OPTIONS, quick_train, setup
from lightning.pytorch.callbacks import Callback

import pertpy_contrastive as pc
from pertpy_contrastive import _cli, _expression
from pertpy_contrastive._cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    main,
)


class _AtEpoch(Callback):
    """Calls ``action`` at the end of the first training step of ``epoch``."""

    def __init__(self, epoch: int, action):
        self.epoch, self.action = epoch, action

    def on_train_batch_end(self, trainer, *args):
        if trainer.current_epoch == self.epoch and args[-1] == 0:
            self.action()


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def _fail():
    raise RuntimeError("boom in training")


def _parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.module.parameters()])


# -- the library ---------------------------------------------------------------------------


def test_sigterm_in_training_is_an_error_and_leaves_the_model_untrained(screen):
    setup(screen, batch_key="batch")
    model = pc.ContrastiveVAE(screen)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(pc.TrainingTerminatedError, match="received SIGTERM"):
        quick_train(model, max_epochs=10, callbacks=[_AtEpoch(2, _sigterm)])
    assert not model.is_trained and model.training_status is None
    assert signal.getsignal(signal.SIGTERM) is handler
    with pytest.raises(RuntimeError, match="train"):
        model.get_latent_representation()


def test_an_error_in_training_propagates_without_scvi_tools_name_error_line(screen, capsys):
    """scvi-tools' runner printed "Exception raised during training. <class 'NameError'>"."""
    setup(screen, batch_key="batch")
    model = pc.ContrastiveVAE(screen)
    with pytest.raises(RuntimeError, match="boom in training"):
        quick_train(model, max_epochs=5, callbacks=[_AtEpoch(1, _fail)])
    printed = capsys.readouterr()
    assert "NameError" not in printed.out + printed.err
    assert not model.is_trained and model.training_status is None


def test_training_status_is_recorded_and_written_with_the_outputs(screen):
    setup(screen, batch_key="batch")
    completed = quick_train(pc.ContrastiveVAE(screen), max_epochs=3, early_stopping=False)
    assert completed.training_status == "completed"
    stopped = quick_train(
        pc.ContrastiveVAE(screen),
        max_epochs=8,
        n_epochs_kl_warmup=1,
        early_stopping_patience=1,
        early_stopping_min_delta=1e6,
    )
    assert stopped.training_status == "stopped early" and stopped.epochs_trained < 8
    stopped.write_outputs(n_perms=20)
    assert screen.uns["contrastive"]["training"] == "stopped early"


def test_resuming_from_a_checkpoint_ends_with_the_uninterrupted_weights(screen, tmp_path):
    """Exactly: every step's noise is seeded from (seed, epoch, step, process)."""
    setup(screen, batch_key="batch")
    arguments = {"max_epochs": 6, "seed": 3, "early_stopping": False}
    whole = quick_train(pc.ContrastiveVAE(screen, seed=3), **arguments)
    stopped = pc.ContrastiveVAE(screen, seed=3)
    with pytest.raises(RuntimeError, match="boom"):
        quick_train(stopped, checkpoint_dir=tmp_path, callbacks=[_AtEpoch(4, _fail)], **arguments)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]
    resumed = quick_train(
        pc.ContrastiveVAE(screen, seed=3), resume_from=tmp_path / "last.ckpt", **arguments
    )
    torch.testing.assert_close(_parameters(resumed), _parameters(whole), rtol=0, atol=0)
    assert resumed.epochs_trained == 6 and resumed.training_status == "completed"
    for key, frame in whole.history.items():
        np.testing.assert_array_equal(resumed.history[key].to_numpy(), frame.to_numpy())
    # A checkpoint is refused by another run, with what differs.
    with pytest.raises(ValueError, match=r"another run \(different train.seed\)"):
        quick_train(
            pc.ContrastiveVAE(screen, seed=3),
            resume_from=tmp_path / "last.ckpt",
            **{**arguments, "seed": 4},
        )
    with pytest.raises(FileNotFoundError, match="is not a file"):
        quick_train(pc.ContrastiveVAE(screen), resume_from=tmp_path / "missing.ckpt")


def test_the_layers_file_is_written_whole_or_not_at_all(screen, tmp_path, monkeypatch):
    setup(screen, batch_key="batch")
    model = quick_train(pc.ContrastiveVAE(screen), max_epochs=2)
    written = []
    real = _expression.ExpressionMixin._background_removed_counts

    def denoised_then_killed(self, *args, **kwargs):
        written.append(1)
        return real(self, *args, **kwargs)

    def killed(*args, **kwargs):
        # After the first layer's chunk is in the file: a kill halfway through the write.
        assert written
        raise KeyboardInterrupt

    monkeypatch.setattr(
        _expression.ExpressionMixin, "_background_removed_counts", denoised_then_killed
    )
    monkeypatch.setattr(_expression.ExpressionMixin, "_effect", killed)
    layers_file = tmp_path / "layers.h5ad"
    with pytest.raises(KeyboardInterrupt):
        model.write_outputs(layers_file=layers_file, n_perms=20, progress_bar=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one
    assert "X_contrastive_salient" not in screen.obsm  # nothing written into the AnnData


# -- the command line ------------------------------------------------------------------------


def _command(*arguments):
    return [sys.executable, "-m", "pertpy_contrastive", "run", *map(str, arguments), *RUN_OPTIONS]


def _signal_during_training(command, signum, cwd):
    """Start ``command``, send ``signum`` once its first checkpoint exists, and let it finish."""
    # A shell without job control starts background jobs (e.g. a CI step) with SIGINT ignored,
    # which the child would inherit; a user's terminal does not.
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = cwd / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be signalled"
    process.send_signal(signum)
    _, process.stderr_text = process.communicate(timeout=120)
    return process


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, EXIT_TERMINATED), (signal.SIGINT, EXIT_INTERRUPTED)]
)
def test_a_signalled_run_exits_with_its_code_and_writes_nothing(
    screen_file, tmp_path, signum, code
):
    output = tmp_path / "out.h5ad"
    command = _command(screen_file, "-o", output, "--epochs", 2000)
    command += ["--checkpoint-dir", str(tmp_path / "checkpoints")]
    process = _signal_during_training(command, signum, tmp_path)
    assert process.returncode == code, process.stderr_text[-3000:]
    assert not output.exists() and not (tmp_path / "out_model").exists()
    assert not [path for path in tmp_path.iterdir() if ".partial" in path.name]


def test_a_terminated_run_resumes_from_its_checkpoint(screen_file, tmp_path):
    output = tmp_path / "out.h5ad"
    command = _command(screen_file, "-o", output, "--epochs", 40)
    command += ["--checkpoint-dir", str(tmp_path / "checkpoints"), "--train-size", "1"]
    process = _signal_during_training(command, signal.SIGTERM, tmp_path)
    assert process.returncode == EXIT_TERMINATED and not output.exists()
    record = json.loads((tmp_path / "checkpoints" / "run.json").read_text())
    assert record["epochs"] == 40 and record["input"] == str(screen_file.resolve())

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    written = anndata.read_h5ad(output)
    assert json.loads(written.uns["contrastive_run"]["parameters"])["epochs"] == 40
    assert written.uns["contrastive_run"]["epochs_trained"] == 40

    other = _command(screen_file, "-o", tmp_path / "other.h5ad", "--epochs", 40, "--seed", 1)
    other += ["--checkpoint-dir", str(tmp_path / "checkpoints"), "--train-size", "1"]
    refused = subprocess.run(other, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert refused.returncode == EXIT_BAD_INPUT
    assert "holds a checkpoint of another run (seed differ)" in refused.stderr


def test_a_kill_while_writing_leaves_no_output(screen_file, tmp_path, monkeypatch):
    def terminated_midway(self, filename, *args, **kwargs):
        filename.write_bytes(b"half an h5ad file")
        raise _cli.Terminated

    monkeypatch.setattr(anndata.AnnData, "write", terminated_midway)
    output = tmp_path / "out.h5ad"
    code = main(["run", str(screen_file), "-o", str(output), "--epochs", "2", *RUN_OPTIONS])
    assert code == EXIT_TERMINATED
    assert sorted(path.name for path in tmp_path.iterdir()) == ["screen.h5ad"]


def test_failures_that_are_not_bad_input_exit_1(screen_file, tmp_path, monkeypatch, capsys):
    def internal_error(*args, **kwargs):
        raise KeyError("an internal lookup")

    monkeypatch.setattr(pc.ContrastiveVAE, "write_outputs", internal_error)
    output = tmp_path / "out.h5ad"
    code = main(["run", str(screen_file), "-o", str(output), "--epochs", "2", *RUN_OPTIONS])
    assert code == EXIT_FAILED
    assert "failed: KeyError" in capsys.readouterr().err
    assert not output.exists()


def test_exit_codes_are_documented_in_help():
    result = subprocess.run(
        [sys.executable, "-m", "pertpy_contrastive", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for code in (0, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_FAILED):
        assert f"  {code} " in result.stdout
