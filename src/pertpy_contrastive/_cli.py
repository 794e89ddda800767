"""The ``pertpy-contrastive`` command line, for Snakemake and Nextflow pipelines.

``pertpy-contrastive run`` trains on a file and writes every output of
:meth:`~pertpy_contrastive.ContrastiveVAE.write_outputs` into a copy of it; ``pertpy-contrastive
demo`` runs the same job on the bundled Papalexi 2021 subset. Bad input ends with exit code 2
and a one-line reason (the traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import anndata
import mudata
import pertpy as pt

from . import datasets, pp
from ._constants import TRAIN_SIZE, TRAINING_BATCH_SIZE
from ._data import resolve_modality
from ._model import ContrastiveVAE

EXIT_BAD_INPUT = 2
_SUFFIXES = (".h5ad", ".h5mu")


class BadInput(Exception):
    """An input problem the user can fix; reported in one line."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pertpy-contrastive`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        args.handler(args)
    except (BadInput, FileNotFoundError, KeyError, ValueError, TypeError) as error:
        if args.debug:
            raise
        # KeyError wraps its message in quotes; the one-line reason should read as a sentence.
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"pertpy-contrastive: error: {' '.join(str(message).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pertpy-contrastive",
        description=(
            "Contrastive VAE for CRISPR screens: separate each perturbation's effect from the "
            "background variation all cells share, call responders, and write the outputs "
            "pertpy's distance and DE tools read."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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
            "--control non-targeting --batch-key replicate -o screen_contrastive.h5mu"
        ),
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
    run.add_argument("--prefix", default="contrastive", help="prefix of the keys written")
    run.add_argument(
        "--overwrite", action="store_true", help="replace OUT, its model and existing keys"
    )
    _common_options(run)
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo",
        help="run the job on the bundled Papalexi 2021 subset",
        description=(
            "Assign guides with pertpy (assign_to_max_guide, 5 UMIs) on the bundled Papalexi "
            "2021 THP-1 subset, train, write every output of the RNA modality to OUT, and print "
            "the targets with an effect. Nothing is downloaded."
        ),
    )
    demo.add_argument(
        "-o", "--output", type=Path, default=Path("outputs/demo_latents.h5ad"), help="output .h5ad"
    )
    demo.add_argument("--epochs", type=int, default=200, help="maximum epochs (default: 200)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(prefix="contrastive")
    demo.add_argument("--overwrite", action="store_true", help="replace OUT")
    _common_options(demo)
    # Not options: the demo trains at the defaults.
    demo.set_defaults(handler=_demo, train_size=TRAIN_SIZE, batch_size=TRAINING_BATCH_SIZE)
    return parser


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
    _quiet_libraries()
    data = _read(args.input)
    rna = resolve_modality(data, args.modality)
    _step(args, f"read {args.input}: {rna.n_obs} cells x {rna.n_vars} genes")
    # write_outputs checks its own keys; this one is the command's, checked before training.
    run_key = f"{args.prefix}_run"
    if run_key in rna.uns and not args.overwrite:
        raise BadInput(f"uns[{run_key!r}] already exists. Pass --overwrite, or another --prefix.")
    user_keys = (set(rna.obs.columns), set(rna.uns))
    ContrastiveVAE.setup_anndata(
        data,
        perturbation_key=args.perturbation_key,
        control=args.control,
        batch_key=args.batch_key,
        layer=args.layer,
        guide_key=args.guide_key,
        modality=args.modality,
    )
    model = _train(args, data)
    model.write_outputs(
        data, prefix=args.prefix, overwrite=args.overwrite, seed=args.seed, modality=args.modality
    )
    rna.uns[f"{args.prefix}_run"] = _run_record(args, model)
    _write(args, data, model, rna, user_keys)


def _demo(args: argparse.Namespace) -> None:
    if args.output.suffix != ".h5ad":
        raise BadInput(f"demo writes the RNA modality as .h5ad, got {args.output}.")
    _check_output(args.output, args.overwrite)
    _quiet_libraries()
    mdata = datasets.papalexi2021_subset()
    user_keys = (set(mdata["rna"].obs.columns), set(mdata["rna"].uns))
    pt.pp.GuideAssignment().assign_to_max_guide(mdata["gdo"], assignment_threshold=5)
    pp.perturbation_labels(mdata, key_added="perturbation", guide_key_added="guide")
    ContrastiveVAE.setup_anndata(
        mdata,
        perturbation_key="perturbation",
        control="non-targeting",
        batch_key="replicate",
        guide_key="guide",
    )
    model = _train(args, mdata)
    rna = model.write_outputs(mdata, seed=args.seed)
    rna.uns["contrastive_run"] = _run_record(args, model)
    _write(args, rna, model, rna, user_keys)

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


def _train(args, data) -> ContrastiveVAE:
    model = ContrastiveVAE(data)
    validating = args.train_size < 1
    _step(args, "training" + (" (early stopping on the validation ELBO)" if validating else ""))
    model.train(
        max_epochs=args.epochs,
        train_size=args.train_size,
        batch_size=args.batch_size,
        early_stopping=validating,
        enable_progress_bar=not args.no_progress,
        seed=args.seed,
    )
    _step(args, f"trained {model.epochs_trained} epochs; writing the outputs")
    return model


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

    In that order: saving reads the model's registered columns, which the output drops.
    """
    model.save(str(_model_directory(args.output)), overwrite=args.overwrite)
    _drop_registry_keys(rna, *user_keys)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    data.write(args.output)
    _step(args, f"wrote {args.output} and the model to {_model_directory(args.output)}/")


def _step(args: argparse.Namespace, message: str) -> None:
    if not args.no_progress:
        print(f"pertpy-contrastive: {message}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.WARNING)
