"""Shared test helpers."""

import pertpy_contrastive as pc

CONTROL = "non-targeting"


def setup(adata, **kwargs):
    kwargs = {"perturbation_key": "perturbation", "control": CONTROL, **kwargs}
    pc.ContrastiveVAE.setup_anndata(adata, **kwargs)
    return adata


def quick_train(model, **kwargs):
    kwargs = {"max_epochs": 3, "batch_size": 32, "enable_progress_bar": False, **kwargs}
    model.train(**kwargs)
    return model
