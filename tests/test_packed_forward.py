"""The packed multi-crop forward against the per-resolution calls of ``MultiCropWrapper``:
outputs, parameter gradients, drop-path draws, no attention between crops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dino_core.models import DINOHead, MultiCropWrapper, build_backbone, packed
from dino_core.models.packed import PackedMultiCropWrapper, packed_backbone_forward

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B = 3
GLOBAL, LOCAL = 16, 8  # patch 8: 2x2 + CLS = 5 tokens, 1x1 + CLS = 2 tokens


def tiny_vit(depth: int = 2, drop_path_rate: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", 8, img_size=GLOBAL, depth=depth, drop_path_rate=drop_path_rate)
    with torch.no_grad():  # timm starts the CLS token near zero; make every input matter
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit


def make_crops(sizes: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, s, s, generator=g) for s in sizes]


def per_resolution(vit: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
    """The backbone outputs of MultiCropWrapper (an identity head)."""
    return MultiCropWrapper(vit, nn.Identity())(crops)


LAYOUTS = {
    "2g": [GLOBAL] * 2,
    "2g+2l": [GLOBAL] * 2 + [LOCAL] * 2,
    "2g+4l": [GLOBAL] * 2 + [LOCAL] * 4,
    # token counts 10 | 5 + 5: rows of different segment patterns, a mask per row
    "uneven": [24, GLOBAL, GLOBAL],
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_outputs_equal_per_resolution(layout):
    vit = tiny_vit().eval()
    crops = make_crops(LAYOUTS[layout])
    ref = per_resolution(vit, crops)
    out = packed_backbone_forward(vit, crops, attention="sdpa")
    assert out.shape == (len(crops) * B, vit.embed_dim)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    wrapped = PackedMultiCropWrapper(vit, nn.Identity(), attention="sdpa")(crops)
    torch.testing.assert_close(wrapped, ref, rtol=1e-5, atol=1e-5)


def grads(vit: nn.Module, out: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    loss = (out * weight).sum() + out.pow(2).mean()
    return list(torch.autograd.grad(loss, list(vit.parameters())))


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.5])
@pytest.mark.parametrize("layout", ["2g+2l", "2g+4l", "uneven"])
def test_gradients_equal_per_resolution(layout, drop_path_rate):
    """Parameter gradients match; with drop-path on (train mode), the packed path draws the
    same per-crop keep flags as the per-resolution calls from the same RNG state."""
    vit = tiny_vit(drop_path_rate=drop_path_rate).train()
    crops = make_crops(LAYOUTS[layout])
    weight = torch.randn(len(crops) * B, vit.embed_dim, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(123)
    ref = per_resolution(vit, crops)
    ref_grads = grads(vit, ref, weight)
    torch.manual_seed(123)
    out = packed_backbone_forward(vit, crops, attention="sdpa")
    out_grads = grads(vit, out, weight)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    names = [name for name, _ in vit.named_parameters()]
    for name, g, r in zip(names, out_grads, ref_grads):
        assert rel_err(g, r) < 1e-5, name
    if drop_path_rate:  # the draws took effect: another RNG state drops other paths
        torch.manual_seed(124)
        assert rel_err(packed_backbone_forward(vit, crops, attention="sdpa"), ref) > 1e-3


def test_gradient_checkpointing_keeps_gradients():
    vit = tiny_vit(drop_path_rate=0.5).train()
    crops = make_crops(LAYOUTS["2g+2l"])
    weight = torch.randn(len(crops) * B, vit.embed_dim, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(9)
    ref_grads = grads(vit, per_resolution(vit, crops), weight)
    vit.set_grad_checkpointing(True)
    torch.manual_seed(9)
    out_grads = grads(vit, packed_backbone_forward(vit, crops, attention="sdpa"), weight)
    for g, r in zip(out_grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def test_no_attention_between_crops(monkeypatch):
    vit = tiny_vit().eval()
    crops = make_crops(LAYOUTS["2g+2l"])  # rows: crops (0, 2) and (1, 3)
    before = packed_backbone_forward(vit, crops, attention="sdpa")
    changed = [c.clone() for c in crops]
    changed[3] = torch.randn_like(changed[3])
    after = packed_backbone_forward(vit, changed, attention="sdpa")
    torch.testing.assert_close(after[: 3 * B], before[: 3 * B], rtol=1e-6, atol=1e-6)
    assert rel_err(after[3 * B :], before[3 * B :]) > 1e-2

    # the same check without the mask fails: crop 1 shares a row with crop 3
    monkeypatch.setattr(packed, "_block_diagonal_mask", lambda *args: None)
    leaky_before = packed_backbone_forward(vit, crops, attention="sdpa")
    leaky_after = packed_backbone_forward(vit, changed, attention="sdpa")
    assert rel_err(leaky_after[B : 2 * B], leaky_before[B : 2 * B]) > 1e-3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_forward_on_cpu():
    """FlexAttention runs on CPU in inference only (eager: the unfused reference kernel)."""
    vit = tiny_vit().eval()
    crops = make_crops(LAYOUTS["2g+2l"])
    with torch.no_grad():
        ref = per_resolution(vit, crops)
        out = packed_backbone_forward(vit, crops, attention="flex")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        packed_backbone_forward(vit, crops, attention="flex")


def test_state_dict_keys_and_fallback():
    vit = tiny_vit(depth=1)
    head = DINOHead(vit.embed_dim, out_dim=16, hidden_dim=8, bottleneck_dim=4)
    plain = MultiCropWrapper(vit, head)
    assert list(PackedMultiCropWrapper(vit, head).state_dict()) == list(plain.state_dict())

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert not packed.supports_packing(cnn)
    crops = make_crops([GLOBAL, GLOBAL, LOCAL])
    torch.testing.assert_close(packed_backbone_forward(cnn, crops), per_resolution(cnn, crops))


def test_row_layout_of_the_paper_crops():
    """2 x 224 + 10 x 96 crops at patch 16 make two rows per image, 382 tokens each."""
    groups = packed._balanced_groups((197, 197) + (37,) * 10)
    assert groups == ((0, 2, 4, 6, 8, 10), (1, 3, 5, 7, 9, 11))
    assert packed._balanced_groups((197, 197)) == ((0,), (1,))
    assert packed._balanced_groups((10, 5, 4)) == ((0, 1, 2),)
