"""A sweep's spec and results: the table of trials (best first), the heat map of the
objective, the best trial's backbone, published to storage and the parent MLflow run."""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass, field

from service import storage
from service.config import DinoConfig
from service.sweep.heatmap import objective_heatmap
from service.sweep.space import DEFAULT_SPACE
from service.sweep.stopper import OBJECTIVE, CollapseStopper
from service.tracking import Tracker


def trial_run_name(sweep: str, trial_id: str) -> str:
    """The Train run (checkpoints, MLflow child run) of one trial."""
    return f"{sweep}-{trial_id}"


@dataclass
class SweepSpec:
    name: str
    space: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    num_samples: int = 1  # repeats of the grid (random/log-uniform draw again each time)
    max_concurrent: int = 2
    asha_grace: int = 2  # epochs before ASHA may stop a trial
    collapse_patience: int = 2  # reports at chance before a trial counts as collapsed
    collapse_margin: float = 0.05  # entropy within 5% of 0 or log K is collapse


def result_rows(grid, spec: SweepSpec, stopper: CollapseStopper) -> list[dict]:
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        best = float(df[OBJECTIVE].max()) if df is not None and OBJECTIVE in df else float("nan")
        trial_id = (r.metrics or {}).get("trial_id", "")
        status = "error" if r.error else "ok"
        if trial_id in stopper.reasons:
            status = f"collapsed: {stopper.reasons[trial_id]}"
        row = {k: r.config.get(k) for k in spec.space}
        row.update({
            OBJECTIVE: best,
            "last_" + OBJECTIVE: (r.metrics or {}).get(OBJECTIVE, float("nan")),
            "teacher_entropy": (r.metrics or {}).get("teacher_entropy", float("nan")),
            "epochs": (r.metrics or {}).get("epoch"),
            "status": status,
            "run_name": trial_run_name(spec.name, trial_id),
            "trial_dir": r.path,
        })
        rows.append(row)
    rows.sort(key=lambda x: (-(x[OBJECTIVE] if x[OBJECTIVE] == x[OBJECTIVE] else -1e9)))
    return rows


def publish(rows: list[dict], spec: SweepSpec, sweep_url: str, parent: Tracker,
            base: DinoConfig) -> None:
    """The results table, the heat map and the best trial's backbone, into the sweep's
    folder and onto its MLflow parent run."""
    with tempfile.TemporaryDirectory() as d:
        table = os.path.join(d, "results.csv")
        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
            w.writeheader()
            w.writerows(rows)
        files = [table]
        keys = list(spec.space)
        if len(keys) >= 2:
            png = os.path.join(d, "objective_heatmap.png")
            objective_heatmap(rows, keys[0], keys[1], OBJECTIVE, png)
            files.append(png)
        ok = [r for r in rows if r["status"] == "ok" and r[OBJECTIVE] == r[OBJECTIVE]]
        if ok:
            src = storage.join(base.storage.root, ok[0]["run_name"], "teacher_backbone.safetensors")
            if storage.exists(src):
                best = os.path.join(d, "best_teacher_backbone.safetensors")
                storage.download_file(src, best)
                files.append(best)
        fs, path = storage.get_fs(sweep_url)
        for f_ in files:
            target = path.rstrip("/") + "/" + os.path.basename(f_)
            storage.with_retries(lambda f_=f_, t=target: fs.put(f_, t), f"upload of {f_}")
            parent.log_artifact(f_)
        if ok:
            parent.log_metrics({f"best_{OBJECTIVE}": ok[0][OBJECTIVE]}, 0)
            for k in keys:
                parent.set_tag(f"best.{k}", str(ok[0][k]))
        parent.end("FINISHED")
