"""A population-based sweep's trial: a driver that fits a Ray Train ``TorchTrainer`` (Train
V2) and gives Tune what PBT needs, a Tune checkpoint at every Train checkpoint.

Train V2's ``TuneReportCallback`` forwards metrics only, so PBT would find no checkpoint to
copy. Here a Train callback (on Train's controller) hands each report and its checkpoint's
URI to the trial, whose own thread reports them to Tune with a small Tune checkpoint: a
``pointer.json`` that names the trial's run and that Train checkpoint (its URI, global step).

At an exploit, Tune restarts the losing trial with the winner's pointer. The trial copies the
checkpoint it names into its own run folder, as a new checkpoint (files first, manifest last):
the newest one there, so the trial's run resumes from it exactly as from its own: the
winner's weights, optimizer, centers, global step and data position, with the trial's new
values. Schedules are arrays over global steps built from the config, so from that step on
each scheduled value follows the schedule of the new value (no jump back to its start). The
two runs never share a folder: the winner's checkpoint is only read.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any

from service import storage
from service.config import validate
from service.storage import checkpoints as ckpt
from service.sweep.lineage import LineageRow, append_row, trial_rows
from service.sweep.plan import trial_config
from service.sweep.stopper import OBJECTIVE, CollapseStopper

POINTER = "pointer.json"
DONE = "__done__"
TIME_ATTR = "pbt_epoch"  # PBT's clock: the report's epoch, absent from the last epoch's
COLLAPSED = -1.0  # the objective a collapsed trial reports: below any k-NN, so PBT replaces it


def write_pointer(folder: str, run_name: str, checkpoint: str, step: int) -> str:
    with open(os.path.join(folder, POINTER), "w") as f:
        json.dump({"run_name": run_name, "checkpoint": checkpoint, "step": step}, f)
    return folder


def read_pointer(folder: str) -> dict[str, Any]:
    """The pointer in a Tune checkpoint's folder: JSON only, three fields checked."""
    with open(os.path.join(folder, POINTER)) as f:
        data = json.load(f)
    if not (isinstance(data, dict) and isinstance(data.get("run_name"), str)
            and isinstance(data.get("checkpoint"), str) and isinstance(data.get("step"), int)):
        raise ValueError(f"{folder}/{POINTER}: not a pointer as dino writes it: {data!r}")
    return data


def copy_checkpoint(source: str, run_url: str) -> str:
    """A new checkpoint in ``run_url`` with the files of the committed checkpoint
    ``source`` (verified first), the manifest written last; returns its URI."""
    from service.train.context import checkpoint_name

    manifest = ckpt.read_manifest(source)
    target = storage.join(run_url, checkpoint_name())
    fs, src = storage.get_fs(source)
    _, dst = storage.get_fs(target)
    fs.makedirs(dst, exist_ok=True)
    for name in [*manifest["files"], ckpt.MANIFEST]:
        storage.with_retries(lambda n=name: fs.copy(f"{src}/{n}", f"{dst}/{n}"),
                             f"copy of {source}/{name}", url=target)
    return target


def report_bridge(items: Any) -> Any:
    """A Train callback that puts each report's rank-0 metrics and checkpoint path on
    ``items`` (a ``ray.util.queue.Queue`` the trial reads)."""
    from ray.train.v2.api.callback import UserCallback

    class ReportBridge(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            items.put({"metrics": dict(metrics[0]),
                       "checkpoint": checkpoint.path if checkpoint else None})

    return ReportBridge()


class PopulationTrial:
    """One trial of a PBT/PB2 sweep, run by Tune's function trainable ``__call__``."""

    def __init__(self, config: dict[str, Any], keys: list[str], stopper: CollapseStopper,
                 sweep_url: str) -> None:
        from ray import tune

        self.name = tune.get_context().get_trial_name()  # its run name; the config's
        # "__trial__" is the trial it was cloned from after an exploit
        self.values = {k: config[k] for k in keys}
        base = config["__base__"]
        self.cfg = validate({**trial_config(base, self.values), "run_name": self.name})
        self.run_url = storage.join(self.cfg.storage.root, self.name)
        self.sweep_url, self.stopper = sweep_url, stopper

    def start(self) -> None:
        """Copies the winner's checkpoint on an exploit, and writes the lineage row of this
        start (the first, or an exploit)."""
        from ray import tune

        given = tune.get_checkpoint()
        pointer = None
        if given is not None:
            with given.as_directory() as d:
                pointer = read_pointer(d)
        if pointer is not None and pointer["run_name"] != self.name:
            copy = copy_checkpoint(pointer["checkpoint"], self.run_url)
            print(f"[dino] {self.name}: exploit: copied {pointer['run_name']}'s checkpoint "
                  f"of step {pointer['step']} ({pointer['checkpoint']}) to {copy}; from step "
                  f"{pointer['step']} on: {self._values()}", flush=True)
            append_row(self.sweep_url, LineageRow(
                trial=self.name, step=pointer["step"], event="exploit",
                source=pointer["run_name"], values=self.values))
        elif not trial_rows(self.sweep_url, self.name):
            append_row(self.sweep_url, LineageRow(trial=self.name, step=0, event="start",
                                                  values=self.values))

    def _values(self) -> str:
        return ", ".join(f"{k}={v:.6g}" for k, v in self.values.items())

    def report(self, item: dict[str, Any], tracker: Any) -> None:
        """One Train report to Tune: the collapse check's verdict in the objective, the
        checkpoint as a pointer, the current values to MLflow."""
        import ray.tune

        metrics = {k: v for k, v in item["metrics"].items() if k != "checkpoint_dir_name"}
        if isinstance(metrics.get("epoch"), int) and metrics["epoch"] < self.cfg.train.epochs:
            metrics[TIME_ATTR] = metrics["epoch"]  # not at the end: nothing left to train
        if self.stopper("trial", metrics):
            metrics[OBJECTIVE] = COLLAPSED
            metrics["collapsed"] = self.stopper.reasons.pop("trial")
        if isinstance(metrics.get("step"), int):
            tracker.log_metrics({f"pbt.{k}": float(v) for k, v in self.values.items()},
                                metrics["step"])
        path = item["checkpoint"]
        if path is None:
            ray.tune.report(metrics)
            return
        uri = storage.join(self.run_url, path.rstrip("/").split("/")[-1])
        with tempfile.TemporaryDirectory(prefix="dino-pointer-") as d:
            write_pointer(d, self.name, uri, int(metrics.get("step", 0)))
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(d))


def run_population_trial(trial: PopulationTrial, fit: Any, tracker: Any) -> None:
    """Fits in a thread of its own (``fit(callback)``) while this thread, Tune's, reports
    what the bridge hands over; re-raises the fit's error."""
    from ray.util.queue import Empty, Queue

    items = Queue(maxsize=0, actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fit(report_bridge(items))
        except BaseException as err:  # noqa: BLE001 - handed to Tune's thread below
            failure.append(err)
        finally:
            items.put(DONE)

    worker = threading.Thread(target=target, name=f"fit-{trial.name}", daemon=True)
    worker.start()
    while True:
        try:
            item = items.get(timeout=1.0)
        except Empty:
            continue
        if item == DONE:
            break
        trial.report(item, tracker)
    worker.join()
    if failure:
        raise failure[0]
