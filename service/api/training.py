"""``train``: pretrain a backbone (or resume a run), under Ray or in this process."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from service import storage
from service.api.config import Config, Overrides, override_items, resolve
from service.config import DinoConfig, resolve_paths

if TYPE_CHECKING:
    from service.train.driver import TrainResult

Say = Callable[[str], None]


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its text says what was saved and how to go on."""


def unique_run_name(prefix: str = "dino") -> str:
    """``dino-20260101-120000-3fa2c1``: UTC time (sorts by start) and 24 random bits."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def _print(line: str) -> None:
    print(line, flush=True)


def train_config(preset: str | None = None, config: Config = None, overrides: Overrides = None,
                 *, resume: str | None = None, replay: str | None = None,
                 verbose: bool = False, say: Say = _print) -> DinoConfig:
    """The run's validated config: ``resume`` and ``verbose`` as overrides, a replayed
    sweep trial's schedule, and a fresh run name unless one was given."""
    items = override_items(overrides)
    if verbose:
        items.append("ray.verbose=true")
    if resume:
        items.append(f"train.resume={resume}")
    cfg = resolve(preset, config, items)
    if replay:
        return replay_config(replay, cfg, items, say)
    if "run_name" not in cfg.model_fields_set:  # neither the preset, the config nor an override
        # a fresh name: two unnamed runs on one storage root never share a directory
        cfg = cfg.model_copy(update={"run_name": unique_run_name()})
    return cfg


def replay_config(target: str, command: DinoConfig, overrides: list[str],
                  say: Say = _print) -> DinoConfig:
    """The config of a replay of a population-based sweep's trial (``SWEEP[/TRIAL]``)."""
    from service.sweep import replay

    record, chosen = replay.load(target, command.storage.root)
    name = command.run_name if "run_name" in command.model_fields_set else None
    cfg = replay.replay_config(command, record, chosen, overrides, name)
    say(replay.describe(chosen, cfg.run_name))
    return cfg


def train(preset: str | None = None, config: Config = None, overrides: Overrides = None, *,
          resume: str | None = None, replay: str | None = None, in_process: bool = False,
          verbose: bool = False, say: Say = _print) -> TrainResult:
    """Trains ``preset``/``config`` with ``overrides`` to its last epoch; returns where the
    checkpoints, the backbone and the MLflow run are, and the last metrics.

    ``in_process``: no Ray, one worker in this process (the same checkpoints: such a run
    resumes under Ray and the other way round). A run name in use by another driver raises
    RunInUseError; Ctrl-C raises ``TrainInterrupted`` saying what was saved."""
    from service.storage import runlock
    from service.train import driver

    cfg = train_config(preset, config, overrides, resume=resume, replay=replay,
                       verbose=verbose, say=say)
    taught = f" distilled from {cfg.train.distill.teacher}" if cfg.train.distill.teacher else ""
    where = "in this process" if in_process else f"on {driver.workers_label(cfg)} worker(s)"
    say(f"[dino] run {cfg.run_name!r}: {cfg.model.arch}/{cfg.model.patch_size}{taught}, "
        f"{cfg.train.epochs} epochs, global batch {cfg.train.batch_size} {where}, storage "
        f"{cfg.storage.root}")
    try:
        with runlock.hold(resolve_paths(cfg).storage.root, cfg.run_name):
            if in_process:
                from service.train.local import train_in_process

                return train_in_process(cfg)
            return driver.train(cfg)
    except KeyboardInterrupt as err:
        raise TrainInterrupted(interrupted_notice(cfg)) from err


def interrupted_notice(cfg: DinoConfig) -> str:
    """What a Ctrl-C leaves: where to resume from only when the run saved a checkpoint;
    stopped before its first one, a rerun starts again from the beginning (or from
    ``train.resume``), and saying "resume it" would promise work that is not there."""
    from service.storage import checkpoints as ckpt

    resolved = resolve_paths(cfg)
    run = storage.join(resolved.storage.root, cfg.run_name)
    head = f"dino: interrupted: run {cfg.run_name!r} stopped"
    try:
        saved = bool(ckpt.committed(run))
    except Exception:  # noqa: BLE001 - storage does not answer: say no more than is known
        return (f"{head}; the checkpoints it saved, if any, are in {run}: the same command "
                "resumes from the last one")
    if saved:
        return (f"{head}; its checkpoints are in {run}. Resume it with the same command (or "
                f"`dino train ... run_name={cfg.run_name}`).")
    start = (f"from train.resume={resolved.train.resume} again" if resolved.train.resume
             else "from the beginning (step 0)")
    return (f"{head} before its first checkpoint: nothing was saved, and running it again "
            f"starts {start}.")
