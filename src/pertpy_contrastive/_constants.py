"""Names and defaults shared by the data registry, the Pyro module, the model and the tools."""

from enum import IntEnum


class CellGroup(IntEnum):
    """Role of a cell in training.

    Background cells are controls decoded without the salient latent: they teach the model the
    variation that every cell shares. Target cells carry a perturbation label and are decoded
    with it. Contrast cells are controls trained exactly as target cells are; a target is
    compared with them, so that a target with no effect and the contrast controls are two
    samples of one population (see ``docs/model.md``). Excluded cells (unassigned, or excluded
    by the user) are never trained on but still get latents.
    """

    BACKGROUND = 0
    TARGET = 1
    EXCLUDED = 2
    CONTRAST = 3


CONTRAST_SHARE = 0.5
"""Share of the controls trained as contrast controls (the rest train the background)."""

GROUP_KEY = "contrastive_group"
"""Registry key of the per-cell :class:`CellGroup` code (stored in ``obs['_scvi_contrastive_group']``)."""

TARGET_KEY = "contrastive_target"
"""Registry key of each cell's target index (stored in ``obs['_scvi_contrastive_target']``): the
position of its label among the trained targets, or ``NO_TARGET``."""

NO_TARGET = -1
"""Target index of controls and of cells whose label is not a trained target."""

CELL_WEIGHT_KEY = "cell_weight"
"""Minibatch key of the per-cell ELBO weight added by the paired loader."""

LATENT_KINDS = ("salient", "background")

NORMALISED_LIBRARY_SIZE = 1e4
"""Counts per cell of the normalised expression that the outputs hand out (the denoised layer)."""

INFERENCE_BATCH_SIZE = 1024
"""Cells per minibatch when encoding or decoding without gradients."""

TRAINING_BATCH_SIZE = 128
"""Cells per group (controls, perturbed) in a training step."""

TRAIN_SIZE = 0.9
"""Share of each group and batch that trains; the rest is the validation set of early stopping.

Every cell is tested (the contrast controls make the salient latent of training cells testable),
so the validation set only has to tell when the ELBO stops improving.
"""

LEARNING_RATE = 3e-3
"""Adam learning rate of training."""

BACKGROUND_MMD_WEIGHT = 10.0
"""Weight of the penalty on differences between controls' and perturbed cells' background."""

RESPONDER_GENE_FDR = 0.05
"""Benjamini-Hochberg level at which a gene enters a target's responder effect."""

RESPONDER_FOLDS = 5
"""Folds of the responder calls' cross-fitting."""

DE_DELTA = 0.25
"""Smallest absolute log2 fold change that ``differential_expression`` counts as a change."""

DE_FDR_TARGET = 0.05
"""Posterior expected FDR of the genes ``differential_expression`` flags."""

MAX_REFERENCE_CONTROLS = 20_000
"""Contrast controls that calibrate the background (a random subset, seed 0, of larger sets).

They are held dense (controls x genes float64, counts and background) for the offset fit, the
responder calls' control p-values and the DE's offset variance; the cap bounds that memory on
genome-scale screens, where 20,000 controls already fix each gene's offset closely.
"""
