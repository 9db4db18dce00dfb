"""Backbones at any crop size, attention read-out, multi-crop order."""

import pytest
import torch

from dino_core import MultiCropWrapper, build_backbone
from dino_core.models import DINOHead, intermediate_features, last_self_attention


@pytest.mark.parametrize("patch", [16, 8])
@pytest.mark.parametrize("size", [224, 96, 100, 232])
def test_vit_any_crop_size(patch, size):
    vit = build_backbone("vit_tiny", patch, depth=2).eval()
    out = vit(torch.randn(2, 3, size, size))
    assert out.shape == (2, 192)
    attn = last_self_attention(vit, torch.randn(1, 3, size, size))
    n = 1 + (size // patch) ** 2
    assert attn.shape == (1, 3, n, n)
    assert torch.allclose(attn.sum(-1), torch.ones(1, 3, n), atol=1e-5)


def test_vit_sizes():
    for arch, dim, heads in [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)]:
        vit = build_backbone(arch, 16)
        assert vit.embed_dim == dim and vit.blocks[0].attn.num_heads == heads
        assert len(vit.blocks) == 12


def test_last_attention_matches_timm_block():
    """The hand-computed attention reproduces the block's own output when applied to v."""
    vit = build_backbone("vit_tiny", 16, depth=2).eval()
    x = torch.randn(1, 3, 64, 64)
    attn = last_self_attention(vit, x)
    tokens = vit.patch_embed(x)
    tokens = vit.norm_pre(vit._pos_embed(tokens))
    tokens = vit.blocks[0](tokens)
    blk = vit.blocks[1]
    y = blk.norm1(tokens)
    b, n, c = y.shape
    v = blk.attn.qkv(y).reshape(b, n, 3, 3, c // 3).permute(2, 0, 3, 1, 4)[2]
    mixed = (attn @ v).transpose(1, 2).reshape(b, n, c)
    assert torch.allclose(blk.attn.proj(mixed), blk.attn(y), atol=1e-5)


def test_intermediate_features_width():
    vit = build_backbone("vit_tiny", 16, depth=4).eval()
    x = torch.randn(2, 3, 64, 64)
    assert intermediate_features(vit, x, 4).shape == (2, 4 * 192)
    f = intermediate_features(vit, x, 1, avgpool_patches=True)
    assert f.shape == (2, 2 * 192)
    assert torch.allclose(f[:, :192], vit(x), atol=1e-5)  # last block's CLS == forward()


def test_resnet50_feature():
    net = build_backbone("resnet50").eval()
    assert net(torch.randn(1, 3, 96, 96)).shape == (1, 2048)


def test_unknown_arch_is_named():
    with pytest.raises(ValueError, match="vit_huge.*allowed: vit_tiny"):
        build_backbone("vit_huge")


def test_multicrop_output_order_equals_crop_order():
    vit = build_backbone("vit_tiny", 8, img_size=32, depth=1).eval()
    model = MultiCropWrapper(vit, DINOHead(192, 32, hidden_dim=16, bottleneck_dim=8)).eval()
    crops = [
        torch.randn(2, 3, 32, 32),
        torch.randn(2, 3, 32, 32),
        torch.randn(2, 3, 16, 16),
        torch.randn(2, 3, 16, 16),
        torch.randn(2, 3, 24, 24),
    ]
    out = model(crops)
    assert out.shape == (10, 32)
    for i, c in enumerate(crops):
        assert torch.allclose(out[2 * i : 2 * i + 2], model([c]), atol=1e-5), i


def test_multicrop_groups_backbone_calls_by_resolution():
    calls = []
    vit = build_backbone("vit_tiny", 8, img_size=32, depth=1)
    vit.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape))
    model = MultiCropWrapper(vit, DINOHead(192, 32, hidden_dim=16, bottleneck_dim=8))
    model([torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 6)
    assert calls == [torch.Size([4, 3, 32, 32]), torch.Size([12, 3, 16, 16])]
