"""The ``pertpy-contrastive`` command line, for Snakemake, Nextflow and SLURM pipelines.

``pertpy-contrastive run`` trains on a file and writes every output of
:meth:`~pertpy_contrastive.ContrastiveVAE.write_outputs` into a copy of it; ``pertpy-contrastive
demo`` runs the same pipeline on the bundled Papalexi 2021 subset. A scheduler trusts the exit
code, so it says what happened (``EXIT_CODES``), and a run that did not finish writes nothing
under the output's name: the output file and the model directory are written under temporary
names and renamed when whole.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
import traceback
import warnings
from importlib.metadata import version
from pathlib import Path

import anndata
import mudata
import pertpy as pt

from . import datasets, pp
from ._constants import TRAIN_SIZE, TRAINING_BATCH_SIZE
from ._data import InvalidInputError, resolve_modality
from ._files import written_whole
from ._model import CHECKPOINT_NAME, ContrastiveVAE
from ._training_plan import TrainingTerminatedError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}    every stage completed and the outputs are written
  {EXIT_BAD_INPUT}    bad input (a missing file or key, no controls, ...): nothing was trained
  {EXIT_INTERRUPTED}  interrupted by Ctrl-C (SIGINT): nothing written under the output's name
  {EXIT_TERMINATED}  terminated by SIGTERM (a time limit, a preemption): nothing written;
       with --checkpoint-dir, the same command resumes from the last checkpoint
  {EXIT_FAILED}    any other failure (the reason is printed; --debug shows the traceback)
"""
_SUFFIXES = (".h5ad", ".h5mu")
_RUN_FILE = "run.json"
"""What a checkpoint directory records of the run it belongs to."""
_TRAINING_PARAMETERS = (
    "perturbation_key",
    "control",
    "batch_key",
    "layer",
    "guide_key",
    "modality",
    "epochs",
    "train_size",
    "batch_size",
    "seed",
)
"""The options a run resumed from a checkpoint must share with the run that saved it."""


class BadInput(InvalidInputError):
    """An input problem of the command's own options; reported in one line."""


class Terminated(Exception):
    """SIGTERM arrived; raised from the signal handler so that nothing is left half-written."""


class Interrupted(Exception):
    """Ctrl-C stopped training; the library keeps the partial model, the command does not."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pertpy-contrastive`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    with _sigterm_raises():
        try:
            args.handler(args)
        except (KeyboardInterrupt, Interrupted):
            return _report(args, "interrupted (Ctrl-C); nothing written", EXIT_INTERRUPTED)
        except (Terminated, TrainingTerminatedError):
            return _report(args, "terminated (SIGTERM); nothing written", EXIT_TERMINATED)
        except InvalidInputError as error:
            if args.debug:
                raise
            return _report(args, f"error: {error}", EXIT_BAD_INPUT)
        except Exception as error:
            if args.debug:
                raise
            return _report(args, f"failed: {type(error).__name__}: {error}", EXIT_FAILED)
    return EXIT_OK


def _report(args: argparse.Namespace, message: str, code: int) -> int:
    """Print a one-line reason (the traceback too with --debug); return the exit code."""
    if args.debug:
        traceback.print_exc()
    print(f"pertpy-contrastive: {' '.join(message.split())}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into :class:`Terminated` while the command runs.

    By default SIGTERM would end the process at once, with no exit code of ours and possibly a
    half-written file. As an exception it unwinds: the temporary outputs are removed, and
    ``main`` returns 143. During training Lightning calls this handler after its own.
    """

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pertpy-contrastive",
        description=(
            "Contrastive VAE for CRISPR screens: separate each perturbation's effect from the "
            "background variation all cells share, call responders, and write the outputs "
            "pertpy's distance and DE tools read."
        ),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_command(commands)
    _add_demo_command(commands)
    return parser


def _add_run_command(commands) -> None:
    """Add ``run``: train on a file and write every output into a copy of it."""
    run = commands.add_parser(
        "run",
        help="train on a screen and write every output",
        description=(
            "Train a ContrastiveVAE on INPUT and write a copy of it with every output to OUT: "
            "obsm X_<prefix>_salient/_background, layers <prefix>_denoised and "
            "<prefix>_effect, obs <prefix>_p_perturbed/_class/_class_global/_role, uns "
            "<prefix>_target_calls (the E-distance test of each target against the contrast "
            "controls, every cell), <prefix>_responder_fractions and <prefix>_run (this run's "
            "parameters and package version). The trained model is saved beside OUT, in OUT's "
            "name with the suffix _model/. A MuData gets the outputs in its --modality."
        ),
        epilog=(
            "example: pertpy-contrastive run screen.h5mu --perturbation-key perturbation "
            "--control non-targeting --batch-key replicate -o screen_contrastive.h5mu\n\n"
            + EXIT_CODES
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("input", type=Path, metavar="INPUT", help="an .h5ad or .h5mu file")
    run.add_argument("-o", "--output", type=Path, required=True, help="output .h5ad or .h5mu")
    run.add_argument(
        "--perturbation-key",
        required=True,
        help="obs column of each cell's perturbation label (its target)",
    )
    run.add_argument("--control", required=True, help="label of the control cells")
    run.add_argument("--batch-key", help="obs column of the batch (replicate, lane)")
    run.add_argument("--layer", help="layer of raw counts (default: X)")
    run.add_argument("--guide-key", help="obs column of each cell's guide, for per-guide fractions")
    run.add_argument(
        "--modality", default="rna", help="modality of a MuData to model (default: rna)"
    )
    run.add_argument("--epochs", type=int, help="maximum epochs (default: scvi-tools' heuristic)")
    run.add_argument(
        "--train-size",
        type=float,
        default=TRAIN_SIZE,
        help=(
            "share of cells to train on; the rest tell early stopping when to stop "
            f"(default: {TRAIN_SIZE})"
        ),
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=TRAINING_BATCH_SIZE,
        help=f"cells per group per step (default: {TRAINING_BATCH_SIZE})",
    )
    run.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    run.add_argument(
        "--checkpoint-dir",
        type=Path,
        help=(
            "save a training checkpoint here every --checkpoint-every epochs; a run that finds "
            "a checkpoint of the same input and options there resumes from it"
        ),
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="epochs between checkpoints (default: 1)",
    )
    run.add_argument("--prefix", default="contrastive", help="prefix of the keys written")
    run.add_argument(
        "--overwrite", action="store_true", help="replace OUT, its model and existing keys"
    )
    _common_options(run)
    run.set_defaults(handler=_run)


def _add_demo_command(commands) -> None:
    """Add ``demo``: the pipeline of ``run`` on the bundled Papalexi 2021 subset."""
    demo = commands.add_parser(
        "demo",
        help="run the job on the bundled Papalexi 2021 subset",
        description=(
            "Assign guides with pertpy (assign_to_max_guide, 5 UMIs) on the bundled Papalexi "
            "2021 THP-1 subset, train, write every output of the RNA modality to OUT, and print "
            "the targets with an effect. Nothing is downloaded."
        ),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "-o", "--output", type=Path, default=Path("outputs/demo_latents.h5ad"), help="output .h5ad"
    )
    demo.add_argument("--epochs", type=int, default=200, help="maximum epochs (default: 200)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(prefix="contrastive")
    demo.add_argument("--overwrite", action="store_true", help="replace OUT")
    _common_options(demo)
    # Not options: the demo trains at the defaults, without checkpoints.
    demo.set_defaults(
        handler=_demo,
        train_size=TRAIN_SIZE,
        batch_size=TRAINING_BATCH_SIZE,
        checkpoint_dir=None,
        checkpoint_every=1,
    )


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar and the steps"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _run(args: argparse.Namespace) -> None:
    _check_output(args.output, args.overwrite)
    if not args.input.exists():
        raise BadInput(f"{args.input} does not exist.")
    if args.input.suffix != args.output.suffix:
        raise BadInput(
            f"-o {args.output}: write an .h5ad input to .h5ad and an .h5mu input to .h5mu."
        )
    if not 0 < args.train_size <= 1:
        raise BadInput(f"--train-size must be in (0, 1], got {args.train_size}.")
    resume_from = _checkpoint_to_resume(args)
    _quiet_libraries()
    data = _read(args.input)
    rna = resolve_modality(data, args.modality)
    _step(args, f"read {args.input}: {rna.n_obs} cells x {rna.n_vars} genes")
    # write_outputs checks its own keys; this one is the command's, checked before training.
    run_key = f"{args.prefix}_run"
    if run_key in rna.uns and not args.overwrite:
        raise BadInput(f"uns[{run_key!r}] already exists. Pass --overwrite, or another --prefix.")
    setup = {
        "perturbation_key": args.perturbation_key,
        "control": args.control,
        "batch_key": args.batch_key,
        "layer": args.layer,
        "guide_key": args.guide_key,
        "modality": args.modality,
    }
    run_pipeline(args, data, setup, resume_from)


def _demo(args: argparse.Namespace) -> None:
    if args.output.suffix != ".h5ad":
        raise BadInput(f"demo writes the RNA modality as .h5ad, got {args.output}.")
    _check_output(args.output, args.overwrite)
    _quiet_libraries()
    mdata = datasets.papalexi2021_subset()
    pt.pp.GuideAssignment().assign_to_max_guide(mdata["gdo"], assignment_threshold=5)
    pp.perturbation_labels(mdata, key_added="perturbation", guide_key_added="guide")
    setup = {
        "perturbation_key": "perturbation",
        "control": "non-targeting",
        "batch_key": "replicate",
        "guide_key": "guide",
    }
    rna = run_pipeline(args, mdata, setup, resume_from=None, write=mdata["rna"])
    calls = rna.uns["contrastive_target_calls"]
    fractions = rna.uns["contrastive_responder_fractions"]
    print(f"Papalexi 2021 THP-1 subset: {rna.n_obs} cells x {rna.n_vars} genes")
    print(
        "Targets with an effect, p < 0.05 in the E-distance permutation test of every cell "
        "against the contrast controls (uns['contrastive_target_calls']), with the responder "
        "fraction of their cells:"
    )
    for target, row in calls[calls["pvalue"] < 0.05].sort_values("pvalue").iterrows():
        fraction = fractions.loc[target]
        print(
            f"  {target:<10} p = {row['pvalue']:.3f} ({int(row['n_cells'])} cells); responders "
            f"{fraction['responder_fraction']:.2f} "
            f"[{fraction['ci_low']:.2f}, {fraction['ci_high']:.2f}]"
        )


def run_pipeline(args, data, setup: dict, resume_from: Path | None, write=None):
    """Set up, train, write every output, and save the data and the model whole; return the RNA.

    The one pipeline of ``run`` and ``demo``. ``write`` is what goes to ``args.output``
    (default: ``data`` itself, AnnData or MuData).
    """
    rna = resolve_modality(data, setup.get("modality", "rna"))
    user_keys = (set(rna.obs.columns), set(rna.uns))
    ContrastiveVAE.setup_anndata(data, **setup)
    model = ContrastiveVAE(data)
    validating = args.train_size < 1
    _step(args, "training" + (" (early stopping on the validation ELBO)" if validating else ""))
    if resume_from is not None:
        # Always said, progress or not: a pipeline's log must show that this run resumed.
        print(f"pertpy-contrastive: resuming from {resume_from}", file=sys.stderr, flush=True)
    model.train(
        max_epochs=args.epochs,
        train_size=args.train_size,
        batch_size=args.batch_size,
        early_stopping=validating,
        enable_progress_bar=not args.no_progress,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every_n_epochs=args.checkpoint_every,
        resume_from=resume_from,
    )
    if model.training_status == "interrupted":
        raise Interrupted
    _step(args, f"trained {model.epochs_trained} epochs ({model.training_status}); writing")
    model.write_outputs(
        data,
        prefix=args.prefix,
        overwrite=args.overwrite,
        seed=args.seed,
        modality=setup.get("modality", "rna"),
        progress_bar=not args.no_progress,
    )
    rna.uns[f"{args.prefix}_run"] = _run_record(args, model)
    _write(args, data if write is None else write, model, rna, user_keys)
    return rna


def _checkpoint_to_resume(args: argparse.Namespace) -> Path | None:
    """Return the checkpoint of this very run in ``--checkpoint-dir``, if there is one.

    The directory records the run it belongs to (``run.json``: the input file and the options
    that shape training); a checkpoint of another run is refused, not silently continued.
    """
    if args.checkpoint_dir is None:
        return None
    if args.checkpoint_every < 1:
        raise BadInput(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}.")
    record = {
        "input": str(args.input.resolve()),
        "input_bytes": args.input.stat().st_size,
        "input_modified_ns": args.input.stat().st_mtime_ns,
        **{key: getattr(args, key) for key in _TRAINING_PARAMETERS},
    }
    record_file = args.checkpoint_dir / _RUN_FILE
    checkpoint = args.checkpoint_dir / f"{CHECKPOINT_NAME}.ckpt"
    if record_file.exists():
        saved = json.loads(record_file.read_text())
        differ = sorted(key for key in {*saved, *record} if saved.get(key) != record.get(key))
        if differ:
            raise BadInput(
                f"--checkpoint-dir {args.checkpoint_dir} holds a checkpoint of another run "
                f"({', '.join(differ)} differ). Pass another --checkpoint-dir, or remove it to "
                "start afresh."
            )
        return checkpoint if checkpoint.exists() else None
    if checkpoint.exists():
        raise BadInput(
            f"--checkpoint-dir {args.checkpoint_dir} holds a checkpoint that no "
            "pertpy-contrastive run recorded. Pass another --checkpoint-dir."
        )
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    return None


def _run_record(args: argparse.Namespace, model) -> dict:
    """Return the run's parameters and package version, for ``uns['<prefix>_run']``."""
    parameters = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in ("handler", "debug", "no_progress", "overwrite") and value is not None
    }
    return {
        "command": "pertpy-contrastive " + args.command,
        "parameters": json.dumps(parameters, sort_keys=True),
        "version": version("pertpy-contrastive"),
        "epochs_trained": model.epochs_trained,
        "training": model.training_status,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _drop_registry_keys(adata, obs_columns: set, uns_keys: set) -> None:
    """Remove the ``_scvi_*`` bookkeeping ``setup_anndata`` added; the saved model keeps it."""
    added = [key for key in adata.obs.columns if key.startswith("_scvi") and key not in obs_columns]
    adata.obs = adata.obs.drop(columns=added)
    for key in [key for key in adata.uns if key.startswith("_scvi") and key not in uns_keys]:
        del adata.uns[key]


def _check_output(output: Path, overwrite: bool) -> None:
    if output.suffix not in _SUFFIXES:
        raise BadInput(f"-o {output}: the output must end in .h5ad or .h5mu.")
    if output.exists() and not overwrite:
        raise BadInput(f"{output} exists. Pass --overwrite to replace it, or another -o.")
    if _model_directory(output).exists() and not overwrite:
        raise BadInput(
            f"{_model_directory(output)} exists. Pass --overwrite to replace it, or another -o."
        )


def _model_directory(output: Path) -> Path:
    return output.with_name(output.stem + "_model")


def _read(path: Path):
    if path.suffix == ".h5ad":
        return anndata.read_h5ad(path)
    if path.suffix == ".h5mu":
        return mudata.read_h5mu(path)
    raise BadInput(f"{path}: the input must be an .h5ad or .h5mu file.")


def _write(args: argparse.Namespace, data, model, rna, user_keys) -> None:
    """Save the model beside the output, then write the data without scvi-tools' bookkeeping.

    In that order: saving reads the model's registered columns, which the output drops. Both
    go under temporary names first and are renamed once whole (``written_whole``): the model
    first, the output last, so that an output that exists (what a pipeline checks) has its model.
    """
    args.output.parent.mkdir(parents=True, exist_ok=True)
    model_directory = _model_directory(args.output)
    with written_whole(args.output) as partial, written_whole(model_directory) as partial_model:
        model.save(str(partial_model), overwrite=True)
        _drop_registry_keys(rna, *user_keys)
        data.write(partial)
    _step(args, f"wrote {args.output} and the model to {model_directory}/")


def _step(args: argparse.Namespace, message: str) -> None:
    if not args.no_progress:
        print(f"pertpy-contrastive: {message}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.WARNING)
