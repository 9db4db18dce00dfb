"""The DINOv2/DINOv3 recipe wired into training: the step's loss against a naive computation
written here (loops over views, images and patches), the masked forward, the layer-wise lr
groups, the config's checks, and an in-process run that stops mid-epoch and resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dino_core.builder import build_networks, ema_parameter_lists
from dino_core.losses.dino import DINOLoss
from dino_core.models.masked import backbone_tokens
from dino_core.optim import build_optimizer, layer_id, param_groups, set_schedule_values
from dino_core.recipe import GramAnchor, RecipeLoss
from dino_core.schedules import scaled_lr
from dino_core.specs import NetworkSpec, RecipeSpec
from dino_core.step import StepConfig
from dino_core.step_recipe import train_step_recipe

T_TEACHER, T_STUDENT = 0.07, 0.1


def _nets(separate_head: bool, depth: int = 1):
    spec = NetworkSpec(arch="vit_tiny", depth=depth, patch_size=8, img_size=16, out_dim=16,
                       drop_path_rate=0.0, head_hidden_dim=32, head_bottleneck_dim=8,
                       mask_token=True, ibot_separate_head=separate_head)
    torch.manual_seed(0)
    student, teacher = build_networks(spec)
    with torch.no_grad():  # a teacher apart from the student, a mask token that matters
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        student.mask_token.normal_()
    return student, teacher


def _naive_sinkhorn(t: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    q = torch.exp(t.double() / temp).T  # (K, B), SwAV's layout
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def _naive_loss(student, teacher, crops, masks, spec, dino_center, ibot_center, gram_net):
    """Everything again, term by term, with loops over pairs of views, images and patches."""
    n_global, b = 2, crops[0].shape[0]
    glob = torch.cat(crops[:n_global])
    with torch.no_grad():
        t_cls, t_patch = backbone_tokens(teacher.backbone, glob)
        t_out = teacher.head(t_cls)
        t_ihead = teacher.ibot_head or teacher.head
    s_cls_g, s_patch = backbone_tokens(student.backbone, glob, masks, student.mask_token)
    s_cls = torch.cat([s_cls_g, student.backbone(torch.cat(crops[n_global:]))])
    s_out = student.head(s_cls)
    s_ihead = student.ibot_head or student.head

    def targets(logits, center):
        if spec.centering == "sinkhorn_knopp":
            return _naive_sinkhorn(logits, T_TEACHER)
        return F.softmax((logits.double() - center.double()) / T_TEACHER, dim=-1)

    p_t = targets(t_out, dino_center)
    n_crops = len(crops)
    dino, pairs = 0.0, 0
    for q in range(n_global):
        for v in range(n_crops):
            if v == q:
                continue
            logp = F.log_softmax(s_out[v * b:(v + 1) * b].double() / T_STUDENT, dim=-1)
            dino = dino + (-(p_t[q * b:(q + 1) * b] * logp).sum(-1)).mean()
            pairs += 1
    terms = {"dino": dino / pairs}

    where = [(i, j) for i in range(masks.shape[0]) for j in range(masks.shape[1]) if masks[i, j]]
    t_masked = torch.stack([t_ihead(t_patch[i, j][None])[0] for i, j in where])
    p_ibot = targets(t_masked, ibot_center)
    ibot = 0.0
    for img in range(masks.shape[0]):
        rows = [r for r, (i, _) in enumerate(where) if i == img]
        for r in rows:
            i, j = where[r]
            logp = F.log_softmax(s_ihead(s_patch[i, j][None])[0].double() / T_STUDENT, dim=-1)
            ibot = ibot - (p_ibot[r] * logp).sum() / len(rows)
    terms["ibot"] = spec.ibot_weight * ibot / masks.shape[0]

    koleo = 0.0
    for c in range(n_global):
        x = F.normalize(s_cls_g[c * b:(c + 1) * b].double(), dim=-1, eps=1e-8)
        logs = []
        for i in range(b):
            j = max((j for j in range(b) if j != i), key=lambda j: float(x[i].detach() @ x[j].detach()))
            logs.append(torch.log(torch.linalg.vector_norm(x[i] - x[j] + 1e-8) + 1e-8))
        koleo = koleo - torch.stack(logs).mean()
    terms["koleo"] = spec.koleo_weight * koleo

    with torch.no_grad():
        g_patch = backbone_tokens(gram_net, glob)[1]
    gram = 0.0
    for i in range(glob.shape[0]):
        xs, xg = F.normalize(s_patch[i].double(), dim=-1), F.normalize(g_patch[i].double(), dim=-1)
        gram = gram + ((xs @ xs.T - xg @ xg.T) ** 2).mean()
    terms["gram"] = spec.gram_weight * gram / glob.shape[0]
    return terms


@pytest.mark.parametrize(("centering", "separate", "fused"), [
    ("ema", False, False), ("sinkhorn_knopp", True, True), ("sinkhorn_knopp", False, False),
    ("ema", True, True),
])  # fmt: skip
def test_the_recipe_step_loss_equals_a_naive_computation(one_torch_thread, centering, separate,
                                                         fused):
    student, teacher = _nets(separate)
    spec = RecipeSpec(centering=centering, ibot_weight=0.7, koleo_weight=0.3, gram_weight=0.5)
    dino = DINOLoss(16, T_STUDENT)
    losses = RecipeLoss(dino, spec, fused_head_loss=fused, loss_chunk=5)
    dino.center.normal_()
    losses.ibot.center.normal_()
    gram = GramAnchor(teacher.backbone, spec)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    crops += [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]
    masks = torch.rand(8, 4, generator=g) < 0.4
    masks[0] = False  # an image without masked patches counts in the mean, adding 0
    masks[1, :3] = True

    centers = dino.center.clone(), losses.ibot.center.clone()
    want = _naive_loss(student, teacher, crops, masks, spec, *centers, teacher.backbone)
    optimizer = build_optimizer(student)
    out = train_step_recipe(
        student=student, teacher=teacher, losses=losses, optimizer=optimizer, crops=crops,
        masks=masks, values={"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.99,
                             "teacher_temp": T_TEACHER},
        step=0, freeze_last_layer=False, ema_params=ema_parameter_lists(teacher, student),
        cfg=StepConfig(fused_head_loss=fused, loss_chunk=5), gram=gram,
    )
    for name, value in want.items():
        assert float(out.stats[f"loss_{name}"]) == pytest.approx(float(value.detach()), rel=1e-5), name
    assert out.loss == pytest.approx(float(sum(want.values()).detach()), rel=1e-5)
    moved = [not torch.equal(a, b) for a, b in zip((dino.center, losses.ibot.center), centers)]
    assert moved == ([True, True] if centering == "ema" else [False, False])


def test_the_masked_forward_changes_only_the_masked_inputs(one_torch_thread):
    student, _ = _nets(False)
    vit = student.backbone
    seen: list[torch.Tensor] = []
    vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    x = torch.randn(3, 3, 16, 16)
    masks = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        cls, patches = backbone_tokens(vit, x)
        assert torch.equal(cls, vit(x))  # without masks: the backbone's own forward
        assert torch.equal(patches, vit.forward_features(x)[:, 1:])
        backbone_tokens(vit, x, masks, student.mask_token)
        embedded = vit.patch_embed(x).reshape(3, 4, -1)
    plain, masked = seen[-3], seen[-1]  # the block inputs, (B, 1 + N, D)
    changed = (plain != masked).any(-1)
    assert not changed[:, 0].any()  # the CLS token
    assert torch.equal(changed[:, 1:], masks)
    # a masked patch is the mask token plus its position embedding (the token goes in first)
    position = plain[:, 1:] - embedded
    want = student.mask_token + position
    assert torch.allclose(masked[:, 1:][masks], want[masks], atol=1e-6)


def test_the_masked_forward_of_a_rope_vit_and_of_a_resnet():
    from timm.models.eva import Eva

    eva = Eva(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
              use_rot_pos_emb=True, dynamic_img_size=True, num_reg_tokens=2)
    x, token = torch.randn(2, 3, 16, 16), torch.randn(1, 32)
    with torch.no_grad():
        cls, patches = backbone_tokens(eva, x)
        assert torch.equal(cls, eva(x)) and patches.shape == (2, 4, 32)
        masks = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
        _, masked = backbone_tokens(eva, x, masks, token)
    assert not torch.equal(masked[0], patches[0]) and torch.equal(masked[1], patches[1])
    from dino_core.models import build_backbone

    with pytest.raises(TypeError, match="VisionTransformer or Eva"):
        backbone_tokens(build_backbone("resnet50"), torch.randn(1, 3, 32, 32))


def test_layer_wise_lr_decay_and_the_patch_embedding_multiplier():
    student, _ = _nets(True, depth=3)
    groups = param_groups(student, layer_decay=0.9, patch_embed_lr_mult=0.2)
    mult = {id(p): (g["lr_multiplier"], g["wd_multiplier"]) for g in groups for p in g["params"]}
    named = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in groups) == len(named)
    for i in range(3):  # block i of 3: 0.9 ** (3 - i)
        assert mult[id(named[f"backbone.blocks.{i}.attn.qkv.weight"])] == (
            pytest.approx(0.9 ** (3 - i)), 1.0)
        assert mult[id(named[f"backbone.blocks.{i}.norm1.weight"])][1] == 0.0
    assert mult[id(named["backbone.patch_embed.proj.weight"])][0] == pytest.approx(0.9**4 * 0.2)
    assert mult[id(named["backbone.patch_embed.proj.bias"])] == (pytest.approx(0.9**4 * 0.2), 0.0)
    for name in ("backbone.cls_token", "backbone.pos_embed", "mask_token"):
        assert mult[id(named[name])] == (pytest.approx(0.9**4), 1.0)
    for name in ("backbone.norm.weight", "head.mlp.0.weight", "ibot_head.mlp.0.weight"):
        assert mult[id(named[name])][0] == 1.0
    assert layer_id("backbone.blocks.11.mlp.fc1.weight", 12) == 12

    optimizer = torch.optim.AdamW(groups)
    set_schedule_values(optimizer, lr=1e-3, weight_decay=0.05)
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_multiplier"])
        assert g["weight_decay"] == (0.05 if g["wd_multiplier"] else 0.0)

    # without decay: DINO v1's two groups, weights then biases and norms
    v1 = param_groups(student)
    assert [(g["lr_multiplier"], g["wd_multiplier"]) for g in v1] == [(1.0, 1.0), (1.0, 0.0)]
    assert all(p.ndim > 1 for p in v1[0]["params"]) and v1[1]["weight_decay"] == 0.0


def test_the_square_root_lr_scaling_rule():
    assert scaled_lr(4e-3, 1024, "sqrt") == pytest.approx(4e-3)
    assert scaled_lr(4e-3, 256, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(5e-4, 512) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="scaling"):
        scaled_lr(1e-3, 256, "cubic")


def test_the_gram_teacher_is_snapshotted_at_the_start_and_refreshed_on_schedule():
    student, _ = _nets(False)
    spec = RecipeSpec(gram_weight=2.0, gram_start_step=10, gram_ramp_steps=4,
                      gram_refresh_every_steps=8, gram_max_refreshes=2)
    gram = GramAnchor(student.backbone, spec)
    due = [t for t in range(60) if gram.refresh_due(t)]
    assert due == [10, 16, 24]  # the start, then multiples of 8, at most 2 more
    assert [gram.weight(t) for t in (9, 10, 12, 14, 30)] == pytest.approx([0, 0, 1.0, 2.0, 2.0])


@pytest.mark.parametrize(("override", "field"), [
    ("loss.mask_ratio=[0.5,0.2]", "loss.mask_ratio"),
    ("loss.centering=sinkhorn", "loss.centering"),
    ("optim.layer_decay=1.5", "optim.layer_decay"),
    ("optim.lr_scaling=cubic", "optim.lr_scaling"),
    ("gram.weight=-1", "gram.weight"),
    ("loss.koleo_weight=-0.1", "loss.koleo_weight"),
])  # fmt: skip
def test_bad_recipe_settings_fail_naming_the_field(override, field):
    from service.config import load_config
    from service.errors import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, None, [override])
    with pytest.raises(ConfigError, match=r"loss\.ibot_weight"):
        load_config(None, None, ["model.arch=resnet50", "loss.ibot_weight=1"])


RECIPE = [
    "loss.ibot_weight=1.0", "loss.koleo_weight=0.1", "loss.ibot_separate_head=true", "optim.layer_decay=0.9", "optim.patch_embed_lr_mult=0.2",
    "optim.lr_scaling=sqrt", "gram.weight=1.0", "gram.start_step=3", "gram.ramp_steps=2",
    "gram.refresh_every_steps=4", "model.depth=2", "aug.global_size=32", "aug.local_size=16",
]  # fmt: skip


@pytest.mark.integration
@pytest.mark.budget(60)
@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_a_recipe_run_stopped_mid_epoch_resumes_exactly(tmp_path, one_torch_thread, centering):
    """iBOT + KoLeo + a separate iBOT head + layer decay + Gram anchoring (snapshot at step
    3, refreshed at 4 and 8), both centerings: the split run's losses equal the whole run's,
    bit for bit, so the masks, the iBOT center and the Gram snapshot resume."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_loop import _run

    from service.storage import checkpoints as ckpt

    recipe = [*RECIPE, f"loss.centering={centering}"]
    whole, _, loop = _run(tmp_path, "whole", *recipe)
    niter = loop.state.niter_per_ep
    assert sorted(whole.losses()) == list(range(1, 2 * niter + 1))
    last = whole.metrics[-1][1] if "loss_ibot" in whole.metrics[-1][1] else whole.metrics[-2][1]
    assert {"loss_dino", "loss_ibot", "loss_koleo", "loss_gram"} <= set(last)
    assert all(math.isfinite(v) for v in whole.losses().values())

    first, _, stopped = _run(tmp_path, "split", *recipe, f"train.max_steps={niter + 3}")
    assert stopped.state.batch_in_epoch == 3  # mid-epoch
    state = ckpt.load(ckpt.checkpoint_dirs(str(tmp_path / "split"))[-1])[1]
    assert {"ibot_center", "masks", "gram_teacher"} <= set(state)
    assert "mask_token" in state["student"] and any(k.startswith("ibot_head.") for k in state["teacher"])
    second, _, resumed = _run(tmp_path, "split", *recipe)
    assert resumed.restored_from is not None
    assert {**first.losses(), **second.losses()} == whole.losses()


@pytest.mark.budget(20)
def test_packed_crops_and_the_fused_head_loss_serve_the_recipe(tmp_path, one_torch_thread):
    """train.packed_crops=sdpa and train.fused_head_loss with iBOT, KoLeo and Gram: the same
    losses as the plain per-resolution calls (3 steps, drop path on, local crops packed)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_loop import _run

    steps = [*RECIPE, "train.max_steps=3", "train.epochs=1", "model.drop_path_rate=0.1",
             "gram.start_step=1"]
    plain, _, _ = _run(tmp_path, "plain", *steps)
    fast, _, loop = _run(tmp_path, "fast", *steps, "train.packed_crops=sdpa",
                         "train.fused_head_loss=true")
    assert type(loop.state.student).__name__ == "PackedMultiCropWrapper"
    assert hasattr(loop.state.student, "mask_token") and loop.state.student.ibot_head is not None
    assert len(plain.losses()) == 3
    assert fast.losses() == pytest.approx(plain.losses(), rel=1e-5)


def test_the_recipe_options_off_leave_dino_v1_state_alone():
    from service.config import load_config, network_spec, recipe_spec

    cfg = load_config(None, None, [])
    assert not recipe_spec(cfg).active
    student, _ = build_networks(dataclasses.replace(network_spec(cfg), depth=1, out_dim=8,
                                                    head_hidden_dim=8, head_bottleneck_dim=8))
    keys = set(student.state_dict())
    assert "mask_token" not in keys and not any(k.startswith("ibot_head") for k in keys)


def test_the_recipe_presets_resolve_to_their_recipes():
    from service.config import load_config, network_spec, recipe_spec, schedule_spec

    v2, v3, cpu = (load_config(p) for p in ("dinov2_vits14", "dinov3_vits16", "quickstart_dinov2"))
    r2, r3, rc = recipe_spec(v2), recipe_spec(v3), recipe_spec(cpu)
    assert (r2.ibot_weight, r2.koleo_weight, r2.centering, r2.layer_decay) == (1.0, 0.1, "ema", 0.9)
    assert network_spec(v2).arch == "dinov2_vits14" and network_spec(v2).mask_token
    assert not network_spec(v2).ibot_separate_head and schedule_spec(v2).lr_scaling == "sqrt"
    assert r3.centering == "sinkhorn_knopp" and r3.gram_weight == 2.0 and r3.gram_max_refreshes == 3
    assert network_spec(v3).ibot_separate_head and network_spec(v3).arch == "dinov3_vits16"
    assert rc.active and rc.ibot_weight == 1.0 and cpu.model.arch == "vit_tiny"
