"""The weights of a distillation teacher (``train.distill.teacher``), read through storage.

Any backbone ``service.models.backbones`` reads can teach features: an exported
``.safetensors``, a run folder or checkpoint, a reference DINO ``.pth``, Meta's DINOv2 / DINOv3
``.pth``. DINO distillation also needs the teacher's DINO head, which only a training
checkpoint holds (ours, or main_dino's ``checkpoint.pth``); its shape is read from its
tensors (``dino_core.interop.reference_keys.head_meta``), so no setting of the teacher's
run has to be repeated.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dino_core.interop.export import load_backbone as load_backbone_file
from dino_core.interop.reference import build_from_meta, read_reference
from dino_core.interop.reference_keys import head_meta
from dino_core.models import DINOHead, embed_dim_of
from service.errors import ConfigError
from service.models.backbones import (
    checkpoint_backbone,
    fetch_file,
    load_backbone,
    safetensors_metadata,
)
from service.storage import checkpoints as ckpt

SETTING = "train.distill.teacher"
HEAD_PREFIX = "head."


def read_teacher(uri: str, with_head: bool = False) -> tuple[nn.Module, nn.Module | None]:
    """The teacher's backbone (eval mode) and, ``with_head``, its DINO head (else None).

    Raises:
        ConfigError: ``with_head`` and the file holds no head (an exported or released
            backbone file), naming the setting and what to give instead.
        FileNotFoundError, CheckpointError, ValueError: the readers' own, naming ``uri``.
    """
    if uri.endswith(".safetensors"):
        if with_head:
            raise _no_head(uri, "an exported backbone file")
        local = fetch_file(uri)
        safetensors_metadata(local, uri)  # a damaged file: one line naming it
        # not load_backbone: the run settings an evaluation takes from the file mean
        # nothing to a teacher (and their absence is no warning)
        return load_backbone_file(local).eval(), None
    if not with_head:
        return load_backbone(uri)[0], None
    if uri.endswith(".pth"):
        ref = read_reference(fetch_file(uri))
        backbone = build_from_meta(ref.meta)
        backbone.load_state_dict(ref.backbones["teacher"], strict=True)
        head_state = ref.heads.get("teacher")
    else:
        _, state = ckpt.load(uri)
        backbone = checkpoint_backbone(state, "teacher")[0]
        head_state = {k[len(HEAD_PREFIX):]: v for k, v in state["teacher"].items()
                      if k.startswith(HEAD_PREFIX)}
    if not head_state:
        raise _no_head(uri, "a file without a DINO head")
    return backbone.eval(), head_from_state(head_state, embed_dim_of(backbone))


def head_from_state(state: dict[str, Any], in_dim: int) -> DINOHead:
    """A ``DINOHead`` of the shape ``state`` (our key names) holds, with its weights."""
    meta = head_meta(state)
    head = DINOHead(in_dim, meta["out_dim"], use_bn=meta["use_bn"], nlayers=meta["nlayers"],
                    hidden_dim=meta["hidden_dim"] or meta["bottleneck_dim"],
                    bottleneck_dim=meta["bottleneck_dim"])
    head.load_state_dict(state, strict=True)
    return head.eval()


def _no_head(uri: str, what: str) -> ConfigError:
    return ConfigError(
        f"{SETTING}={uri} is {what}: train.distill.objective=dino or both needs the "
        "teacher's DINO head, which a training checkpoint holds; give the teacher's run "
        "folder or checkpoint (or main_dino's checkpoint.pth), or use "
        "train.distill.objective=feature")
