"""What every comparison in ``bench/`` shares, so none of them can flatter one side.

- The sides take turns (:func:`alternate`): round ``r`` runs every side once, starting with
  side ``r mod n`` (A B, B A, A B, ... for two sides), so a busy moment of the machine, a
  slow first run or a drift over the run lands on every side alike, not on the one that
  happened to run then.
- They are warmed up the same way: the same number of untimed turns each, in the same
  alternating order, before the first timed one.
- Each side is reported by its median and its spread (min and max of the timed turns), never
  by its best turn alone (:func:`summary`, :func:`fields`).
- A ratio is the ratio of two medians (:func:`ratio`), printed only where both sides did the
  same work; each round's own ratio (the two sides measured next to each other) gives its
  spread (:func:`paired_ratios`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def order(names: Sequence[str], round_index: int) -> list[str]:
    """The sides of round ``round_index``: ``names`` rotated to start at ``round_index``."""
    k = round_index % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def alternate(sides: Mapping[str, Callable[[], T]], rounds: int,
              warmup: int = 1) -> dict[str, list[T]]:
    """``rounds`` timed turns of every side, taking turns (see :func:`order`), after
    ``warmup`` untimed turns of every side in the same order. Each callable runs one turn
    and returns its measurement (seconds, a rate, or a tuple of them); returns the measurements per side, in
    round order, so that ``out[a][r]`` and ``out[b][r]`` were measured in the same round."""
    names = list(sides)
    for r in range(warmup):
        for name in order(names, r):
            sides[name]()
    out: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        for name in order(names, r):
            out[name].append(sides[name]())
    return out


def summary(samples: Sequence[float]) -> dict[str, float]:
    """``median``, ``min``, ``max`` and ``n`` of the samples."""
    if not samples:
        raise ValueError("no samples")
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


def fields(name: str, samples: Sequence[float], digits: int = 3) -> dict:
    """``{name: median, name_spread: [min, max]}`` for a JSON record."""
    s = summary(samples)
    return {name: round(s["median"], digits),
            f"{name}_spread": [round(s["min"], digits), round(s["max"], digits)]}


def rates(work: float, seconds: Sequence[float]) -> list[float]:
    """``work / s`` for each of ``seconds`` (images per second from seconds per window)."""
    return [work / s for s in seconds]


def ratio(top: Sequence[float], bottom: Sequence[float], digits: int = 3) -> float:
    """median(top) / median(bottom)."""
    return round(statistics.median(top) / statistics.median(bottom), digits)


def paired_ratios(top: Sequence[float], bottom: Sequence[float]) -> list[float]:
    """``top[r] / bottom[r]`` for each round ``r`` (both measured in the same round)."""
    return [t / b for t, b in zip(top, bottom)]
