"""A pooled CRISPR screen in a heterogeneous cell line, with known truth."""

from __future__ import annotations

from dataclasses import dataclass

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
    targets = _draw_targets(rng, n_targets, n_null_targets, n_programs, escape_fraction)
    programs = _draw_programs(rng, n_genes, n_targets, n_programs, program_size, effect_size)
    cells = _draw_cells(rng, targets, n_cells, control_fraction, n_batches, n_subclones)
    log_rate = _background_log_rate(rng, cells, n_genes, n_batches, n_subclones)
    background_log_rate = log_rate.copy() if true_background else None
    _add_perturbation_effects(log_rate, cells, targets, programs.lfc, knockdown_lfc)
    counts = _draw_counts(rng, log_rate, cells.batch, n_batches, mean_library_size)
    adata = _screen_anndata(counts, cells, targets, programs.genes, n_genes)
    adata.uns["simulation"] = {
        "seed": seed,
        "control_label": CONTROL_LABEL,
        "target_program": targets.program,
        "program_lfc": programs.lfc,
        "escape_fraction": escape_fraction,
        "effect_size": effect_size,
    }
    if true_background:
        adata.layers["true_background"] = _proportions(background_log_rate).astype(np.float32)
    return adata


@dataclass(frozen=True)
class _Targets:
    """The perturbation design: each target's program, effect strength and escape rate."""

    names: list[str]
    program: dict[str, str]
    """Program each target drives; ``"none"`` for the null targets."""
    strength: dict[str, float]
    escape: dict[str, float]


def _draw_targets(rng, n_targets, n_null_targets, n_programs, escape_fraction) -> _Targets:
    """Assign the effect-bearing targets to the programs in turn; draw strengths and escape."""
    names = [f"T{i:02d}" for i in range(n_targets)]
    program = {t: "none" for t in names[:n_null_targets]}
    program.update({t: f"P{i % n_programs}" for i, t in enumerate(names[n_null_targets:])})
    strength = {t: rng.uniform(0.7, 1.3) for t in names}
    escape = {t: np.clip(rng.normal(escape_fraction, 0.1), 0.0, 0.9) for t in names}
    return _Targets(names=names, program=program, strength=strength, escape=escape)


@dataclass(frozen=True)
class _Programs:
    """The perturbation programs: gene sets shifted together by the targets that drive them."""

    genes: np.ndarray
    """``(n_programs, program_size)``: the genes of each program, never a targeted gene."""
    lfc: np.ndarray
    """``(n_programs, n_genes)``: each program's log fold change of each gene."""


def _draw_programs(rng, n_genes, n_targets, n_programs, program_size, effect_size) -> _Programs:
    """Draw each program's genes and the signs and sizes of their log fold changes."""
    non_target_genes = np.arange(n_targets, n_genes)
    genes = rng.choice(non_target_genes, size=(n_programs, program_size), replace=False)
    lfc = np.zeros((n_programs, n_genes))
    for p in range(n_programs):
        magnitudes = np.abs(rng.normal(effect_size, 0.25 * effect_size, program_size))
        lfc[p, genes[p]] = magnitudes * rng.choice([-1, 1], program_size)
    return _Programs(genes=genes, lfc=lfc)


@dataclass(frozen=True)
class _Cells:
    """Each cell's guide and background state (arrays over cells)."""

    is_control: np.ndarray
    perturbation: np.ndarray
    batch: np.ndarray
    subclone: np.ndarray
    angle: np.ndarray
    """Cell-cycle phase angle (radians)."""
    stress: np.ndarray
    escaped: np.ndarray

    @property
    def responds(self) -> np.ndarray:
        return ~self.is_control & ~self.escaped


def _draw_cells(rng, targets, n_cells, control_fraction, n_batches, n_subclones) -> _Cells:
    """Draw each cell's guide, batch and background state, and whether it escapes."""
    is_control = rng.random(n_cells) < control_fraction
    perturbation = np.where(is_control, CONTROL_LABEL, rng.choice(targets.names, n_cells))
    batch = rng.integers(n_batches, size=n_cells)
    subclone = rng.choice(n_subclones, size=n_cells, p=rng.dirichlet(np.full(n_subclones, 5.0)))
    angle = rng.uniform(0, 2 * np.pi, n_cells)
    stress = rng.beta(2, 5, n_cells)
    escape_probability = np.array([targets.escape.get(p, 0.0) for p in perturbation])
    escaped = ~is_control & (rng.random(n_cells) < escape_probability)
    return _Cells(
        is_control=is_control,
        perturbation=perturbation,
        batch=batch,
        subclone=subclone,
        angle=angle,
        stress=stress,
        escaped=escaped,
    )


def _background_log_rate(rng, cells, n_genes, n_batches, n_subclones) -> np.ndarray:
    """Draw log expression rates without the perturbations.

    Baseline, two cell-cycle programs, subclones, a stress state and batch effects.
    """
    n_cells = len(cells.angle)
    log_rate = np.tile(rng.normal(0.0, 1.2, n_genes), (n_cells, 1))
    s_phase = _sparse_loadings(rng, n_genes, 0.08, 1.5, positive=True)
    g2m_phase = _sparse_loadings(rng, n_genes, 0.08, 1.5, positive=True)
    log_rate += np.outer(np.maximum(np.cos(cells.angle), 0), s_phase)
    log_rate += np.outer(np.maximum(np.sin(cells.angle), 0), g2m_phase)
    subclone_loadings = np.stack(
        [_sparse_loadings(rng, n_genes, 0.10, 1.0) for _ in range(n_subclones)]
    )
    log_rate += subclone_loadings[cells.subclone]
    log_rate += np.outer(cells.stress, _sparse_loadings(rng, n_genes, 0.06, 2.5, positive=True))
    log_rate += rng.normal(0, 0.25, (n_batches, n_genes))[cells.batch]
    return log_rate


def _add_perturbation_effects(log_rate, cells, targets, program_lfc, knockdown_lfc) -> None:
    """Knock down each responding cell's target gene and shift its target's program, in place."""
    target_index = {t: i for i, t in enumerate(targets.names)}
    for cell in np.flatnonzero(cells.responds):
        target = cells.perturbation[cell]
        log_rate[cell, target_index[target]] += knockdown_lfc
        program = targets.program[target]
        if program != "none":
            log_rate[cell] += targets.strength[target] * program_lfc[int(program[1:])]


def _proportions(log_rate: np.ndarray) -> np.ndarray:
    """Each cell's expected gene proportions from its log rates (rows sum to 1)."""
    rates = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
    return rates / rates.sum(axis=1, keepdims=True)


def _draw_counts(rng, log_rate, batch, n_batches, mean_library_size) -> np.ndarray:
    """Draw negative-binomial counts at library sizes that differ by batch."""
    batch_depth = rng.normal(0, 0.3, n_batches)
    library = np.exp(rng.normal(np.log(mean_library_size) + batch_depth[batch], 0.35))
    mean = _proportions(log_rate) * library[:, None]
    dispersion = np.exp(rng.normal(np.log(5.0), 0.5, log_rate.shape[1]))
    counts = rng.poisson(rng.gamma(dispersion, mean / dispersion))
    # Cells with no counts cannot be modelled; give them one UMI in their most expressed gene.
    empty = counts.sum(axis=1) == 0
    counts[empty, mean[empty].argmax(axis=1)] = 1
    return counts


def _screen_anndata(counts, cells, targets, program_genes, n_genes) -> ad.AnnData:
    """Return the counts with the truth in ``obs`` and ``var`` (``uns`` is the caller's)."""
    n_cells, n_targets = len(counts), len(targets.names)
    phase = np.select(
        [np.cos(cells.angle) > 0.5, np.sin(cells.angle) > 0.5], ["S", "G2M"], default="G1"
    )
    program_of_cell = np.array(
        [
            "none" if cells.is_control[c] else targets.program[cells.perturbation[c]]
            for c in range(n_cells)
        ]
    )
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(cells.perturbation),
            "batch": pd.Categorical([f"batch{b}" for b in cells.batch]),
            "subclone": pd.Categorical([f"clone{c}" for c in cells.subclone]),
            "cell_cycle_angle": cells.angle,
            "cell_cycle_phase": pd.Categorical(phase),
            "stress": cells.stress,
            "program": pd.Categorical(program_of_cell),
            "escaped": cells.escaped,
            "responder": cells.responds & (program_of_cell != "none"),
        },
        index=[f"cell_{i:05d}" for i in range(n_cells)],
    )
    gene_program = np.full(n_genes, "none", dtype=object)
    for p, genes in enumerate(program_genes):
        gene_program[genes] = f"P{p}"
    var = pd.DataFrame(
        {
            "program": pd.Categorical(gene_program),
            "is_target_gene": np.arange(n_genes) < n_targets,
        },
        index=targets.names + [f"gene_{i:04d}" for i in range(n_targets, n_genes)],
    )
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.int32)), obs=obs, var=var)
