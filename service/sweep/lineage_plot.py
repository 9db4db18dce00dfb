"""A population-based sweep's schedules in one picture (PNG, for the sweep's folder and its
MLflow parent run): for each swept key, every trial's values over the global steps as it
trained with them (its lineage followed back through its exploits), coloured by the trial's
objective, exploits marked."""

from __future__ import annotations

import math

from service.errors import ConfigError
from service.sweep.lineage import LineageRow, schedule_of


def schedules_plot(rows: list[LineageRow], objective: dict[str, float | None],
                   path: str) -> str:
    """One subplot per swept key: each trial's resolved schedule (``schedule_of``) as a step
    line to the last step of the lineage, in a colormap of its objective (grey: none yet, or
    not finite), a dot where a trial exploited another. Writes ``path``; returns it.

    Args:
        rows: The sweep's lineage rows (``lineage.read_rows``).
        objective: Each trial's objective (its best k-NN top-1), by run name.
        path: The PNG to write (local).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    trials = sorted({r.trial for r in rows})
    keys = sorted({k for r in rows for k in r.values})
    schedules = {}
    for t in trials:
        try:
            schedules[t] = schedule_of(rows, t)
        except ConfigError:  # a lineage cut short (a trial still starting): nothing to draw
            continue
    end = max([r.step for r in rows] + [0])
    end += max(1, end // 10)  # the last segment stays visible
    scores = {t: v for t, v in objective.items()
              if isinstance(v, int | float) and math.isfinite(v)}
    low, high = (min(scores.values()), max(scores.values())) if scores else (0.0, 1.0)
    norm = Normalize(low, high if high > low else low + 1e-9)
    cmap = matplotlib.colormaps["viridis"]

    def colour(trial: str) -> object:
        return cmap(norm(scores[trial])) if trial in scores else "lightgrey"

    fig, axes = plt.subplots(len(keys) or 1, 1, figsize=(7.5, 1.2 + 2.2 * max(len(keys), 1)),
                             sharex=True, squeeze=False)
    # the best trials drawn last, on top of the others
    order = sorted(schedules, key=lambda t: scores.get(t, -math.inf))
    for ax, key in zip(axes[:, 0], keys):
        for t in order:
            points = [(s, v[key]) for s, v in schedules[t] if key in v]
            if not points:
                continue
            xs = [s for s, _ in points] + [end]
            ys = [v for _, v in points] + [points[-1][1]]
            ax.step(xs, ys, where="post", color=colour(t), lw=1.6, alpha=0.9)
        for r in rows:
            if r.event == "exploit" and key in r.values:
                ax.plot(r.step, r.values[key], "o", ms=5, color=colour(r.trial),
                        markeredgecolor="black", markeredgewidth=0.6)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("global step")
    axes[0, 0].set_title("schedules of the sweep's trials (dots: exploits; grey: no objective)")
    if scores:
        fig.colorbar(ScalarMappable(norm, cmap), ax=axes[:, 0].tolist(), label="objective")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
