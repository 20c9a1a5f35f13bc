"""The evaluation's PNG plots. Each returns the path written.

Figures are matplotlib `Figure`s drawn on their own Agg canvas, not pyplot's: no display is
needed, and importing this never changes the backend of a notebook that imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def line_plot(
    path: Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    *,
    log_x: bool = False,
) -> str:
    """One line per series {label: (xs, ys)}."""
    fig, ax = figure((6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def heatmap(
    path: Path,
    grid: np.ndarray,
    xticks: Sequence[str],
    yticks: Sequence[str],
    xlabel: str,
    ylabel: str,
) -> str:
    """A [rows, cols] grid of percentages, green for 100, red for 0, values written in; one
    y tick per row, one x tick per column (fewer would label the wrong cells)."""
    if np.shape(grid) != (len(yticks), len(xticks)):
        raise ValueError(
            f"heatmap grid of shape {np.shape(grid)} needs [rows, cols] = [{len(yticks)} y "
            f"ticks, {len(xticks)} x ticks]"
        )
    fig, ax = figure((1 + 0.7 * len(xticks), 1 + 0.5 * len(yticks)))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(xticks)), xticks)
    ax.set_yticks(range(len(yticks)), yticks)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save(fig, path)


def figure(size: tuple[float, float] = (6.5, 4.2)) -> tuple[Figure, Axes]:
    """A figure of `size` inches with one Axes, laid out to fit its labels."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def save(fig: Figure, path: str | Path) -> str:
    """Writes `fig` as a PNG at `path` (its directory created); the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)
