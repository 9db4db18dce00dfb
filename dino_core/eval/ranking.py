"""Average precision of ranked lists: the revisited Oxford/Paris protocol (Radenovic et al.,
"Revisiting Oxford and Paris", CVPR 2018, the ``revisitop`` evaluation code the DINO reference
copies into its ``utils.py``) and the Holidays/Copydays AP the copy-detection script uses.

AP is the area under the precision-recall curve by the trapezoid rule: each positive adds one
recall step ``1 / n_positives`` times the mean of the precision just before and just after it.
Junk images (in the revisited sets: the query's landmark barely visible, or the other
difficulty level) are taken out of the ranking before the positions of the positives are
counted, so they neither help nor hurt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# The revisited protocol's three settings: which ground-truth lists count as positives and
# which are ignored (junk). Medium and Hard are what the DINO paper reports.
PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def average_precision(positions: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """Trapezoid-rule AP from the sorted 0-based positions of the retrieved positives.

    Args:
        positions: where the positives stand in the ranking (junk already removed),
            ascending; positives missing from it (e.g. beyond a top-k cut) are simply absent
            and contribute nothing.
        n_positives: all positives of the query, retrieved or not (the recall denominator).

    Returns:
        AP in [0, 1].
    """
    if n_positives <= 0:
        raise ValueError(f"n_positives must be at least 1, got {n_positives}")
    ap = 0.0
    for found, rank in enumerate(int(r) for r in positions):
        # precision left of the step: `found` positives among the first `rank` results
        before = 1.0 if rank == 0 else found / rank
        after = (found + 1) / (rank + 1)
        ap += (before + after) / 2.0 / n_positives
    return ap


def positive_positions(ranking: np.ndarray, positives: Sequence[int] | np.ndarray,
                       junk: Sequence[int] | np.ndarray = ()) -> np.ndarray:
    """0-based positions of ``positives`` in ``ranking`` (gallery ids, best first) once the
    ``junk`` ids are removed from it, ascending."""
    ranking = np.asarray(ranking)
    pos = np.flatnonzero(np.isin(ranking, np.asarray(positives, dtype=np.int64)))
    junk_at = np.flatnonzero(np.isin(ranking, np.asarray(junk, dtype=np.int64)))
    # each positive moves up by the number of junk images ranked before it
    return pos - np.searchsorted(junk_at, pos)


def compute_map(ranks: np.ndarray, gnd: Sequence[dict[str, Any]],
                kappas: Sequence[int] = ()) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mean precision@k of a ranking, as ``revisitop``'s ``compute_map``.

    Args:
        ranks: ``(n_gallery, n_queries)`` gallery ids, column ``q`` ranked best first for
            query ``q`` (the reference's ``argsort(-sim, dim=0)`` layout).
        gnd: per query a dict with ``ok`` (positive ids) and optionally ``junk``.
        kappas: the k of precision@k. As the reference, precision@k is computed on the
            junk-free positions and divides by ``min(k, position of the last positive)``.

    Returns:
        ``(map, aps (n_queries,), mean_pr (len(kappas),), prs (n_queries, len(kappas)))``.
        A query without positives gets NaN and is left out of the means.

    Raises:
        ValueError: ``ranks`` has not one column per query.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks must be (n_gallery, n_queries={len(gnd)}), got {ranks.shape}")
    aps = np.full(len(gnd), np.nan)
    prs = np.full((len(gnd), len(kappas)), np.nan)
    for q, g in enumerate(gnd):
        ok = np.asarray(g["ok"], dtype=np.int64).ravel()
        if ok.size == 0:
            continue
        pos = positive_positions(ranks[:, q], ok, np.asarray(g.get("junk", []), np.int64))
        aps[q] = average_precision(pos, ok.size)
        last = pos.max() + 1 if pos.size else 0  # 1-based position of the last positive
        for j, k in enumerate(kappas):
            kq = min(last, k)
            prs[q, j] = (pos + 1 <= kq).sum() / kq if kq > 0 else 0.0
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError("no query has a positive image")
    mean_pr = prs[valid].mean(axis=0) if len(kappas) else np.zeros(0)
    return float(aps[valid].mean()), aps, mean_pr, prs


def protocol_gnd(gnd: Sequence[dict[str, Any]], setting: str) -> list[dict[str, np.ndarray]]:
    """The ``ok``/``junk`` ground truth of one revisited setting (``easy``, ``medium`` or
    ``hard``) from per-query ``easy``/``hard``/``junk`` id lists."""
    if setting not in PROTOCOLS:
        raise ValueError(f"setting must be one of {', '.join(PROTOCOLS)}, got {setting!r}")
    ok_keys, junk_keys = PROTOCOLS[setting]

    def ids(g: dict[str, Any], keys: tuple[str, ...]) -> np.ndarray:
        return np.concatenate([np.asarray(g.get(k, []), np.int64).ravel() for k in keys])

    return [{"ok": ids(g, ok_keys), "junk": ids(g, junk_keys)} for g in gnd]


def revisited_map(ranks: np.ndarray, gnd: Sequence[dict[str, Any]],
                  kappas: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, Any]]:
    """mAP and mP@k per setting: ``easy``/``medium``/``hard`` for a revisited ground truth
    (``easy``, ``hard``, ``junk`` lists), else one ``all`` entry for an ``ok``/``junk`` one.

    A setting in which no query has a positive is left out (e.g. Hard on a set without hard
    positives).
    """
    if all("ok" in g for g in gnd):
        settings = {"all": list(gnd)}
    else:
        missing = [k for k in ("easy", "hard", "junk") if any(k not in g for g in gnd)]
        if missing:
            raise ValueError(f"ground truth entries need 'ok', or 'easy', 'hard' and 'junk'; "
                             f"missing {', '.join(repr(k) for k in missing)}")
        settings = {s: protocol_gnd(gnd, s) for s in PROTOCOLS}
    out: dict[str, dict[str, Any]] = {}
    for name, g in settings.items():
        if not any(np.asarray(x["ok"]).size for x in g):
            continue
        m, aps, pr, _ = compute_map(ranks, g, kappas)
        out[name] = {"map": m, "mp_at_k": {str(k): float(p) for k, p in zip(kappas, pr)},
                     "n_queries": int((~np.isnan(aps)).sum())}
    return out
