"""Which run settings an evaluation on labeled splits uses, and one line that says so.

The procedural set (classes, image size, difficulty, colours, seed) and the eval image size
decide what a k-NN or linear score means: a backbone trained on 48 px grey shapes scored on the
default 64 px colourful set at 224 px falls below chance. Our checkpoints and exported files
hold the run's settings; a reference ``.pth`` or a released backbone holds none, so the
defaults are used there, unless ``--preset``/``--config``/``key=value`` give the run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.config import DinoConfig, apply_overrides, load_config, parse_source, validate
from service.config.sources import ProceduralSource

FLAGS_HINT = (
    "give the run's with --preset NAME, --config FILE or key=value such as "
    "data.procedural_image_size=48, and the side with --image-size"
)


@dataclass(frozen=True)
class EvalSettings:
    """The config an evaluation reads its procedural set and image size from.

    Attributes:
        cfg: the settings.
        origin: ``file`` (the checkpoint's own), ``defaults``, or the flags that gave them
            (``--preset quickstart``, ``--config run.yaml``).
        said: how the line names the origin.
    """

    cfg: DinoConfig
    origin: str
    said: str


def eval_settings(
    checkpoint: str,
    file_cfg: DinoConfig | None,
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> EvalSettings:
    """The settings of an evaluation: ``--preset``/``--config`` when given, else the file's,
    else the defaults; ``key=value`` overrides on top of any of them."""
    overrides = list(overrides)
    extra = f" with {' '.join(overrides)}" if overrides else ""
    if preset or config_file:
        given = " ".join(
            f
            for f in (preset and f"--preset {preset}", config_file and f"--config {config_file}")
            if f
        )
        return EvalSettings(load_config(preset, config_file, overrides), given, given + extra)
    if file_cfg is not None:
        cfg = file_cfg
        if overrides:
            cfg = validate(
                apply_overrides(file_cfg.model_dump(mode="json"), overrides), new_run=False
            )
        # the same words for a checkpoint and its exported file: the same run, the same result
        return EvalSettings(cfg, "file", f"the run's, stored in the checkpoint{extra}")
    said = f"the defaults{extra} ({checkpoint} holds no run settings; {FLAGS_HINT})"
    return EvalSettings(load_config(None, None, overrides), "defaults", said)


def procedural_description(cfg: DinoConfig) -> dict[str, Any]:
    """The procedural set's settings, as ``--json`` reports them."""
    d, e = cfg.data, cfg.eval
    return {
        "classes": d.procedural_classes,
        "image_size": d.procedural_image_size,
        "colourful": d.procedural_colourful,
        "difficulty": d.procedural_difficulty,
        "seed": d.seed,
        "train_size": e.procedural_train_size,
        "val_size": e.procedural_val_size,
    }


def describe(
    what: str, settings: EvalSettings, train: str, val: str, image_size: int, size_given: bool
) -> dict[str, Any]:
    """``{"from", "train", "val", "procedural" (if a split is), "note"}``: the note is one line
    naming the splits, the procedural set, the image size and where each came from."""
    out: dict[str, Any] = {"from": settings.origin, "train": train, "val": val}
    procedural = [s for s in (train, val) if isinstance(parse_source(s), ProceduralSource)]
    splits = f"train {train}, val {val}"
    if procedural:
        p = out["procedural"] = procedural_description(settings.cfg)
        look = "colourful" if p["colourful"] else "grey"
        splits += (
            f" (procedural set: {p['classes']} classes, {p['image_size']} px, {look}, "
            f"difficulty {p['difficulty']:g}, seed {p['seed']}, {p['train_size']} train "
            f"/ {p['val_size']} val images)"
        )
    side = f"--image-size {image_size}" if size_given else "eval.image_size"
    out["note"] = f"{what}: {splits}; image size {image_size} ({side}); settings: {settings.said}"
    return out
