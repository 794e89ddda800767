"""Names and defaults shared by the data registry, the Pyro module, the model and the tools."""

from enum import IntEnum


class CellGroup(IntEnum):
    """Role of a cell in the contrast.

    Background cells (controls) define the shared variation, target cells may carry a
    perturbation effect, excluded cells (unassigned or user-excluded) are never trained on
    but still get latents.
    """

    BACKGROUND = 0
    TARGET = 1
    EXCLUDED = 2


GROUP_KEY = "contrastive_group"
"""Registry key of the per-cell :class:`CellGroup` code (stored in ``obs['_scvi_contrastive_group']``)."""

TARGET_KEY = "contrastive_target"
"""Registry key of each cell's target index (stored in ``obs['_scvi_contrastive_target']``): the
position of its label among the trained targets, or ``NO_TARGET``."""

NO_TARGET = -1
"""Target index of controls and of cells whose label is not a trained target."""

CELL_WEIGHT_KEY = "cell_weight"
"""Minibatch key of the per-cell ELBO weight added by the paired loader."""

RESPONDER_WEIGHT_KEY = "responder_weight"
"""Minibatch key of each cell's probability of having responded, during responder refinement."""

LATENT_KINDS = ("salient", "background", "response")

NORMALISED_LIBRARY_SIZE = 1e4
"""Counts per cell of the normalised expression that the outputs hand out (the denoised layer)."""

LEGACY_ENCODER_LIBRARY_SIZE = 1e4
"""What the encoders normalised each cell's counts to in models saved without that value."""

INFERENCE_BATCH_SIZE = 1024
"""Cells per minibatch when encoding or decoding without gradients."""

TRAINING_BATCH_SIZE = 128
"""Cells per group (controls, perturbed) in a training step."""

LEARNING_RATE = 3e-3
"""Adam learning rate of training."""

BACKGROUND_MMD_WEIGHT = 10.0
"""Weight of the penalty on differences between controls' and perturbed cells' background."""

COUNTERFACTUAL_CONTROLS = "decoder"
"""Controls also train the salient encoder and the decoder, each decoded with its own salient
latent, so that noise fitting is the same for every training cell (docs/benchmarks.md)."""

INDEPENDENCE_WEIGHT = 10.0
"""Weight of the HSIC penalty that keeps background out of perturbed cells' salient latent."""

RESPONDER_GENE_FDR = 0.05
"""Benjamini-Hochberg level at which a gene enters a target's responder effect."""

RESPONDER_FOLDS = 5
"""Folds of the responder calls' cross-fitting."""

DE_DELTA = 0.25
"""Smallest absolute log2 fold change that ``differential_expression`` counts as a change."""

DE_FDR_TARGET = 0.05
"""Posterior expected FDR of the genes ``differential_expression`` flags."""

MAX_REFERENCE_CONTROLS = 20_000
"""Controls that calibrate the background (a random subset, seed 0, of larger control sets).

They are held dense (controls x genes float64, counts and background) for the offset fit, the
responder calls' control p-values and the DE's offset variance; the cap bounds that memory on
genome-scale screens, where 20,000 controls already fix each gene's offset closely.
"""
