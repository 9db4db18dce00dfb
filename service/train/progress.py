"""The run's console: our own progress lines, the same locally and in a submitted job's logs."""

from __future__ import annotations

import sys
import time


def say(message: str) -> None:
    """A line on the run's console. Ray Train patches ``print`` to log *and* echo when
    stdout is redirected (it always is in a Ray worker), which printed every line twice;
    the process's own stdout is forwarded to the driver once."""
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s")


class Progress:
    """Images per second over the current log window, and the ETA over the whole run."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.started, self.steps_done = time.time(), 0
        self.window_start, self.window_images = time.time(), 0

    def step_done(self, local_images: int) -> None:
        self.steps_done += 1
        self.window_images += local_images * self.world_size

    def images_per_sec(self) -> float:
        return self.window_images / max(time.time() - self.window_start, 1e-9)

    def new_window(self) -> None:
        self.window_start, self.window_images = time.time(), 0

    def line(self, m: dict[str, float], epoch: str, step: int, total: int) -> str:
        rate = (time.time() - self.started) / max(self.steps_done, 1)
        return (f"[dino] epoch {epoch} step {step}/{total} loss {m['loss']:.4f} "
                f"lr {m['lr']:.2e} "
                + (f"H(t) {m['teacher_entropy']:.2f} " if "teacher_entropy" in m else "") +
                f"{m['images_per_sec']:.1f} img/s ETA {format_eta(rate * (total - step))}")
