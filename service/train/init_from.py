"""``train.init_from``: the weights a new run starts from, with a fresh schedule, optimizer
and step counter (``train.resume`` continues a run instead, and wins when both apply).

The source is a reference DINO file (main_dino's ``checkpoint.pth``, or a released backbone
file such as ``dino_deitsmall16_pretrain.pth``), a Meta DINOv2 / DINOv3 backbone file
(``dinov2_vits14_pretrain.pth``, ``dinov3_vits16_pretrain_lvd1689m-*.pth``: its mask token
goes into the student's iBOT mask token when the student has one of that shape), one of our
checkpoints (a directory, URL or
run folder) or an exported ``.safetensors`` backbone. A checkpoint's teacher goes into the
teacher and its student into the student, heads included, and its center into the loss;
a backbone file's backbone goes into both, and the heads stay freshly initialised. A
position table laid out for another crop size is resampled to the run's as the file's own
model resamples it (the reference formula for DINO v1 and Meta's plain DINOv2 tables;
antialiased to the exact size for Meta's register models, whose tables have no CLS entry
here); any other difference of shapes is
an error naming the keys and the settings that would match.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dino_core.interop import reference_keys as keys
from dino_core.interop.export import backbone_state_from_checkpoint, read_metadata
from dino_core.interop.reference import read_reference
from dino_core.models.position import reference_pos_embed, timm_pos_embed
from service import storage
from service.errors import CheckpointError
from service.storage import checkpoints as ckpt

Tensor = torch.Tensor
FILES = (".pth", ".safetensors")
BACKBONE_SETTINGS = "model.arch, model.patch_size, model.depth"
HEAD_SETTINGS = ("model.out_dim, model.head_nlayers, model.head_hidden_dim, "
                 "model.head_bottleneck_dim, model.use_bn_in_head")


@dataclass
class InitWeights:
    """Backbone and head state dicts (our names) by ``teacher``/``student``, and a center."""

    what: str
    backbones: dict[str, dict[str, Tensor]]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    center: Tensor | None = None
    mask_token: Tensor | None = None  # Meta's files: iBOT's learned token (1, D)
    notes: list[str] = field(default_factory=list)


def _local(uri: str) -> str:
    if storage.is_local(uri):
        return uri.removeprefix("file://")
    return str(storage.download_file(uri, Path(tempfile.mkdtemp()) / ("init" + Path(uri).suffix)))


def read_init_weights(uri: str) -> InitWeights:
    if uri.endswith(".pth"):
        ref = read_reference(_local(uri))
        what = {"checkpoint": f"reference checkpoint (epoch {ref.epoch})",
                "backbone": "reference backbone file"}.get(ref.kind,
                                                            f"Meta's {ref.kind} backbone file")
        return InitWeights(what, ref.backbones, ref.heads, ref.center, ref.mask_token,
                           list(ref.notes))
    if uri.endswith(".safetensors"):
        local = _local(uri)
        try:
            meta = read_metadata(local)
        except SafetensorError as err:
            raise CheckpointError(f"train.init_from={uri} is not a readable .safetensors file "
                                  f"({err}): truncated or not one at all") from None
        if meta.get("format") != "dino-backbone-v1":
            raise ValueError(f"train.init_from={uri} is not a DINO backbone file")
        return InitWeights("exported backbone", {"teacher": load_file(local)})
    where, state = ckpt.load(uri)
    out = InitWeights(f"checkpoint {where} (step {state.get('global_step')})", {}, {},
                      state.get("center"))
    for which in ("teacher", "student"):
        out.backbones[which] = backbone_state_from_checkpoint(state, which)
        out.heads[which] = {k[len("head."):]: v for k, v in state[which].items()
                            if k.startswith("head.")}
    return out


def _describe(describe: Any, state: dict[str, Tensor]) -> str:
    try:
        return str(describe(state))
    except (KeyError, ValueError, IndexError):
        return "of another layout"


def _load(module: nn.Module, state: dict[str, Tensor], part: str, uri: str,
          notes: list[str]) -> None:
    own = module.state_dict()
    state = dict(state)
    pos, mine = state.get("pos_embed"), own.get("pos_embed")
    if pos is not None and mine is not None and pos.shape != mine.shape \
            and pos.shape[-1] == mine.shape[-1]:
        # a table of s * s entries has no CLS entry (Meta's register models, timm's resize);
        # one of 1 + s * s has (DINO v1, Meta's plain DINOv2: the reference formula)
        prefix = 0 if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1] else 1
        side = math.isqrt(mine.shape[1] - prefix)
        with torch.no_grad():
            table = (timm_pos_embed(pos.float(), side, side, num_prefix_tokens=0) if prefix == 0
                     else reference_pos_embed(pos.float(), side, side))
            state["pos_embed"] = table.to(pos.dtype)
        way = "antialiased, as Meta's register models" if prefix == 0 else "the reference formula"
        note = (f"position table resampled from {pos.shape[1] - prefix} to {side * side} "
                f"patches ({way})")
        if note not in notes:
            notes.append(note)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = [f"{k} {tuple(state[k].shape)} here {tuple(own[k].shape)}"
             for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        if part == "head":
            held = _describe(lambda s: keys.describe_head(keys.head_meta(s)), state)
            built = _describe(lambda s: keys.describe_head(keys.head_meta(s)), own)
            advice = (f"set {HEAD_SETTINGS} to the file's, or start a new head from its "
                      f"backbone alone: `dino export --checkpoint {uri} --out "
                      "backbone.safetensors`, then train.init_from=backbone.safetensors")
        else:
            held = _describe(lambda s: keys.describe(keys.backbone_meta(s)), state)
            built = _describe(lambda s: keys.describe(keys.backbone_meta(s)), own)
            advice = f"set {BACKBONE_SETTINGS} to the file's"
        raise ValueError(
            f"train.init_from={uri}: its {part} is {held}, this run's is {built}; {advice}. "
            f"Missing keys: {missing[:6]}; unexpected keys: {unexpected[:6]}; "
            f"other shapes: {sorted(wrong)[:6]}")
    module.load_state_dict(state, strict=True)


def apply_init_from(uri: str, student: nn.Module, teacher: nn.Module,
                    dino_loss: nn.Module) -> str:
    """Loads ``uri``'s weights into the student and teacher multi-crop wrappers (their
    ``backbone`` and ``head``) and its center into ``dino_loss``, in place; returns a line
    saying what was loaded. Raises ValueError when shapes differ (other than the position
    table's grid)."""
    w = read_init_weights(uri)
    notes: list[str] = []
    teacher_backbone = w.backbones.get("teacher") or w.backbones["student"]
    _load(teacher.backbone, teacher_backbone, "backbone", uri, notes)
    _load(student.backbone, w.backbones.get("student", teacher_backbone), "backbone", uri, notes)
    loaded = ["teacher and student backbones" if "student" in w.backbones
              else "the backbone into teacher and student"]
    if w.heads:
        teacher_head = w.heads.get("teacher") or w.heads["student"]
        _load(teacher.head, teacher_head, "head", uri, notes)
        _load(student.head, w.heads.get("student", teacher_head), "head", uri, notes)
        loaded.append("heads")
    notes.extend(w.notes)
    if w.mask_token is not None:
        token = getattr(student, "mask_token", None)
        if isinstance(token, Tensor) and token.shape == w.mask_token.shape:
            with torch.no_grad():  # the teacher's too: the EMA keeps the two together
                for net in (student, teacher):
                    mine = getattr(net, "mask_token", None)
                    if isinstance(mine, Tensor) and mine.shape == token.shape:
                        mine.copy_(w.mask_token.to(mine))
            loaded.append("mask token")
        else:
            notes.append(f"mask token {tuple(w.mask_token.shape)} dropped (the student has "
                         "no iBOT mask token of that shape)")
    center = getattr(dino_loss, "center", None)
    if w.center is not None and isinstance(center, Tensor):
        if w.center.numel() == center.numel():
            with torch.no_grad():
                center.copy_(w.center.reshape(center.shape).to(center))
            loaded.append("center")
        else:
            notes.append(f"center of {w.center.numel()} values not loaded (out_dim "
                         f"{center.numel()} here)")
    meta = _describe(lambda s: keys.describe(keys.backbone_meta(s)), teacher_backbone)
    return (f"[dino] train.init_from {uri}: {w.what}, {meta}: loaded {', '.join(loaded)}"
            + "".join(f"; {n}" for n in notes) + "; a fresh schedule from step 0")


def apply_init_backbone(uri: str, student: nn.Module, teacher: nn.Module) -> str:
    """A distillation student started from ``uri``: its backbone and its EMA copy's take the
    file's (the teacher's backbone where the file holds both), in place; its projectors and
    head start fresh (they map to the frozen teacher's features, which the file knows
    nothing of), and no center is loaded (distillation's center is the frozen teacher's).
    Returns the line saying so."""
    w = read_init_weights(uri)
    notes: list[str] = []
    backbone = w.backbones.get("teacher") or w.backbones["student"]
    for net in (student, teacher):
        _load(net.backbone, backbone, "backbone", uri, notes)
    notes.extend(w.notes)
    meta = _describe(lambda s: keys.describe(keys.backbone_meta(s)), backbone)
    return (f"[dino] train.init_from {uri}: {w.what}, {meta}: loaded the backbone into the "
            "distillation student and its EMA copy (projectors and head fresh, no center)"
            + "".join(f"; {n}" for n in notes) + "; a fresh schedule from step 0")


def check_init_from(uri: str) -> None:
    """The preflight's check: ``uri`` is a file that exists and reads as weights (a damaged
    or malicious file fails here, before Ray, not a minute into the run), or a checkpoint /
    run folder. Whether its shapes fit the model is checked where the model is built."""
    if uri.endswith(FILES):
        if not storage.exists(uri):
            raise CheckpointError(f"train.init_from: no file {uri}")
        try:
            read_init_weights(uri)
        except CheckpointError:
            raise
        except (ValueError, RuntimeError) as err:  # the readers' errors name the file
            raise CheckpointError(f"train.init_from: {err}") from None
        return
    try:
        ckpt.resolve(uri)
    except CheckpointError as err:
        raise CheckpointError(f"train.init_from: {err}") from None
