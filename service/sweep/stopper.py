"""Stopping collapsed trials: a teacher whose entropy reaches 0 or log K, or a k-NN top-1
that stays at chance."""

from __future__ import annotations

from typing import Any

OBJECTIVE = "knn_top1"


class CollapseStopper:
    """Stops a trial whose teacher entropy is within ``margin`` of 0 or log K (the two
    collapse modes), or whose k-NN top-1 stays at chance for ``patience`` reports."""

    def __init__(self, log_k: float, chance: float, margin: float, patience: int) -> None:
        self.log_k, self.chance = log_k, chance
        self.margin, self.patience = margin, patience
        self.at_chance: dict[str, int] = {}
        self.reasons: dict[str, str] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        h = result.get("teacher_entropy")
        if h is not None and (h < self.margin * self.log_k or h > (1 - self.margin) * self.log_k):
            self.reasons[trial_id] = f"teacher entropy {h:.3f} (log K = {self.log_k:.3f})"
            return True
        knn = result.get(OBJECTIVE)
        if knn is not None:
            if knn <= self.chance * 1.1:
                self.at_chance[trial_id] = self.at_chance.get(trial_id, 0) + 1
            else:
                self.at_chance[trial_id] = 0
            if self.at_chance[trial_id] >= self.patience:
                self.reasons[trial_id] = f"k-NN top-1 {knn:.1f}% at chance ({self.chance:.1f}%)"
                return True
        return False
