"""A heat map of a sweep's objective over two swept keys (PNG, for the MLflow parent run)."""

from __future__ import annotations

import math
from typing import Any


def objective_heatmap(rows: list[dict[str, Any]], x_key: str, y_key: str, metric: str,
                      path: str) -> str:
    """Mean of ``metric`` per (x, y) cell; cells without a finite value are grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    xs = sorted({r[x_key] for r in rows}, key=float)
    ys = sorted({r[y_key] for r in rows}, key=float)
    grid = np.full((len(ys), len(xs)), np.nan)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            vals = [r[metric] for r in rows if r[x_key] == x and r[y_key] == y
                    and isinstance(r[metric], float) and math.isfinite(r[metric])]
            if vals:
                grid[i, j] = float(np.mean(vals))
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(xs), 1.2 + 1.0 * len(ys)))
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("lightgrey")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    for i in range(len(ys)):
        for j in range(len(xs)):
            text = "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.1f}"
            ax.text(j, i, text, ha="center", va="center", color="white")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(f"{metric} over the sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
