"""Plots of the model's outputs: latents, target ranking, responder probabilities, training.

These are functions, not model methods: they read only what
:meth:`~pertpy_contrastive.ContrastiveVAE.write_outputs` writes to the AnnData and the table
:meth:`~pertpy_contrastive.ContrastiveVAE.distance_test` returns (which ``write_outputs`` stores in
``uns['<prefix>_target_calls']``), so the outputs saved in an .h5ad can be plotted without the
model. None of them writes to the AnnData.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import matplotlib as mpl
import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData

from .._data import InvalidTypeError, InvalidValueError, MissingKeyError, resolve_modality
from .._figures import finish_figure
from .._responders import CONTROL_CLASS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Colour of cells outside ``groups``, of missing values, and of the controls.
_GREY = "#c8c8c8"
_SIGNIFICANT = "#d62728"
_NOT_SIGNIFICANT = "#a0a0a0"
_LATENTS = ("salient", "background")
_HORIZONTAL = (
    {"orientation": "horizontal"}
    if tuple(int(part) for part in mpl.__version__.split(".")[:2]) >= (3, 10)
    else {"vert": False}
)


def _missing_outputs(what: str, prefix: str) -> MissingKeyError:
    return MissingKeyError(
        f"{what} is missing. Run model.write_outputs(adata) first, or pass the prefix= the "
        f"outputs were written with (here prefix={prefix!r})."
    )


# --------------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------------


def _embed(
    latent: np.ndarray, basis: str, n_neighbors: int, random_state: int
) -> tuple[np.ndarray, str]:
    """Two-dimensional coordinates of a latent, and the axis-label stem."""
    latent = np.asarray(latent, dtype=np.float32)
    if basis == "pca":
        centered = latent - latent.mean(axis=0)
        _, _, components = np.linalg.svd(centered, full_matrices=False)
        coordinates = centered @ components[:2].T
        if coordinates.shape[1] < 2:
            coordinates = np.column_stack([coordinates, np.zeros(len(latent))])
        return coordinates, "PC"
    import scanpy as sc

    # A temporary AnnData, so that nothing is written to the user's.
    temporary = AnnData(X=latent, obs=pd.DataFrame(index=np.arange(len(latent)).astype(str)))
    sc.pp.neighbors(temporary, n_neighbors=n_neighbors, use_rep="X", random_state=random_state)
    sc.tl.umap(temporary, random_state=random_state)
    return temporary.obsm["X_umap"], "UMAP"


def _palette(adata: AnnData, column: str, n: int) -> list[str]:
    """Scanpy's colours of a categorical column: ``uns['<column>_colors']``, or its defaults."""
    stored = adata.uns.get(f"{column}_colors")
    if stored is not None and len(stored) == n:
        return [mpl.colors.to_hex(colour) for colour in stored]
    from scanpy.plotting import palettes

    if n <= 20:
        palette = palettes.default_20
    elif n <= 28:
        palette = palettes.default_28
    else:
        palette = palettes.default_102
    return [palette[i % len(palette)] for i in range(n)]


def _colour_column(adata: AnnData, column: str, groups: set[str]) -> dict:
    """How to colour the cells by one obs column: per-cell RGBA and a legend, or numbers."""
    values = adata.obs[column]
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return {"kind": "numeric", "values": values.to_numpy(dtype=float)}
    categorical = values.astype("category")
    categories = [str(category) for category in categorical.cat.categories]
    palette = _palette(adata, column, len(categories))
    highlighted = groups & set(categories) if groups else set()
    shown = [c for c in categories if not highlighted or c in highlighted]
    lookup = dict(zip(categories, palette, strict=True))
    codes = categorical.cat.codes.to_numpy()
    # Missing values (code -1) are grey, whatever colour their placeholder gets here.
    names = np.asarray([*categories, ""], dtype=object)[codes]
    grey = (codes < 0) | (~np.isin(names, shown) if highlighted else False)
    colours = np.array([mpl.colors.to_rgba(lookup.get(name, _GREY)) for name in [*categories, ""]])
    rgba = colours[codes]
    rgba[grey] = mpl.colors.to_rgba(_GREY)
    legend = [(name, lookup[name]) for name in shown]
    if highlighted and grey.any():
        legend.append(("other", _GREY))
    elif (codes < 0).any():
        legend.append(("NA", _GREY))
    return {"kind": "categorical", "rgba": rgba, "grey": grey, "legend": legend}


def latents(
    adata: AnnData | MuData,
    color: str | Sequence[str],
    *,
    prefix: str = "contrastive",
    basis: Literal["umap", "pca"] = "umap",
    groups: str | Sequence[str] | None = None,
    size: float | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
    modality: str = "rna",
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
) -> Figure | None:
    """Salient and background latents side by side, coloured by obs columns.

    A good fit shows the perturbations in the salient latent and not in the background one,
    and the shared variation (batch, replicate, cell cycle, ...) in the background latent and
    not in the salient one.

    Parameters
    ----------
    adata
        Data with the outputs of :meth:`~pertpy_contrastive.ContrastiveVAE.write_outputs`
        (``obsm['X_<prefix>_salient']`` and ``obsm['X_<prefix>_background']``); a MuData's
        ``modality``.
    color
        obs column(s) to colour by, e.g. ``"perturbation"``, ``"batch"`` or
        ``["perturbation", "cell_cycle_phase"]``: one row of two panels per column.
        Categorical (and string or boolean) columns get a legend, numeric ones a colour bar.
        Colours of a categorical column are scanpy's: ``uns['<column>_colors']`` if set.
    prefix
        Prefix the outputs were written with.
    basis
        ``"umap"``: a UMAP of each latent (scanpy's neighbours and UMAP, computed on a
        temporary AnnData with ``random_state``); ``"pca"``: its first two principal
        components (fast).
    groups
        Categories to highlight in the categorical columns that have them; the other cells
        are grey and drawn first.
    size
        Marker size; default ``min(20, 30000 / n_cells)``.
    n_neighbors, random_state
        Neighbours of the UMAP graph, and the seed of the UMAP and of the drawing order.
    modality
        Modality when ``adata`` is a MuData.
    figsize
        Figure size; default 4.2 x 3.8 inches per panel.
    return_fig
        Return the figure instead of showing it.
    save
        Path to save the figure to.

    Returns
    -------
    The figure if ``return_fig``, otherwise ``None``.

    Examples
    --------
    .. plot::

        import pertpy_contrastive as pc

        adata = pc.datasets.simulate_screen(
            n_cells=400, n_genes=100, n_targets=4, n_programs=2, program_size=20,
            effect_size=1.5, seed=0,
        )
        pc.ContrastiveVAE.setup_anndata(
            adata, perturbation_key="perturbation", control="non-targeting", batch_key="batch"
        )
        model = pc.ContrastiveVAE(adata)
        model.train(max_epochs=10, batch_size=32, early_stopping=False, enable_progress_bar=False)
        model.write_outputs()
        pc.pl.latents(adata, color=["perturbation", "batch"], basis="pca")
    """
    adata = resolve_modality(adata, modality)
    columns = [color] if isinstance(color, str) else list(color)
    if not columns:
        raise InvalidValueError(
            "color is empty. Pass one or more obs columns, e.g. 'perturbation'."
        )
    if basis not in ("umap", "pca"):
        raise InvalidValueError(f"basis must be 'umap' or 'pca', got {basis!r}.")
    keys = _latent_keys(adata, prefix)
    colourings = _colourings(adata, columns, groups)
    coordinates = {
        kind: _embed(adata.obsm[key], basis, n_neighbors, random_state)
        for kind, key in keys.items()
    }
    if size is None:
        size = min(20.0, 30_000 / max(adata.n_obs, 1))
    order = np.random.default_rng(random_state).permutation(adata.n_obs)
    figure = _latent_panels(columns, colourings, coordinates, order, size, figsize)
    return finish_figure(figure, return_fig=return_fig, save=save)


def _latent_keys(adata: AnnData, prefix: str) -> dict[str, str]:
    """Return the obsm key of each latent, checked to be in ``adata``."""
    keys = {kind: f"X_{prefix}_{kind}" for kind in _LATENTS}
    for key in keys.values():
        if key not in adata.obsm:
            raise _missing_outputs(f"obsm[{key!r}]", prefix)
    return keys


def _colourings(
    adata: AnnData, columns: list[str], groups: str | Sequence[str] | None
) -> dict[str, dict]:
    """How to colour the cells by each column, once the columns and ``groups`` are checked."""
    absent = [column for column in columns if column not in adata.obs]
    if absent:
        raise MissingKeyError(
            f"obs{absent} is missing; color= takes obs columns, e.g. {list(adata.obs.columns[:8])}."
        )
    wanted = {groups} if isinstance(groups, str) else set(groups or ())
    colourings = {column: _colour_column(adata, column, wanted) for column in columns}
    if wanted:
        found = set().union(
            *(
                {name for name, _ in colouring["legend"]}
                for colouring in colourings.values()
                if colouring["kind"] == "categorical"
            )
        )
        if wanted - found:
            raise InvalidValueError(
                f"groups {sorted(wanted - found)} are not categories of the categorical colour "
                f"columns {columns}."
            )
    return colourings


def _latent_panels(columns, colourings, coordinates, order, size, figsize) -> Figure:
    """Draw one row per colour column: the salient latent, then the background latent."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(columns),
        2,
        figsize=figsize or (8.4, 3.8 * len(columns)),
        squeeze=False,
        layout="constrained",
    )
    for row, column in enumerate(columns):
        colouring = colourings[column]
        for axis, kind in zip(axes[row], _LATENTS, strict=True):
            points, stem = coordinates[kind]
            # The colour bar or legend goes beside the last panel of the row only.
            key_title = column if kind == _LATENTS[-1] else None
            if colouring["kind"] == "numeric":
                _scatter_numeric(axis, points, colouring["values"], order, size, key_title)
            else:
                _scatter_categorical(axis, points, colouring, order, size, key_title)
            axis.set_title(f"{kind} latent: {column}")
            axis.set_xlabel(f"{stem}1")
            axis.set_ylabel(f"{stem}2")
            axis.set_xticks([])
            axis.set_yticks([])
    return figure


def _scatter_numeric(axis, points, values, order, size, colour_bar_label: str | None) -> None:
    """Cells coloured by a numeric column, missing values grey and drawn first."""
    finite = np.isfinite(values)
    cmap = mpl.colormaps["viridis"].with_extremes(bad=_GREY)
    drawn = order[np.argsort(finite[order], kind="stable")]
    scatter = axis.scatter(
        points[drawn, 0],
        points[drawn, 1],
        c=values[drawn],
        cmap=cmap,
        vmin=np.nanmin(values) if finite.any() else None,
        vmax=np.nanmax(values) if finite.any() else None,
        s=size,
        linewidths=0,
        plotnonfinite=True,
    )
    if colour_bar_label is not None:
        axis.figure.colorbar(scatter, ax=axis, label=colour_bar_label, shrink=0.8)


def _scatter_categorical(axis, points, colouring, order, size, legend_title: str | None) -> None:
    """Cells coloured by a categorical column (see :func:`_colour_column`)."""
    # Grey cells first, under the coloured ones; otherwise a random order.
    drawn = order[np.argsort(~colouring["grey"][order], kind="stable")]
    axis.scatter(
        points[drawn, 0],
        points[drawn, 1],
        c=colouring["rgba"][drawn],
        s=size,
        linewidths=0,
    )
    if legend_title is None:
        return
    handles = [
        mpl.lines.Line2D([], [], marker="o", linestyle="", color=colour, label=name)
        for name, colour in colouring["legend"]
    ]
    axis.legend(
        handles=handles,
        title=legend_title,
        loc="center left",
        bbox_to_anchor=(1.02, 0.5),
        frameon=False,
        fontsize="small",
        ncols=1 + len(handles) // 16,
    )


# --------------------------------------------------------------------------------------------
# Perturbation ranking
# --------------------------------------------------------------------------------------------


def _distance_table(
    table: pd.DataFrame | AnnData | MuData, prefix: str, modality: str
) -> pd.DataFrame:
    """Return the distance-test table, given or stored in ``uns['<prefix>_target_calls']``."""
    if isinstance(table, AnnData | MuData):
        data = resolve_modality(table, modality)
        key = f"{prefix}_target_calls"
        if key not in data.uns:
            raise MissingKeyError(
                f"uns[{key!r}] is missing. Run model.write_outputs(adata) first, pass the "
                "prefix= the outputs were written with, or pass the table of "
                "model.distance_test() (or pc.tl.distance_test)."
            )
        table = data.uns[key]
    if isinstance(table, Mapping):
        table = pd.DataFrame(dict(table))
    if not isinstance(table, pd.DataFrame):
        raise InvalidTypeError(
            f"Expected the DataFrame of model.distance_test() or an AnnData, got "
            f"{type(table).__name__}."
        )
    missing = [column for column in ("distance", "pvalue_adj") if column not in table]
    if missing:
        raise MissingKeyError(
            f"The table has no column {missing}. Pass the table of model.distance_test() or "
            "pc.tl.distance_test (pertpy's DistanceTest columns distance, pvalue, significant, "
            "pvalue_adj, significant_adj)."
        )
    return table


def _drop_contrast(table: pd.DataFrame, contrast: str | None) -> tuple[pd.DataFrame, str | None]:
    """Drop the contrast's row (distance 0, p-value 1); return the table and the contrast."""
    if contrast is not None:
        return table.drop(index=contrast, errors="ignore"), contrast
    pvalue = table["pvalue"] if "pvalue" in table else table["pvalue_adj"]
    candidates = table.index[(table["distance"] == 0) & (pvalue.isna() | (pvalue >= 1))]
    if len(candidates) > 1:
        raise InvalidValueError(
            f"Rows {list(candidates)} all look like the contrast's (distance 0, p-value 1). "
            "Pass contrast= (the control label, e.g. 'non-targeting') to say which one it is."
        )
    if len(candidates) == 1:
        return table.drop(index=candidates), str(candidates[0])
    # No such row: the contrast was dropped already (as the command line's demo does).
    return table, None


def perturbation_ranking(
    table: pd.DataFrame | AnnData | MuData,
    *,
    alpha: float = 0.05,
    contrast: str | None = None,
    n_top: int | None = None,
    prefix: str = "contrastive",
    modality: str = "rna",
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
) -> Figure | None:
    """Targets ranked by their distance to the controls, coloured by significance.

    One horizontal bar per tested target, the largest distance at the top, red when its
    adjusted p-value is below ``alpha``; the adjusted p-value is written at the end of each bar.

    Parameters
    ----------
    table
        The DataFrame of :meth:`~pertpy_contrastive.ContrastiveVAE.distance_test` (or of
        :func:`~pertpy_contrastive.tl.distance_test` / ``pt.tl.DistanceTest``): columns
        ``distance`` and ``pvalue_adj``, indexed by group. Or an AnnData (a MuData's
        ``modality``) that stores it in ``uns['<prefix>_target_calls']``, as
        :meth:`~pertpy_contrastive.ContrastiveVAE.write_outputs` does.
    alpha
        Level of the adjusted p-values (``pvalue_adj < alpha`` is significant).
    contrast
        The reference group, whose row (distance 0) is dropped if present. By default the
        single row with distance 0 and p-value 1 (or NaN) is taken for it; there is none when
        the contrast was dropped already.
    n_top
        Plot only the ``n_top`` largest distances.
    prefix
        Prefix of the ``uns`` key, when ``table`` is an AnnData.
    modality
        Modality when ``table`` is a MuData.
    figsize
        Figure size; default 5 inches wide and 0.3 inch per target.
    return_fig
        Return the figure instead of showing it.
    save
        Path to save the figure to.

    Returns
    -------
    The figure if ``return_fig``, otherwise ``None``.

    Examples
    --------
    .. plot::

        import pertpy_contrastive as pc

        adata = pc.datasets.simulate_screen(
            n_cells=400, n_genes=100, n_targets=4, n_programs=2, program_size=20,
            effect_size=1.5, seed=0,
        )
        pc.ContrastiveVAE.setup_anndata(
            adata, perturbation_key="perturbation", control="non-targeting", batch_key="batch"
        )
        model = pc.ContrastiveVAE(adata)
        model.train(max_epochs=10, batch_size=32, early_stopping=False, enable_progress_bar=False)
        table = model.distance_test(n_perms=200)
        pc.pl.perturbation_ranking(table, alpha=0.05)
    """
    import matplotlib.pyplot as plt

    table = _distance_table(table, prefix, modality)
    tested, contrast = _drop_contrast(table, contrast)
    tested = tested[tested["distance"].notna()].sort_values("distance", ascending=False)
    if n_top is not None:
        tested = tested.iloc[:n_top]
    if tested.empty:
        raise InvalidValueError(
            "The table has no tested group besides the contrast; nothing to plot."
        )
    figure, axis = plt.subplots(
        figsize=figsize or (5.0, 1.2 + 0.3 * len(tested)), layout="constrained"
    )
    _significance_bars(axis, tested, alpha)
    axis.set_xlabel(f"distance to {contrast}" if contrast is not None else "distance")
    axis.set_title("Targets ranked by effect")
    axis.legend(
        handles=[
            mpl.patches.Patch(color=_SIGNIFICANT, label=f"adjusted p < {alpha:g}"),
            mpl.patches.Patch(color=_NOT_SIGNIFICANT, label=f"adjusted p ≥ {alpha:g}"),
        ],
        loc="lower right",
        fontsize="small",
    )
    return finish_figure(figure, return_fig=return_fig, save=save)


def _significance_bars(axis, tested: pd.DataFrame, alpha: float) -> None:
    """One bar per row of ``tested``, top down, red if significant, its adjusted p-value beside."""
    adjusted = tested["pvalue_adj"].to_numpy(dtype=float)
    significant = np.nan_to_num(adjusted, nan=1.0) < alpha
    colours = np.where(significant, _SIGNIFICANT, _NOT_SIGNIFICANT)
    positions = np.arange(len(tested))
    distances = tested["distance"].to_numpy(dtype=float)
    axis.barh(positions, distances, color=colours, height=0.7)
    for position, distance, value in zip(positions, distances, adjusted, strict=True):
        axis.text(
            max(distance, 0.0),
            position,
            f" {value:.2g}",
            va="center",
            ha="left",
            fontsize="x-small",
            color="#404040",
        )
    axis.set_yticks(positions, [str(name) for name in tested.index])
    axis.invert_yaxis()
    axis.axvline(0, color="black", linewidth=0.8)
    axis.margins(x=0.15)


# --------------------------------------------------------------------------------------------
# Responder probabilities
# --------------------------------------------------------------------------------------------


def responder_probabilities(
    adata: AnnData | MuData,
    *,
    perturbation_key: str = "perturbation",
    prefix: str = "contrastive",
    control: str | Sequence[str] | None = None,
    threshold: float = 0.5,
    show_points: bool = True,
    max_points: int = 1000,
    random_state: int = 0,
    modality: str = "rna",
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
) -> Figure | None:
    """Each target's distribution of responder probabilities, with the controls for reference.

    A box per target (its cells' ``obs['<prefix>_p_perturbed']``), ordered by the mean, the
    highest at the top, with the cells as jittered points; the controls (0 by construction) in
    grey at the bottom; the KO threshold as a dashed line. Cells without a probability (labels
    that are neither a trained target nor a control) are left out.

    Parameters
    ----------
    adata
        Data with the outputs of :meth:`~pertpy_contrastive.ContrastiveVAE.write_outputs`
        (``obs['<prefix>_p_perturbed']``); a MuData's ``modality``.
    perturbation_key
        obs column of the perturbation labels.
    prefix
        Prefix the outputs were written with.
    control
        Control label(s). By default the cells that ``write_outputs`` classed ``"NT"`` in
        ``obs['<prefix>_class_global']``.
    threshold
        Probability above which a cell is called KO (``write_outputs``'s ``threshold``).
    show_points
        Draw the cells over the boxes.
    max_points
        Cells drawn per group at most (a random sample of larger groups).
    random_state
        Seed of the sample and of the jitter.
    modality
        Modality when ``adata`` is a MuData.
    figsize
        Figure size; default 5.5 inches wide and 0.35 inch per group.
    return_fig
        Return the figure instead of showing it.
    save
        Path to save the figure to.

    Returns
    -------
    The figure if ``return_fig``, otherwise ``None``.

    Examples
    --------
    .. plot::

        import pertpy_contrastive as pc

        adata = pc.datasets.simulate_screen(
            n_cells=400, n_genes=100, n_targets=4, n_programs=2, program_size=20,
            effect_size=1.5, seed=0,
        )
        pc.ContrastiveVAE.setup_anndata(
            adata, perturbation_key="perturbation", control="non-targeting", batch_key="batch"
        )
        model = pc.ContrastiveVAE(adata)
        model.train(max_epochs=10, batch_size=32, early_stopping=False, enable_progress_bar=False)
        model.write_outputs()
        pc.pl.responder_probabilities(adata, perturbation_key="perturbation")
    """
    import matplotlib.pyplot as plt

    adata = resolve_modality(adata, modality)
    key = f"{prefix}_p_perturbed"
    if key not in adata.obs:
        raise _missing_outputs(f"obs[{key!r}]", prefix)
    if perturbation_key not in adata.obs:
        raise MissingKeyError(
            f"obs[{perturbation_key!r}] is missing. Pass perturbation_key= (the obs column of the "
            "perturbation labels the model was set up with)."
        )
    labels = adata.obs[perturbation_key].astype("string")
    probability = pd.to_numeric(adata.obs[key], errors="coerce")
    is_control, controls = _controls(adata, labels, control, prefix, perturbation_key)
    groups = _probability_groups(labels, probability, is_control, controls, key)
    figure, axis = plt.subplots(
        figsize=figsize or (5.5, 1.3 + 0.35 * len(groups)), layout="constrained"
    )
    _probability_boxes(axis, groups, show_points, max_points, random_state)
    axis.axvline(threshold, color="black", linestyle="--", linewidth=1)
    axis.set_xlabel("P(perturbed)")
    axis.set_ylabel(perturbation_key)
    axis.set_title(f"Responder probability (KO above {threshold:g})")
    return finish_figure(figure, return_fig=return_fig, save=save)


def _controls(
    adata: AnnData,
    labels: pd.Series,
    control: str | Sequence[str] | None,
    prefix: str,
    perturbation_key: str,
) -> tuple[np.ndarray, list[str]]:
    """Which cells are controls, and their labels: ``control``, or the cells classed NT."""
    if control is None:
        class_key = f"{prefix}_class_global"
        if class_key not in adata.obs:
            raise MissingKeyError(
                f"obs[{class_key!r}] is missing, so the controls are unknown. Pass control= "
                "(the control label(s)), or run model.write_outputs(adata) first."
            )
        classes = adata.obs[class_key].astype("string")
        is_control = (classes == CONTROL_CLASS).fillna(False).to_numpy(dtype=bool)
        return is_control, sorted(labels[is_control].dropna().unique())
    controls = [control] if isinstance(control, str) else list(control)
    unknown = [label for label in controls if not (labels == label).any()]
    if unknown:
        raise InvalidValueError(
            f"control {unknown} is not a label of obs[{perturbation_key!r}], whose labels "
            f"are e.g. {list(labels.dropna().unique()[:8])}."
        )
    return labels.isin(controls).fillna(False).to_numpy(dtype=bool), controls


def _probability_groups(
    labels: pd.Series,
    probability: pd.Series,
    is_control: np.ndarray,
    controls: list[str],
    key: str,
) -> list[tuple[str, np.ndarray, str]]:
    """Return each box's name, probabilities and colour: targets by mean, then the controls.

    The highest mean comes first; cells without a label or a probability are left out.
    """
    keep = labels.notna().to_numpy() & probability.notna().to_numpy()
    if not (keep & ~is_control).any():
        raise InvalidValueError(
            f"No perturbed cell has a responder probability in obs[{key!r}]. Check "
            f"perturbation_key= and control=, or rerun model.write_outputs(adata)."
        )
    is_target = keep & ~is_control
    by_target = probability[is_target].groupby(labels[is_target].to_numpy(dtype=str))
    order = by_target.mean().sort_values(ascending=False, kind="stable").index
    groups = [(target, by_target.get_group(target).to_numpy(dtype=float), "C0") for target in order]
    if (keep & is_control).any():
        in_controls = probability[keep & is_control].to_numpy(dtype=float)
        groups.append((", ".join(controls), in_controls, _GREY))
    return groups


def _probability_boxes(axis, groups, show_points, max_points, random_state) -> None:
    """Draw a horizontal box per group, top down, with a sample of its cells as jittered points."""
    values = [value for _, value, _ in groups]
    colours = [colour for _, _, colour in groups]
    positions = np.arange(len(groups))
    boxes = axis.boxplot(
        values,
        positions=positions,
        widths=0.6,
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "black"},
        **_HORIZONTAL,
    )
    for box, colour in zip(boxes["boxes"], colours, strict=True):
        box.set_facecolor(mpl.colors.to_rgba(colour, 0.35))
        box.set_edgecolor(colour if colour != _GREY else "#808080")
    if show_points:
        rng = np.random.default_rng(random_state)
        for position, value, colour in zip(positions, values, colours, strict=True):
            if len(value) > max_points:
                value = rng.choice(value, max_points, replace=False)
            jitter = rng.uniform(-0.2, 0.2, len(value))
            axis.scatter(
                value,
                position + jitter,
                s=6,
                color=colour if colour != _GREY else "#808080",
                alpha=0.5,
                linewidths=0,
                zorder=3,
            )
    axis.set_yticks(positions, [name for name, _, _ in groups])
    axis.invert_yaxis()
    axis.set_xlim(-0.03, 1.03)


# --------------------------------------------------------------------------------------------
# Training history
# --------------------------------------------------------------------------------------------

_SPLITS = ("train", "validation")
_MONITORED_TERM = "elbo"  # early stopping watches elbo_validation (_training_plan.MONITORED)


def _split_key(key: str) -> tuple[str, str | None]:
    """``("loss", "train")`` for ``loss_train`` or ``train_loss``; ``(key, None)`` otherwise."""
    for split in _SPLITS:
        if key.endswith(f"_{split}"):
            return key[: -len(split) - 1], split
        if key.startswith(f"{split}_"):
            return key[len(split) + 1 :], split
    return key, None


def training_history(
    model_or_history,
    *,
    skip_epochs: int = 0,
    ncols: int = 3,
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
) -> Figure | None:
    """Training curves: one panel per logged term, its training and validation values together.

    History keys are grouped by their term, with a ``_train`` / ``_validation`` suffix (or a
    ``train_`` / ``validation_`` prefix, as some scvi-tools models log) stripped: ``loss_train``
    and ``loss_validation`` share the panel ``loss``. Keys without a split (e.g. ``kl_weight``)
    get a panel of their own; keys without any finite value are skipped. In the ``elbo`` panel,
    a dot marks the epoch of the lowest validation value, the one early stopping keeps watching
    for (``elbo_validation``).

    Parameters
    ----------
    model_or_history
        A trained model (its ``history``), or such a history: a dict of DataFrames (one column,
        indexed by epoch, as in scvi-tools) or of Series.
    skip_epochs
        Leave out the epochs before this one (the first epochs' losses can dwarf the rest).
    ncols
        Panels per row.
    figsize
        Figure size; default 3.6 x 2.8 inches per panel.
    return_fig
        Return the figure instead of showing it.
    save
        Path to save the figure to.

    Returns
    -------
    The figure if ``return_fig``, otherwise ``None``.

    Examples
    --------
    .. plot::

        import pertpy_contrastive as pc

        adata = pc.datasets.simulate_screen(
            n_cells=400, n_genes=100, n_targets=4, n_programs=2, program_size=20,
            effect_size=1.5, seed=0,
        )
        pc.ContrastiveVAE.setup_anndata(
            adata, perturbation_key="perturbation", control="non-targeting", batch_key="batch"
        )
        model = pc.ContrastiveVAE(adata)
        model.train(max_epochs=10, batch_size=32, early_stopping=False, enable_progress_bar=False)
        pc.pl.training_history(model)
    """
    import matplotlib.pyplot as plt

    history = getattr(model_or_history, "history", model_or_history)
    if history is None:
        raise InvalidValueError("The model has no training history. Train it first: model.train().")
    if not isinstance(history, Mapping):
        raise InvalidTypeError(
            "Expected a trained model or its history (a dict of DataFrames indexed by epoch), "
            f"got {type(model_or_history).__name__}."
        )
    terms = _history_terms(history, skip_epochs)
    ncols = max(1, min(ncols, len(terms)))
    nrows = -(-len(terms) // ncols)
    figure, axes = plt.subplots(
        nrows,
        ncols,
        figsize=figsize or (3.6 * ncols, 2.8 * nrows),
        squeeze=False,
        layout="constrained",
    )
    flat = axes.ravel()
    for axis, (term, splits) in zip(flat, terms.items(), strict=False):
        _plot_term(axis, term, splits)
    for axis in flat[len(terms) :]:
        axis.remove()
    return finish_figure(figure, return_fig=return_fig, save=save)


def _history_terms(history: Mapping, skip_epochs: int) -> dict[str, dict[str | None, pd.Series]]:
    """Return the finite values of each term from ``skip_epochs`` on, by split (``None``: none)."""
    terms: dict[str, dict[str | None, pd.Series]] = {}
    for key, frame in history.items():
        series = frame.iloc[:, 0] if isinstance(frame, pd.DataFrame) and frame.shape[1] else frame
        if not isinstance(series, pd.Series):
            series = pd.Series(np.asarray(series, dtype=float).ravel())
        series = pd.to_numeric(series, errors="coerce").dropna()
        series = series[series.index >= skip_epochs]
        if series.empty:
            continue
        term, split = _split_key(str(key))
        if split is None:
            term = str(key)
        terms.setdefault(term, {})[split] = series
    if not terms:
        raise InvalidValueError(
            "The history has no finite values to plot"
            + (f" from epoch {skip_epochs} on" if skip_epochs else "")
            + f"; its keys are {list(history)}."
        )
    return terms


def _plot_term(axis, term: str, splits: dict[str | None, pd.Series]) -> None:
    """One term's panel: its training and validation curves (or its one curve)."""
    for split in (*_SPLITS, None):
        if split in splits:
            series = splits[split]
            axis.plot(
                series.index.to_numpy(),
                series.to_numpy(),
                label=split or term,
                color={"train": "C0", "validation": "C1"}.get(split, "C2"),
            )
    if term == _MONITORED_TERM and "validation" in splits:
        # What early stopping watches: mark its best epoch.
        validation = splits["validation"]
        best = validation.idxmin()
        axis.plot(best, validation[best], "o", color="C3", label="lowest (early stopping)")
    axis.set_title(term)
    axis.set_xlabel("epoch")
    if len(axis.lines) > 1 or None not in splits:
        axis.legend(fontsize="small")
