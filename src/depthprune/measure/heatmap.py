"""The heatmap of angular distances, block size n against first layer ℓ, and the PNG helpers every figure uses.

The analysis, the sweep and the report draw it; the report adds each criterion's removed layers as markers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..outputs import atomic_write_bytes

if TYPE_CHECKING:
    from .distances import AngularDistances


def new_figure(width: float, height: float):
    """A matplotlib Figure of ``width`` × ``height`` inches at the project's resolution."""
    # A bare Figure, not pyplot: no global figure registry to close it in, no GUI backend to choose.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` whole (atomically) and return the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


@dataclass(frozen=True)
class Markers:
    """Points drawn over the heatmap in one colour and marker: at first layer ``layers[i]``, row ``rows[i]``."""

    label: str
    color: str
    marker: str
    layers: list[int]
    rows: list[float]


def plot_heatmap(distances: AngularDistances, path: str | Path, title: str | None = None,
                 marked: list[Markers] | None = None) -> Path:
    """Block size n (rows) against starting layer ℓ (columns), colour = D[n][ℓ], with ℓ*(n) marked, and
    each series of ``marked`` drawn over it (the report's removed layers)."""
    L = distances.num_layers
    grid = np.full((L, L), np.nan)  # row n-1, column ℓ; blocks running past the last layer stay blank
    for n in range(1, L + 1):
        grid[n - 1, : L - n + 1] = distances.block(n)
    best = [distances.best(n)[0] for n in range(1, L + 1)]

    fig = new_figure(6.4, 5.2)
    ax = fig.subplots()
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(-0.5, L - 0.5, 0.5, L + 0.5))
    ax.plot(best, np.arange(1, L + 1), linestyle="none", marker="o", markersize=3.5, markerfacecolor="white",
            markeredgecolor="black", markeredgewidth=0.6, label=r"$\ell^*(n)$ = argmin$_\ell$ d")
    for series in marked or []:
        ax.plot(series.layers, series.rows, linestyle="none", marker=series.marker, markersize=3, color=series.color,
                markeredgecolor="black", markeredgewidth=0.3, label=series.label)
    fig.colorbar(image, ax=ax, label=r"angular distance $d(x^{(\ell)}, x^{(\ell+n)})$")
    ax.set_xlabel(r"first layer of the block, $\ell$ (0-based)")
    ax.set_ylabel("block size $n$ (layers)")
    model = distances.meta.get("model", "")
    ax.set_title(title or f"{model}: {distances.num_samples} samples, {'last token' if distances.token_mode == 'last' else 'all tokens'}", fontsize=10)
    ax.legend(loc="upper right", fontsize=7 if marked else 8, framealpha=0.85)
    fig.tight_layout()
    return save_png(fig, path)
