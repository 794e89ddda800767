"""A pooled CRISPR screen in a heterogeneous cell line, with known truth."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._data import InvalidValueError

CONTROL_LABEL = "non-targeting"


def _sparse_loadings(rng, n_genes, fraction, scale, positive=False):
    loadings = np.zeros(n_genes)
    genes = rng.choice(n_genes, size=max(1, int(fraction * n_genes)), replace=False)
    values = np.abs(rng.normal(scale, 0.3 * scale, len(genes)))
    loadings[genes] = values if positive else values * rng.choice([-1, 1], len(genes))
    return loadings


def simulate_screen(
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    n_targets: int = 12,
    n_programs: int = 3,
    n_null_targets: int = 3,
    control_fraction: float = 0.2,
    n_batches: int = 2,
    n_subclones: int = 3,
    escape_fraction: float = 0.3,
    program_size: int = 40,
    effect_size: float = 0.8,
    knockdown_lfc: float = -2.0,
    mean_library_size: float = 3_000.0,
    seed: int = 0,
    true_background: bool = False,
) -> ad.AnnData:
    """Simulate raw UMI counts of a pooled CRISPR screen in a heterogeneous cell line.

    Background variation, shared by control and perturbed cells: two cell-cycle programs driven
    by a phase angle, subclones, a continuous stress state, batch effects, and library size that
    differs by batch. Perturbation effects: gene programs shared by groups of targets (with a
    per-target strength), targets with no effect, on-target knockdown, and a fraction of
    perturbed cells that escape (no effect at all). The background effects are larger than the
    perturbation effects, so a PCA of the counts mixes controls and perturbed cells.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of genes (the first ``n_targets`` are the targeted genes).
    n_targets
        Number of targeted genes, including the null ones.
    n_programs
        Number of perturbation programs; effect-bearing targets are assigned to them in turn.
    n_null_targets
        Targets whose knockout has no effect beyond the knockdown of the target gene itself.
    control_fraction
        Fraction of cells with a non-targeting guide.
    n_batches
        Number of batches (replicates).
    n_subclones
        Number of subclones.
    escape_fraction
        Mean fraction of perturbed cells that escape; each target draws its own around it.
    program_size
        Genes per perturbation program.
    effect_size
        Mean absolute log fold change of a program gene.
    knockdown_lfc
        Log fold change of the targeted gene in responding cells.
    mean_library_size
        Mean total UMIs per cell.
    seed
        Random seed.
    true_background
        Also return each cell's expected expression without its perturbation (dense, so off by
        default), for benchmarks that need the best background removal possible.

    Returns
    -------
    AnnData with sparse integer counts in ``X`` and the truth in ``obs``, ``var`` and ``uns``:

    - ``obs['perturbation']``: target gene, or ``'non-targeting'`` for controls;
      ``obs['batch']``, ``obs['subclone']``, ``obs['cell_cycle_angle']`` (radians),
      ``obs['cell_cycle_phase']`` (G1 / S / G2M), ``obs['stress']``;
    - ``obs['program']``: the program of the cell's target (``'none'`` for controls and null
      targets); ``obs['escaped']``; ``obs['responder']``: perturbed, effect-bearing target and
      not escaped;
    - ``var['program']``: the program a gene belongs to (``'none'`` otherwise),
      ``var['is_target_gene']``;
    - ``uns['simulation']``: parameters, ``target_program`` and the ``program_lfc`` matrix;
    - with ``true_background=True``, ``layers['true_background']``: each cell's expected gene
      proportions from baseline, background and batch alone (float32, rows sum to 1).
    """
    if n_null_targets >= n_targets:
        raise InvalidValueError("n_null_targets must be smaller than n_targets.")
    if n_targets + n_programs * program_size > n_genes:
        raise InvalidValueError("n_genes is too small for the targets and programs requested.")
    rng = np.random.default_rng(seed)
    targets = [f"T{i:02d}" for i in range(n_targets)]
    gene_names = targets + [f"gene_{i:04d}" for i in range(n_targets, n_genes)]

    # Perturbation design: which target drives which program, how strongly, how often it escapes.
    effect_targets = targets[n_null_targets:]
    target_program = {t: "none" for t in targets[:n_null_targets]}
    target_program.update({t: f"P{i % n_programs}" for i, t in enumerate(effect_targets)})
    target_strength = {t: rng.uniform(0.7, 1.3) for t in targets}
    target_escape = {t: np.clip(rng.normal(escape_fraction, 0.1), 0.0, 0.9) for t in targets}

    non_target_genes = np.arange(n_targets, n_genes)
    program_genes = rng.choice(non_target_genes, size=(n_programs, program_size), replace=False)
    program_lfc = np.zeros((n_programs, n_genes))
    for p in range(n_programs):
        magnitudes = np.abs(rng.normal(effect_size, 0.25 * effect_size, program_size))
        program_lfc[p, program_genes[p]] = magnitudes * rng.choice([-1, 1], program_size)

    # Cells: guides, batches, background states.
    is_control = rng.random(n_cells) < control_fraction
    perturbation = np.where(is_control, CONTROL_LABEL, rng.choice(targets, n_cells))
    batch = rng.integers(n_batches, size=n_cells)
    subclone = rng.choice(n_subclones, size=n_cells, p=rng.dirichlet(np.full(n_subclones, 5.0)))
    angle = rng.uniform(0, 2 * np.pi, n_cells)
    stress = rng.beta(2, 5, n_cells)
    escape_probability = np.array([target_escape.get(p, 0.0) for p in perturbation])
    escaped = ~is_control & (rng.random(n_cells) < escape_probability)
    responds = ~is_control & ~escaped

    # Log expression rates: baseline + background + perturbation.
    log_rate = np.tile(rng.normal(0.0, 1.2, n_genes), (n_cells, 1))
    s_phase = _sparse_loadings(rng, n_genes, 0.08, 1.5, positive=True)
    g2m_phase = _sparse_loadings(rng, n_genes, 0.08, 1.5, positive=True)
    log_rate += np.outer(np.maximum(np.cos(angle), 0), s_phase)
    log_rate += np.outer(np.maximum(np.sin(angle), 0), g2m_phase)
    subclone_loadings = np.stack(
        [_sparse_loadings(rng, n_genes, 0.10, 1.0) for _ in range(n_subclones)]
    )
    log_rate += subclone_loadings[subclone]
    log_rate += np.outer(stress, _sparse_loadings(rng, n_genes, 0.06, 2.5, positive=True))
    log_rate += rng.normal(0, 0.25, (n_batches, n_genes))[batch]

    background_log_rate = log_rate.copy() if true_background else None
    target_index = {t: i for i, t in enumerate(targets)}
    for cell in np.flatnonzero(responds):
        target = perturbation[cell]
        log_rate[cell, target_index[target]] += knockdown_lfc
        program = target_program[target]
        if program != "none":
            log_rate[cell] += target_strength[target] * program_lfc[int(program[1:])]

    proportions = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
    proportions /= proportions.sum(axis=1, keepdims=True)
    batch_depth = rng.normal(0, 0.3, n_batches)
    library = np.exp(rng.normal(np.log(mean_library_size) + batch_depth[batch], 0.35))
    mean = proportions * library[:, None]
    dispersion = np.exp(rng.normal(np.log(5.0), 0.5, n_genes))
    counts = rng.poisson(rng.gamma(dispersion, mean / dispersion))
    # Cells with no counts cannot be modelled; give them one UMI in their most expressed gene.
    empty = counts.sum(axis=1) == 0
    counts[empty, mean[empty].argmax(axis=1)] = 1

    phase = np.select([np.cos(angle) > 0.5, np.sin(angle) > 0.5], ["S", "G2M"], default="G1")
    program_of_cell = np.array(
        ["none" if is_control[c] else target_program[perturbation[c]] for c in range(n_cells)]
    )
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(perturbation),
            "batch": pd.Categorical([f"batch{b}" for b in batch]),
            "subclone": pd.Categorical([f"clone{c}" for c in subclone]),
            "cell_cycle_angle": angle,
            "cell_cycle_phase": pd.Categorical(phase),
            "stress": stress,
            "program": pd.Categorical(program_of_cell),
            "escaped": escaped,
            "responder": responds & (program_of_cell != "none"),
        },
        index=[f"cell_{i:05d}" for i in range(n_cells)],
    )
    gene_program = np.full(n_genes, "none", dtype=object)
    for p in range(n_programs):
        gene_program[program_genes[p]] = f"P{p}"
    var = pd.DataFrame(
        {
            "program": pd.Categorical(gene_program),
            "is_target_gene": np.arange(n_genes) < n_targets,
        },
        index=gene_names,
    )
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int32)), obs=obs, var=var)
    adata.uns["simulation"] = {
        "seed": seed,
        "control_label": CONTROL_LABEL,
        "target_program": target_program,
        "program_lfc": program_lfc,
        "escape_fraction": escape_fraction,
        "effect_size": effect_size,
    }
    if true_background:
        background = np.exp(background_log_rate - background_log_rate.max(axis=1, keepdims=True))
        adata.layers["true_background"] = (background / background.sum(1, keepdims=True)).astype(
            np.float32
        )
    return adata
