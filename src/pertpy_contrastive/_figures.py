"""Figure handling shared by the plots (``pl``) and the tools' own plots (``tl``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def finish_figure(figure: Figure, *, return_fig: bool, save: str | Path | None) -> Figure | None:
    """Save the figure if asked, then return it or show it (pertpy's convention)."""
    import matplotlib.pyplot as plt

    if save is not None:
        figure.savefig(save, bbox_inches="tight")
    if return_fig:
        return figure
    plt.show()
    return None
