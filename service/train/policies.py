"""The small named policies the loop asks at every step: when to log, checkpoint and
evaluate (``Cadence``), what a non-finite loss does (``NonFiniteGuard``), and the fault
drill that feeds NaN crops at chosen steps (``FaultInjector``)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from dino_core import NonFiniteLossError, StepOutput
from service.config import DinoConfig

log = logging.getLogger(__name__)


class Cadence:
    """When things happen, by global step and epoch (``train.*_every_*``, ``eval.*``)."""

    def __init__(self, cfg: DinoConfig, niter_per_ep: int) -> None:
        self.t, self.e, self.niter_per_ep = cfg.train, cfg.eval, niter_per_ep

    def log_due(self, step: int) -> bool:
        return step % self.t.log_every_steps == 0

    def step_checkpoint_due(self, step: int, batch_in_epoch: int) -> bool:
        """Every ``train.checkpoint_every_steps``, except at the end of an epoch (the epoch's
        own report follows)."""
        every = self.t.checkpoint_every_steps
        return bool(every) and step % every == 0 and batch_in_epoch < self.niter_per_ep

    def epoch_checkpoint_due(self, epoch: int, epoch_done: bool, finished: bool) -> bool:
        every = self.t.checkpoint_every_epochs
        return finished or bool(every and epoch_done and epoch % every == 0)

    def knn_due(self, epoch: int, epoch_done: bool, finished: bool) -> bool:
        every = self.e.knn_every_epochs
        return bool(every) and (finished or (epoch_done and epoch % every == 0))


class NonFiniteGuard:
    """``train.on_nonfinite``: stop (the default; nothing of the bad step was applied, so the
    last checkpoint and the state are good) or skip-and-count up to ``max_skipped_steps``.

    With the deferred check (GPU), a bad step is a no-op on the device and only counted
    there; ``check`` reads the count (one host sync) at log steps and before checkpoints.
    """

    def __init__(self, cfg: DinoConfig, deferred: bool, device: torch.device,
                 on_stop: Callable[[int], None], announce: Callable[[str], None]) -> None:
        self.t, self.deferred = cfg.train, deferred
        self.on_stop, self.announce = on_stop, announce
        self.skipped = 0
        self._bad = torch.zeros((), dtype=torch.long, device=device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._seen = 0

    def record(self, out: StepOutput, step: int) -> None:
        """Deferred mode: counts the step on the device if it was not finite (no sync)."""
        if self.deferred:
            bad = ~out.finite
            self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
            self._bad += bad

    def check(self) -> None:
        """Deferred mode: acts on the bad steps counted since the last check."""
        if not self.deferred:
            return
        seen = int(self._bad.item())
        new = seen - self._seen
        if new <= 0:
            return
        self._seen = seen
        first = int(self._first_bad.item())
        self._first_bad.fill_(-1)
        self.failed(NonFiniteLossError(first, float("nan")), new)

    def failed(self, err: NonFiniteLossError, count: int = 1) -> None:
        """Raises to stop the run, or counts the skipped step(s) and goes on."""
        self.skipped += count
        t = self.t
        if t.on_nonfinite == "stop" or self.skipped > t.max_skipped_steps:
            self.on_stop(self.skipped)
            if t.on_nonfinite == "skip":
                raise RuntimeError(
                    f"gave up after {self.skipped} non-finite steps, the last at step "
                    f"{err.step} (train.max_skipped_steps={t.max_skipped_steps})") from err
            raise err
        log.warning("%s; skipped (%d so far)", err, self.skipped)
        self.announce(f"[dino] non-finite loss at step {err.step}: step skipped "
                      f"({self.skipped} so far, at most {t.max_skipped_steps})")


class FaultInjector:
    """A drill for rehearsals and tests, set in the run's config only
    (``drill.nonfinite_steps=[5,9]``, never from the environment: a stray variable must not
    put NaNs into a real run): NaN crops at those global steps, so a real NaN loss goes
    through the real step."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def crops(self, crops: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        return [c * float("nan") for c in crops] if step in self.steps else crops
