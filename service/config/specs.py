"""``dino_core``'s specs built from the config sections, field names shared, no copies.

A section's fields that a spec also has go across by name; a spec field the section lacks
(``NetworkSpec.img_size``, taken from the global crop) is passed explicitly.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from pydantic import BaseModel

from dino_core.specs import MultiCropSpec, NetworkSpec, RecipeSpec, ScheduleSpec
from service.config.schema import DinoConfig


def _shared(spec: type, *sections: BaseModel) -> dict[str, Any]:
    names = {f.name for f in fields(spec)}
    out: dict[str, Any] = {}
    for section in sections:
        out |= {k: v for k, v in section.model_dump().items() if k in names}
    return out


def network_spec(cfg: DinoConfig) -> NetworkSpec:
    ibot = cfg.loss.ibot_weight > 0  # the mask token and the iBOT head only with iBOT
    return NetworkSpec(img_size=cfg.aug.global_size, mask_token=ibot,
                       ibot_separate_head=ibot and cfg.loss.ibot_separate_head,
                       **_shared(NetworkSpec, cfg.model))


def recipe_spec(cfg: DinoConfig) -> RecipeSpec:
    """The recipe's settings: ``loss.*`` and ``optim.*`` by name, ``gram.x`` as ``gram_x``."""
    shared = _shared(RecipeSpec, cfg.loss, cfg.optim)
    shared["mask_ratio"] = tuple(shared["mask_ratio"])
    gram = {f"gram_{k}": v for k, v in cfg.gram.model_dump().items()}
    return RecipeSpec(**shared, **gram)


def schedule_spec(cfg: DinoConfig) -> ScheduleSpec:
    return ScheduleSpec(**_shared(ScheduleSpec, cfg.optim, cfg.loss))


def multicrop_spec(cfg: DinoConfig) -> MultiCropSpec:
    shared = _shared(MultiCropSpec, cfg.aug)
    shared["global_scale"], shared["local_scale"] = (tuple(shared["global_scale"]),
                                                     tuple(shared["local_scale"]))
    return MultiCropSpec(**shared)


def backbone_meta(cfg: DinoConfig) -> dict[str, Any]:
    """What ``dino_core.interop.export`` stores beside the weights to rebuild the backbone."""
    return {"arch": cfg.model.arch, "patch_size": cfg.model.patch_size,
            "depth": cfg.model.depth, "img_size": cfg.aug.global_size,
            "pos_embed_interpolation": cfg.model.pos_embed_interpolation}


CONFIG_KEY = "dino_config"  # metadata key of the run's config in an exported backbone file


def run_metadata(cfg: DinoConfig) -> dict[str, str]:
    """What an exported backbone file carries besides the model: the run's resolved config
    (the data and eval settings an evaluation of the file needs)."""
    return {CONFIG_KEY: json.dumps(cfg.model_dump(mode="json"))}
