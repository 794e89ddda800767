"""Shared test helpers."""

import pertpy_contrastive as pc

CONTROL = "non-targeting"
# The options every `pertpy-contrastive run` of the tests passes besides input and output.
RUN_OPTIONS = ["--perturbation-key", "perturbation", "--control", CONTROL, "--no-progress"]
RUN_OPTIONS += ["--batch-size", "32"]


def setup(adata, **kwargs):
    kwargs = {"perturbation_key": "perturbation", "control": CONTROL, **kwargs}
    pc.ContrastiveVAE.setup_anndata(adata, **kwargs)
    return adata


def quick_train(model, **kwargs):
    kwargs = {"max_epochs": 3, "batch_size": 32, "enable_progress_bar": False, **kwargs}
    model.train(**kwargs)
    return model


def strong_program_screen():
    """1500 cells, 200 genes, 6 targets (2 null), 2 programs of 25 genes at log fold change 1.2."""
    return pc.datasets.simulate_screen(
        n_cells=1500,
        n_genes=200,
        n_targets=6,
        n_programs=2,
        n_null_targets=2,
        program_size=25,
        effect_size=1.2,
        seed=3,
    )
