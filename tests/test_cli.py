"""The ``pertpy-contrastive`` command line (``_cli.py``)."""

import json
import subprocess
import sys
from importlib.metadata import entry_points

import anndata
import mudata
import pytest
from _helpers import CONTROL, RUN_OPTIONS

import pertpy_contrastive as pc
from pertpy_contrastive._cli import EXIT_BAD_INPUT, main


def _run(*args):
    return main(["run", *map(str, args), *RUN_OPTIONS])


def test_console_script_is_installed_and_help_is_readable():
    (script,) = entry_points(group="console_scripts", name="pertpy-contrastive")
    assert script.value == "pertpy_contrastive._cli:main"
    result = subprocess.run(
        [sys.executable, "-m", "pertpy_contrastive", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--perturbation-key", "--control", "--batch-key", "--layer", "--epochs", "-o"):
        assert option in result.stdout


def test_run_writes_every_output_the_model_and_the_run_record(screen_file, tmp_path):
    output = tmp_path / "out" / "screen_contrastive.h5ad"
    code = _run(
        screen_file,
        "-o",
        output,
        "--batch-key",
        "batch",
        "--epochs",
        3,
    )
    assert code == 0
    written = anndata.read_h5ad(output)
    original = anndata.read_h5ad(screen_file)
    for key in ("X_contrastive_salient", "X_contrastive_background"):
        assert written.obsm[key].shape[0] == written.n_obs
    assert {"contrastive_denoised", "contrastive_effect"} <= set(written.layers)
    assert {
        "contrastive_p_perturbed",
        "contrastive_class",
        "contrastive_class_global",
        "contrastive_role",
    } <= set(written.obs)
    # The user's data are unchanged, and scvi-tools' bookkeeping is not left behind.
    assert (written.X != original.X).nnz == 0  # both sparse, as simulate_screen writes them
    assert not [key for key in written.obs if key.startswith("_scvi")]
    assert not [key for key in written.uns if key.startswith("_scvi")]
    record = written.uns["contrastive_run"]
    assert record["version"] == pc.__version__
    parameters = json.loads(record["parameters"])
    assert parameters["batch_key"] == "batch" and parameters["epochs"] == 3
    calls = written.uns["contrastive_target_calls"]
    assert set(calls.index) == set(written.obs["perturbation"].astype(str)) - {CONTROL}
    assert calls["pvalue"].between(0, 1).all()
    model = pc.ContrastiveVAE.load(str(tmp_path / "out" / "screen_contrastive_model"), written)
    assert model.is_trained and model.epochs_trained == 3


def test_run_keeps_a_mudata_a_mudata(screen, tmp_path):
    path = tmp_path / "screen.h5mu"
    mudata.MuData({"rna": screen}).write(path)
    output = tmp_path / "screen_out.h5mu"
    assert _run(path, "-o", output, "--epochs", 2, "--train-size", 1) == 0
    written = mudata.read_h5mu(output)
    assert "X_contrastive_salient" in written["rna"].obsm
    # Every cell is tested, with or without validation cells.
    assert "contrastive_target_calls" in written["rna"].uns


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (["missing.h5ad", "-o", "{tmp}/out.h5ad"], "does not exist"),
        (["{input}", "-o", "{tmp}/out.csv"], "must end in .h5ad or .h5mu"),
        (["{input}", "-o", "{tmp}/out.h5mu"], "write an .h5ad input to .h5ad"),
        (["{input}", "-o", "{input}"], "exists. Pass --overwrite"),
        (["{input}", "-o", "{tmp}/out.h5ad", "--batch-key", "no_such_column"], "no_such_column"),
    ],
)
def test_bad_input_exits_with_a_one_line_reason(screen_file, tmp_path, capsys, arguments, reason):
    filled = [a.format(tmp=tmp_path, input=screen_file) for a in arguments]
    assert _run(*filled) == EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("pertpy-contrastive: error:")
    assert reason in error[0]
    assert not (tmp_path / "out.h5ad").exists()


def test_no_controls_is_a_bad_input_and_debug_shows_the_traceback(screen_file, tmp_path, capsys):
    arguments = ["run", str(screen_file), "-o", str(tmp_path / "out.h5ad"), "--no-progress"]
    arguments += ["--batch-size", "32"]
    arguments += ["--perturbation-key", "perturbation", "--control", "no-such-label"]
    assert main(arguments) == EXIT_BAD_INPUT
    assert "no-such-label" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no-such-label"):
        main([*arguments, "--debug"])


def test_demo_writes_and_prints_the_target_calls(tmp_path, capsys):
    output = tmp_path / "demo.h5ad"
    assert main(["demo", "-o", str(output), "--epochs", "2", "--no-progress"]) == 0
    rna = anndata.read_h5ad(output)
    calls = rna.uns["contrastive_target_calls"]
    assert CONTROL not in calls.index and len(calls) > 20
    assert calls["pvalue"].between(0, 1).all()
    assert json.loads(rna.uns["contrastive_run"]["parameters"])["train_size"] == 0.9
    printed = capsys.readouterr().out
    assert "against the contrast controls" in printed
    for target in calls.index[calls["pvalue"] < 0.05]:
        assert f"  {target} " in printed
