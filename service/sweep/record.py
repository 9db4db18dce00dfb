"""A sweep's own record in its folder, JSON only: ``sweep.json`` (written once, at the start:
the spec, the base config and every trial's values) and ``trials/<run_name>.json`` (a trial's
status and results, rewritten by the driver as they come).

``dino tune --resume`` rebuilds the sweep from these and never opens Ray Tune's files beside
them: ``tuner.pkl``, ``basic-variant-state-*.json`` and the trials' ``params.pkl`` and
``error.pkl`` are pickles, ``experiment_state-*.json`` embeds some, and loading one runs
whatever code anyone who can write to the storage put there (issue 27). What is read here is
checked against a schema; a file that fails is refused, naming the file and the field, before
anything of it is used.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError as _Invalid

from service import storage
from service.errors import ConfigError

FORMAT = "dino-sweep/1"
RECORD = "sweep.json"
TRIALS = "trials"
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a run name's rule: no '/', no leading '.'
Value = StrictBool | StrictInt | StrictFloat | StrictStr  # what a search space's values are


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SpecRecord(_Strict):
    """``SweepSpec`` as written at the start; the plan below was drawn from it."""

    space: dict[str, StrictStr]
    num_samples: int = Field(ge=1)
    max_concurrent: int = Field(ge=1)
    asha_grace: int = Field(ge=1)
    scheduler: Literal["asha", "pbt", "pb2"] = "asha"
    perturbation_interval: int = Field(1, ge=1)
    collapse_patience: int = Field(ge=1)
    collapse_margin: float = Field(ge=0, lt=0.5)


class SweepRecord(_Strict):
    """The whole plan of a sweep: trial ``i`` trains ``base`` with ``trials[i]`` set, as the
    run ``<name>-t<i>`` (``results.trial_run_name``)."""

    format: Literal["dino-sweep/1"]
    name: str = Field(pattern=NAME)
    spec: SpecRecord
    base: dict[str, Any]  # a DinoConfig as data; validated by the caller (``config.validate``)
    trials: list[dict[str, Value]] = Field(min_length=1)


class TrialResult(_Strict):
    """What the driver saw of one trial. Each value is the latest one reported, kept from
    report to report: Ray Train's reports differ (a mid-epoch checkpoint has no k-NN and no
    teacher entropy), so no single report holds them all."""

    status: Literal["pending", "running", "ok", "error", "collapsed"] = "pending"
    detail: str = ""  # why it collapsed, or its error
    best_objective: float | None = None
    last_objective: float | None = None
    teacher_entropy: float | None = None
    epochs: int | None = Field(None, ge=0)  # epochs completed, as the run last reported
    step: int | None = Field(None, ge=0)

    @property
    def finished(self) -> bool:
        """Ended for good (trained to the end, or stopped by ASHA or the collapse check);
        anything else runs again on ``--resume``."""
        return self.status in ("ok", "collapsed")


def trial_url(sweep_url: str, run_name: str) -> str:
    return storage.join(sweep_url, TRIALS, f"{run_name}.json")


def write_json(url: str, data: dict[str, Any]) -> None:
    """Writes ``data`` whole or not at all (a local file is replaced by a rename; an object
    store's PUT is atomic), retried through outages."""
    blob = json.dumps(data, indent=1, allow_nan=False).encode()
    if storage.is_local(url):
        path = url.removeprefix("file://")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        return
    fs, path = storage.get_fs(url)
    storage.with_retries(lambda: fs.pipe_file(path, blob), f"write of {url}", url=url)


def read_json(url: str, what: str) -> dict[str, Any] | None:
    """The JSON object at ``url`` (None: no such file). Anything else, a pickle planted
    there included, is refused unread: ``json.loads`` builds only plain data."""
    fs, path = storage.get_fs(url)
    try:
        blob = storage.with_retries(lambda: fs.cat_file(path), f"read of {url}", url=url)
    except storage.StorageError as err:
        if isinstance(err.__cause__, FileNotFoundError | IsADirectoryError):
            return None
        raise
    try:
        data = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{url}: refused: not the JSON {what} that dino writes "
                          f"({type(err).__name__}: {str(err)[:120]}); nothing of it was "
                          "loaded or run") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{url}: refused: the {what} must be a JSON object, not "
                          f"{type(data).__name__}")
    return data


def checked(model: type[_Strict], data: dict[str, Any], url: str) -> Any:
    """``model`` built from ``data``; a ConfigError naming ``url`` and each bad field."""
    try:
        return model.model_validate(data)
    except _Invalid as err:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
                           for e in err.errors()[:5])
        raise ConfigError(f"{url}: refused: not a {model.__name__} as dino writes it "
                          f"({fields})") from None


def read_trial(sweep_url: str, run_name: str) -> TrialResult:
    """A trial's recorded result; ``pending`` when none was written yet."""
    url = trial_url(sweep_url, run_name)
    data = read_json(url, "trial result")
    return TrialResult() if data is None else checked(TrialResult, data, url)


class TrialLog:
    """The trials' results as the driver sees them, each rewritten to its
    ``trials/<run_name>.json`` when it changes (the state ``--resume`` starts from)."""

    def __init__(self, sweep_url: str, results: dict[str, TrialResult]) -> None:
        self.sweep_url = sweep_url
        self.results = results

    def _save(self, run_name: str, **changes: Any) -> None:
        old = self.results[run_name]
        new = old.model_copy(update=changes)
        if new != old:
            self.results[run_name] = new
            write_json(trial_url(self.sweep_url, run_name), new.model_dump())

    def started(self, run_name: str) -> None:
        self._save(run_name, status="running", detail="")

    def reported(self, run_name: str, result: dict[str, Any], objective: str) -> None:
        """Takes each value this report has, keeping the others from earlier reports."""
        old = self.results[run_name]
        changes: dict[str, Any] = {}
        value = _finite(result.get(objective))
        if value is not None:
            changes["last_objective"] = value
            best = old.best_objective
            changes["best_objective"] = value if best is None else max(best, value)
        if (h := _finite(result.get("teacher_entropy"))) is not None:
            changes["teacher_entropy"] = h
        for key, field in (("epoch", "epochs"), ("step", "step")):
            if isinstance(result.get(key), int) and result[key] >= 0:
                changes[field] = result[key]
        self._save(run_name, **changes)

    def ended(self, run_name: str, status: str, detail: str = "") -> None:
        self._save(run_name, status=status, detail=detail[:2000])


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
