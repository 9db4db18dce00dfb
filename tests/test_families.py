"""Meta's DINOv2 / DINOv3 architectures as ``model.arch``: timm's modules and state dicts, any
crop size, a DINO step at two crop sizes, and every read-out the evaluations use (registers
and storage tokens left out of the patch tokens and attention maps)."""

from __future__ import annotations

import pytest
import timm
import torch

from dino_core import (
    DINOLoss,
    NetworkSpec,
    StepConfig,
    build_networks,
    build_optimizer,
    build_schedules,
    ema_parameter_lists,
    train_step,
)
from dino_core.eval.attention import cls_attention
from dino_core.eval.copydetect import copy_descriptor
from dino_core.eval.linear import probe_dim, probe_features
from dino_core.models import build_backbone, last_self_attention, patch_tokens
from dino_core.models.families import FAMILY_ARCHS, timm_kwargs, timm_name
from dino_core.models.vit_features import _tokens_before_last_block

SMALL = ["dinov2_vits14", "dinov2_vits14_reg4", "dinov3_vits16"]


def patch_of(arch: str) -> int:
    return FAMILY_ARCHS[arch].patch_size


def test_every_family_arch_is_timm_s_module_with_meta_s_shapes():
    """Each arch (1 block; shapes only, on the meta device) has the state dict of the timm
    model its export names, with Meta's widths, heads and registers."""
    with torch.device("meta"):
        for arch, f in FAMILY_ARCHS.items():
            ours = build_backbone(arch, f.patch_size, 224, drop_path_rate=0.2, depth=1)
            theirs = timm.create_model(timm_name(arch), pretrained=False, num_classes=0,
                                       **timm_kwargs(arch, 224, 1))
            mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
            timm_sd = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
            if f.family == "dinov3":  # Meta's periods travel with the weights
                assert mine.pop("rope.periods") == (f.embed_dim // f.num_heads // 4,)
            assert mine == timm_sd, arch
            assert ours.embed_dim == f.embed_dim
            assert ours.num_prefix_tokens == 1 + f.reg_tokens
            assert ours.blocks[0].attn.num_heads == f.num_heads


@pytest.mark.parametrize("arch", ["dinov2_vits14_reg4", "dinov3_vits16"])
def test_layerscale_starts_at_1e_5_and_stochastic_depth_is_uniform(arch):
    vit = build_backbone(arch, patch_of(arch), 224, drop_path_rate=0.2, depth=3)
    for blk in vit.blocks:
        gamma = blk.ls1.gamma if arch.startswith("dinov2") else blk.gamma_1
        assert torch.all(gamma == 1e-5)
        assert blk.drop_path1.drop_prob == blk.drop_path2.drop_prob == 0.2


def test_a_patch_size_that_contradicts_the_family_is_refused():
    from service.config import load_config
    from service.errors import ConfigError

    with pytest.raises(ValueError, match="dinov2_vits14 has patch size 14, not 16"):
        build_backbone("dinov2_vits14", 16)
    cfg = load_config(None, None, ["model.arch=dinov3_vits16"])
    assert cfg.model.patch_size == 16  # the family's, when none is given
    with pytest.raises(ConfigError, match="model.patch_size=16 contradicts "
                                          "model.arch=dinov2_vits14_reg4, whose patch size is 14"):
        load_config(None, None, ["model.arch=dinov2_vits14_reg4", "model.patch_size=16"])


@pytest.mark.parametrize("arch", SMALL)
def test_a_dino_step_runs_at_two_crop_sizes(arch, one_torch_thread):
    """Student on 2 global + 2 local crops (two resolutions in one step), teacher on the
    globals, loss, backward, optimizer step, EMA: finite, and the student moved."""
    torch.manual_seed(0)
    p = patch_of(arch)
    student, teacher = build_networks(NetworkSpec(
        arch=arch, patch_size=p, img_size=4 * p, depth=1, out_dim=64, head_hidden_dim=32,
        head_bottleneck_dim=16, drop_path_rate=0.1))
    opt = build_optimizer(student)
    sched = build_schedules(epochs=1, niter_per_ep=2, global_batch_size=2, lr=1e-3,
                            warmup_epochs=0)
    before = student.backbone.blocks[0].mlp.fc1.weight.detach().clone()
    crops = [torch.randn(2, 3, 4 * p, 4 * p) for _ in range(2)]
    crops += [torch.randn(2, 3, 2 * p, 2 * p) for _ in range(2)]
    out = train_step(student=student, teacher=teacher, loss_fn=DINOLoss(64), optimizer=opt,
                     crops=crops, values=sched.at(1), step=1, freeze_last_layer=False,
                     ema_params=ema_parameter_lists(teacher, student), cfg=StepConfig())
    assert torch.isfinite(torch.tensor(out.loss))
    assert not torch.equal(student.backbone.blocks[0].mlp.fc1.weight, before)


@pytest.mark.parametrize("arch", SMALL)
def test_the_read_outs_leave_registers_out(arch):
    torch.manual_seed(0)
    p = patch_of(arch)
    vit = build_backbone(arch, p, 4 * p, depth=2).eval()
    with torch.no_grad():  # LayerScale 1e-5 would hide a wrong branch
        for blk in vit.blocks:
            for name, param in blk.named_parameters():
                if "gamma" in name:
                    param.fill_(0.5)
    prefix = 1 + FAMILY_ARCHS[arch].reg_tokens
    x = torch.randn(2, 3, 3 * p, 5 * p)
    assert patch_tokens(vit, x).shape == (2, 15, vit.embed_dim)
    assert cls_attention(vit, x).shape == (2, vit.blocks[0].attn.num_heads, 3, 5)
    attn = last_self_attention(vit, x)
    assert attn.shape[-1] == prefix + 15
    assert probe_features(vit, x, n_last_blocks=2, avgpool=True).shape == \
        (2, probe_dim(vit, 2, True))
    assert copy_descriptor(vit, x).shape == (2, 2 * vit.embed_dim)
    # the hand-computed attention (RoPE included for DINOv3) is the block's own: its rows
    # applied to v and projected give the block's attention output
    tokens, rope = _tokens_before_last_block(vit, x)
    blk = vit.blocks[-1]
    y = blk.norm1(tokens)
    with torch.no_grad():
        expected = blk.attn(y, rope=rope) if rope is not None else blk.attn(y)
        qkv_w, (b, n, c) = blk.attn.qkv.weight, y.shape
        bias = blk.attn.qkv.bias if blk.attn.qkv.bias is not None else torch.cat(
            (blk.attn.q_bias, blk.attn.k_bias, blk.attn.v_bias))
        v = torch.nn.functional.linear(y, qkv_w, bias).reshape(b, n, 3, -1, c // attn.shape[1])[:, :, 2]
        mine = (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(b, n, c)
        mine = blk.attn.proj(blk.attn.norm(mine) if hasattr(blk.attn, "norm") else mine)
    torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", SMALL)
def test_the_packed_call_equals_the_per_resolution_one(arch):
    """``train.packed_crops``: DINOv2 (registers too) runs packed, DINOv3 per resolution."""
    from dino_core.models.packed import PackedMultiCropWrapper, supports_packing

    torch.manual_seed(0)
    p = patch_of(arch)
    _, teacher = build_networks(NetworkSpec(
        arch=arch, patch_size=p, img_size=4 * p, depth=2, out_dim=32, head_hidden_dim=16,
        head_bottleneck_dim=8, drop_path_rate=0.0))
    with torch.no_grad():
        for name, param in teacher.backbone.named_parameters():
            if "gamma" in name:
                param.fill_(0.5)
    crops = [torch.randn(2, 3, 4 * p, 4 * p) for _ in range(2)]
    crops += [torch.randn(2, 3, 2 * p, 2 * p) for _ in range(3)]
    packed = PackedMultiCropWrapper(teacher.backbone, teacher.head, "sdpa")
    assert supports_packing(teacher.backbone) == arch.startswith("dinov2")
    with torch.no_grad():
        torch.testing.assert_close(packed.features(crops), teacher.features(crops),
                                   atol=1e-5, rtol=1e-5)
