"""Loading a config: preset -> YAML file (or a mapping given in code) -> ``key=value``
overrides -> environment defaults, then validation, before any Ray resource is taken. Also
its YAML and flat (MLflow) forms."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from service.config.presets import load_preset
from service.config.schema import DinoConfig
from service.config.sources import absolute
from service.config.value_changes import value_change_problems
from service.errors import ConfigError


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = _section_for(e["loc"][:-1])
            allowed = ", ".join(section.model_fields) if section else "?"
            lines.append(f"{loc}: unknown key; allowed keys here: {allowed}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "" if e["type"] == "value_error" else f" (got {e.get('input')!r})"
            lines.append(f"{loc or 'config'}: {msg}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = DinoConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return None
        model = field.annotation
    return model


def validate(data: dict[str, Any], new_run: bool = True) -> DinoConfig:
    """Builds a config from plain data; raises ConfigError naming every bad field.

    ``new_run=False`` for a config read back from a checkpoint: the schema alone, without
    ``new_run_problems``, so runs trained before a rule was added still load."""
    try:
        cfg = DinoConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    problems = new_run_problems(cfg) if new_run else []
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


def new_run_problems(cfg: DinoConfig) -> list[str]:
    """Rules a config to train with must keep, beyond the schema's; kept out of the schema
    (which also reads the configs saved in checkpoints) so older runs still evaluate."""
    problems = crops_off_the_patch_grid(cfg)
    for name, student in cfg.student_configs().items():  # distillation's extra students
        problems += [f"train.distill.students.{name}: {p}"
                     for p in crops_off_the_patch_grid(student)]
    return problems + value_change_problems(cfg)


def crops_off_the_patch_grid(cfg: DinoConfig) -> list[str]:
    """A ViT cuts each crop into ``model.patch_size`` squares (a stride-p convolution): the
    last ``size % p`` pixel rows and columns of a crop that is not a multiple are never seen,
    without a word (``model.patch_size=7`` with 32 px crops trained so). ResNet has no
    patches; local crops count only when there are some (``aug.n_local``)."""
    if cfg.model.arch == "resnet50":
        return []
    p = cfg.model.patch_size
    crops = [("aug.global_size", cfg.aug.global_size)]
    if cfg.aug.n_local:
        crops.append(("aug.local_size", cfg.aug.local_size))
    out = []
    for name, size in crops:
        if size % p:
            below, above = size // p * p, (size // p + 1) * p
            nearest = f"{below} or {above}" if below else f"{above}"
            out.append(f"{name}={size} is not a multiple of model.patch_size={p}: the ViT "
                       f"would never see the last {size % p} px rows and columns of each "
                       f"crop; use {name}={nearest}, or another model.patch_size")
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``optim.lr=1e-3`` -> (['optim', 'lr'], 0.001); the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw  # not YAML: the string itself, for the schema to judge
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    preset: str | None = None, file: str | None = None, overrides: list[str] | None = None,
    sections: Mapping[str, Any] | None = None,
) -> DinoConfig:
    """preset -> YAML file -> ``sections`` (the same mapping a file holds, given in code) ->
    overrides, then environment defaults, then validation."""
    data: dict[str, Any] = load_preset(preset) if preset else {}
    if file:
        if not os.path.isfile(file):
            raise ConfigError(f"--config {file}: no such file")
        with open(file) as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(f"{file}{where}: not valid YAML ({problem})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        data = deep_merge(data, loaded)
    if sections is not None:
        if not isinstance(sections, Mapping):
            raise ConfigError(f"config: a mapping of sections, got {type(sections).__name__}")
        data = deep_merge(data, copy.deepcopy(dict(sections)))
    data = apply_overrides(data, overrides or [])
    for (section, key), value in environment_defaults().items():
        data.setdefault(section, {}).setdefault(key, value)
    return validate(data)


# The environment variables that give config defaults: read here and nowhere else.
ENVIRONMENT = {
    ("storage", "root"): "DINO_STORAGE",
    ("storage", "retry_seconds"): "DINO_STORAGE_RETRY_SECONDS",
    ("storage", "spool_dir"): "DINO_STORAGE_SPOOL_DIR",
    ("tracking", "uri"): "MLFLOW_TRACKING_URI",
    ("ray", "address"): "RAY_ADDRESS",
}


def environment_defaults(env: Mapping[str, str] = os.environ) -> dict[tuple[str, str], str]:
    """``{(section, key): value}`` of the variables in ``ENVIRONMENT`` that are set."""
    return {where: env[name] for where, name in ENVIRONMENT.items() if env.get(name)}


def resolve_paths(cfg: DinoConfig) -> DinoConfig:
    """Local paths made absolute: Ray workers run in another working directory."""

    cfg = cfg.model_copy(deep=True)
    cfg.storage.root = absolute(cfg.storage.root)
    cfg.data.path = absolute(cfg.data.path)
    cfg.eval.train_path = absolute(cfg.eval.train_path)
    cfg.eval.val_path = absolute(cfg.eval.val_path)
    if cfg.train.resume:
        cfg.train.resume = absolute(cfg.train.resume)
    if cfg.train.distill.teacher:
        cfg.train.distill.teacher = absolute(cfg.train.distill.teacher)
    if cfg.storage.spool_dir:
        cfg.storage.spool_dir = absolute(cfg.storage.spool_dir)
    return cfg


def to_yaml(cfg: DinoConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: DinoConfig) -> dict[str, Any]:
    """``{'optim.lr': 0.0005, ...}`` for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", cfg.model_dump(mode="json"))
    return out
