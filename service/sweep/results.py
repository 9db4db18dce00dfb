"""A sweep's spec and results: the table of trials (best first), the heat map of the
objective, the best trial's backbone, published to storage and the parent MLflow run."""

from __future__ import annotations

import csv
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from service import storage
from service.config import DinoConfig
from service.sweep.heatmap import objective_heatmap
from service.sweep.lineage import LineageRow, write_csv
from service.sweep.record import TrialResult
from service.sweep.space import DEFAULT_SPACE
from service.sweep.stopper import OBJECTIVE
from service.tracking import Tracker


def trial_run_name(sweep: str, index: int) -> str:
    """The Train run (checkpoints, MLflow child run) of trial ``index`` of the sweep's plan:
    the same name whenever the sweep runs or resumes."""
    return f"{sweep}-t{index:03d}"


@dataclass
class SweepSpec:
    name: str
    space: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    num_samples: int = 1  # repeats of the grid (random/log-uniform draw again each time)
    max_concurrent: int = 2
    asha_grace: int = 2  # epochs before ASHA may stop a trial
    scheduler: str = "asha"  # asha | pbt | pb2 (service.sweep.schedulers)
    perturbation_interval: int = 1  # epochs between PBT/PB2's exploits (k-NN is per epoch)
    collapse_patience: int = 2  # reports at chance before a trial counts as collapsed
    collapse_margin: float = 0.05  # entropy within 5% of 0 or log K is collapse


def status_label(result: TrialResult) -> str:
    """``ok``, ``collapsed: <why>``, ``error: <what>``, or ``not finished`` (``--resume``
    runs it)."""
    if result.status in ("collapsed", "error"):
        return f"{result.status}: {result.detail}" if result.detail else result.status
    return "ok" if result.status == "ok" else "not finished"


def result_rows(name: str, trials: list[dict[str, Any]], results: dict[str, TrialResult],
                root: str) -> list[dict[str, Any]]:
    """One row per trial of the plan, best first. Each value is the trial's own latest
    report of it (``record.TrialLog``), None where it never reported one: a row is never
    read off a single report, which may lack them (a mid-epoch checkpoint's report has no
    teacher entropy and the epoch still in progress)."""
    rows = []
    for i, values in enumerate(trials):
        run_name = trial_run_name(name, i)
        r = results[run_name]
        rows.append({
            **values,
            OBJECTIVE: r.best_objective,
            "last_" + OBJECTIVE: r.last_objective,
            "teacher_entropy": r.teacher_entropy,
            "epochs": r.epochs,
            "status": status_label(r),
            "run_name": run_name,
            "run_url": storage.join(root, run_name),
        })
    # best first; a collapsed trial or one that failed is never ranked above a healthy one
    rows.sort(key=lambda x: (x["status"] != "ok",
                             -x[OBJECTIVE] if x[OBJECTIVE] is not None else math.inf))
    return rows


def publish(rows: list[dict], spec: SweepSpec, sweep_url: str, parent: Tracker,
            base: DinoConfig, lineage: list[LineageRow] | None = None) -> None:
    """The results table, the heat map and the best trial's backbone, into the sweep's
    folder and onto its MLflow parent run; of a population-based sweep also its lineage
    (``pbt_lineage.csv``) and the picture of its schedules (``pbt_schedules.png``)."""
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
        if lineage:
            from service.sweep.lineage_plot import schedules_plot

            files.append(write_csv(os.path.join(d, "pbt_lineage.csv"), lineage))
            files.append(schedules_plot(lineage, {r["run_name"]: r[OBJECTIVE] for r in rows},
                                        os.path.join(d, "pbt_schedules.png")))
        ok = [r for r in rows if r["status"] == "ok" and r[OBJECTIVE] is not None]
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
