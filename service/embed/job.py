"""A ``dino embed`` job: the checks before Ray (data, checkpoint, features, ``--out``), the
plan (fresh, resumed, incremental), the pipeline, and the parts and manifest it writes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.embed.output import part_name, part_table, write_manifest, write_part
from service.embed.pipeline import Resources, build_dataset, configure_ray_data, stream
from service.embed.plan import Plan, plan_job
from service.embed.sources import Source, open_source
from service.embed.spec import EmbedSpec, build_spec, check_features
from service.errors import ConfigError
from service.models.backbones import eval_image_size, load_backbone

PROGRESS_SECONDS = 5.0
DEFAULT_PART_ROWS = 10_000
PART_BYTES = 256 * 2**20  # a part of patch grids is cut at about this size


@dataclass
class Checked:
    """Everything known before Ray starts."""

    spec: EmbedSpec
    source: Source
    plan: Plan
    part_rows: int


@dataclass
class EmbedResult:
    out: str
    manifest: dict[str, Any]
    embedded_now: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def check_inputs(checkpoint: str, data: str, out: str, features: str = "cls",
                 weights: str = "teacher", image_size: int | None = None,
                 incremental: bool = False, part_rows: int | None = None) -> Checked:
    """The checks and plan of a job, before any Ray: a bad ``--features``, missing data, an
    unreadable checkpoint or a complete ``--out`` (without ``incremental``) raise here."""
    check_features(features)
    if part_rows is not None and part_rows < 1:
        raise ConfigError(f"--part-rows must be at least 1, got {part_rows}")
    source = open_source(data)
    model, cfg = load_backbone(checkpoint, weights)
    side = eval_image_size(image_size, cfg, model)
    spec = build_spec(checkpoint, weights, features, side, model, source.classes)
    plan = plan_job(out, spec, source, incremental)
    rows = part_rows or max(1, min(DEFAULT_PART_ROWS, PART_BYTES // (spec.row_values * 4)))
    return Checked(spec, source, plan, rows)  # each actor loads its own model


def patch_bytes(checked: Checked) -> int:
    """Bytes of the float16 patch grids this job writes: N x tokens x dim x 2."""
    return checked.plan.total * checked.spec.tokens * checked.spec.dim * 2


def run_embed(checked: Checked, out: str, res: Resources, say: Callable[[str], None],
              verbose: bool = False) -> EmbedResult:
    """Runs the planned job on the Ray this process is connected to (``ray.init`` first)
    and writes the parts and the manifest, complete at the end."""
    start = time.monotonic()
    plan, manifest = checked.plan, checked.plan.manifest
    writer = PartWriter(out, manifest, plan.first_part, checked.part_rows)
    write_manifest(out, manifest)  # complete=false from the first moment: a rerun resumes
    if plan.total and (plan.todo or checked.source.packed):
        configure_ray_data(verbose)
        ds = build_dataset(checked.source, plan.todo, plan.done, checked.spec, res)
        progress = Progress(plan.total, say)
        for batch in stream(ds):
            ok = np.array([not e for e in batch["error"]], dtype=bool)
            manifest["skipped"] += [{"key": str(k), "error": str(e)} for k, e
                                    in zip(batch["key"][~ok], batch["error"][~ok])]
            writer.add(batch["key"][ok], batch["label"][ok], batch["embedding"][ok])
            progress.update(len(ok))
        progress.done()
    writer.flush()
    manifest["complete"] = True
    write_manifest(out, manifest)
    return EmbedResult(out, manifest, writer.written, manifest["skipped"],
                       time.monotonic() - start)


class PartWriter:
    """Cuts the stream of rows into parts of ``rows`` and writes each, then the manifest."""

    def __init__(self, out: str, manifest: dict[str, Any], first: int, rows: int) -> None:
        self.out, self.manifest, self.index, self.rows = out, manifest, first, rows
        self.keys: list[str] = []
        self.labels: list[int] = []
        self.vectors: list[np.ndarray] = []
        self.written = 0

    def add(self, keys: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> None:
        self.keys += [str(k) for k in keys]
        self.labels += [int(y) for y in labels]
        self.vectors += list(vectors)
        while len(self.keys) >= self.rows:
            self._write(self.rows)

    def flush(self) -> None:
        if self.keys:
            self._write(len(self.keys))

    def _write(self, n: int) -> None:
        name = part_name(self.index)
        write_part(self.out, name, part_table(self.keys[:n], self.labels[:n],
                                              np.stack(self.vectors[:n])))
        self.manifest["parts"].append({"file": name, "rows": n})
        self.manifest["count"] += n
        write_manifest(self.out, self.manifest)
        del self.keys[:n], self.labels[:n], self.vectors[:n]
        self.index, self.written = self.index + 1, self.written + n


class Progress:
    """``[dino] embed: N/M images, X img/s, ETA ...`` every few seconds."""

    def __init__(self, total: int, say: Callable[[str], None]) -> None:
        self.total, self.say, self.seen, self.said = total, say, 0, -1
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.seen += n
        if time.monotonic() - self.last >= PROGRESS_SECONDS:
            self._line()

    def done(self) -> None:
        if self.said != self.seen:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self.last, self.said = now, self.seen
        rate = self.seen / max(now - self.start, 1e-9)
        left = max(self.total - self.seen, 0)
        eta = f"{left / rate:.0f} s" if rate > 0 and left else "0 s"
        self.say(f"[dino] embed: {self.seen}/{self.total} images, {rate:.1f} img/s, ETA {eta}")
