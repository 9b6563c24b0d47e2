"""Figures: the angular-distance heatmap of the paper (Fig. 1/3 style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .similarity import AngularDistances


def plot_heatmap(distances: AngularDistances, path: str | Path, title: str | None = None) -> Path:
    """Block size n (rows) against starting layer ℓ (columns), colour = D[n][ℓ], with ℓ*(n) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = distances.num_layers
    grid = np.full((L, L), np.nan)  # row n-1, column ℓ; blocks running past the last layer stay blank
    for n in range(1, L + 1):
        grid[n - 1, : L - n + 1] = distances.block(n)
    best = [distances.best(n)[0] for n in range(1, L + 1)]

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(-0.5, L - 0.5, 0.5, L + 0.5))
    ax.plot(best, np.arange(1, L + 1), linestyle="none", marker="o", markersize=3.5, markerfacecolor="white",
            markeredgecolor="black", markeredgewidth=0.6, label=r"$\ell^*(n)$ = argmin$_\ell$ d")
    fig.colorbar(image, ax=ax, label=r"angular distance $d(x^{(\ell)}, x^{(\ell+n)})$")
    ax.set_xlabel(r"first layer of the block, $\ell$ (0-based)")
    ax.set_ylabel("block size $n$ (layers)")
    model = distances.meta.get("model", "")
    ax.set_title(title or f"{model}: {distances.num_samples} samples, {'last token' if distances.tokens == 'last' else 'all tokens'}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
