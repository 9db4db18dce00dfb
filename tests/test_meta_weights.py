"""Meta's released DINOv2 / DINOv3 backbone files: read safely wherever a checkpoint is read,
the architecture taken from the tensors, and the features of Meta's own model code.

The files are built here with the exact key names and shapes of Meta's state dicts
(``dinov2/models/vision_transformer.py``, ``dinov2/layers/``, ``dinov3/models/
vision_transformer.py``, ``dinov3/layers/``), at a small depth. Meta's forward and its
position resize are re-implemented naively below from those sources, independent of
``dino_core.interop.meta`` and of timm.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dino_core import NetworkSpec, build_networks
from dino_core.interop.export import load_backbone
from dino_core.interop.reference import read_reference
from dino_core.models.backbone import build_backbone
from dino_core.models.position import timm_pos_embed
from service.evaluate import backbone as service_backbone
from service.train.init_from import apply_init_from

ROOT = Path(__file__).resolve().parents[1]
WIDTH = {"s": (384, 6), "b": (768, 12), "l": (1024, 16), "g": (1536, 24)}


# ---- Meta's files, generated ----------------------------------------------------------------
def _linear(sd, name, out_f, in_f, scale=0.05):
    sd[name + ".weight"] = scale * torch.randn(out_f, in_f)
    sd[name + ".bias"] = scale * torch.randn(out_f)


def _norm(sd, name, dim):
    sd[name + ".weight"] = 1 + 0.1 * torch.randn(dim)
    sd[name + ".bias"] = 0.1 * torch.randn(dim)


def dinov2_state(size="s", depth=2, regs=0, side=37, seed=0) -> dict:
    """``DinoVisionTransformer.state_dict()`` of Meta's hub ``dinov2_vit{size}14[_reg]``
    (518 px: a 37 x 37 table). LayerScale far from 1e-5, so every block counts."""
    torch.manual_seed(seed)
    d, _ = WIDTH[size]
    sd = {"cls_token": torch.randn(1, 1, d), "pos_embed": torch.randn(1, 1 + side * side, d),
          "mask_token": torch.randn(1, d)}
    if regs:
        sd["register_tokens"] = torch.randn(1, regs, d)
    sd["patch_embed.proj.weight"] = 0.05 * torch.randn(d, 3, 14, 14)
    sd["patch_embed.proj.bias"] = 0.05 * torch.randn(d)
    for i in range(depth):
        p = f"blocks.{i}."
        _norm(sd, p + "norm1", d)
        _linear(sd, p + "attn.qkv", 3 * d, d)
        _linear(sd, p + "attn.proj", d, d)
        sd[p + "ls1.gamma"] = 0.3 + 0.1 * torch.randn(d)
        _norm(sd, p + "norm2", d)
        if size == "g":  # SwiGLUFFNFused: hidden (int(4d * 2 / 3) + 7) // 8 * 8
            hidden = (int(4 * d * 2 / 3) + 7) // 8 * 8
            _linear(sd, p + "mlp.w12", 2 * hidden, d)
            _linear(sd, p + "mlp.w3", d, hidden)
        else:
            _linear(sd, p + "mlp.fc1", 4 * d, d)
            _linear(sd, p + "mlp.fc2", d, 4 * d)
        sd[p + "ls2.gamma"] = 0.3 + 0.1 * torch.randn(d)
    _norm(sd, "norm", d)
    return sd


def dinov3_state(size="s", depth=2, seed=0, local_cls_norm=False) -> dict:
    """``DinoVisionTransformer.state_dict()`` of Meta's hub ``dinov3_vit{size}16``: 4 storage
    tokens, RoPE periods (bf16-rounded, as in the released files), a k-masked qkv bias."""
    torch.manual_seed(seed)
    d, heads = WIDTH[size]
    sd = {"cls_token": torch.randn(1, 1, d), "storage_tokens": torch.randn(1, 4, d),
          "mask_token": torch.randn(1, d),
          "patch_embed.proj.weight": 0.05 * torch.randn(d, 3, 16, 16),
          "patch_embed.proj.bias": 0.05 * torch.randn(d)}
    quarter = d // heads // 4
    periods = 100.0 ** (2 * torch.arange(quarter, dtype=torch.float32) / (d // heads // 2))
    sd["rope_embed.periods"] = periods.to(torch.bfloat16)
    for i in range(depth):
        p = f"blocks.{i}."
        _norm(sd, p + "norm1", d)
        _linear(sd, p + "attn.qkv", 3 * d, d)
        sd[p + "attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        _linear(sd, p + "attn.proj", d, d)
        sd[p + "ls1.gamma"] = 0.3 + 0.1 * torch.randn(d)
        _norm(sd, p + "norm2", d)
        _linear(sd, p + "mlp.fc1", 4 * d, d)
        _linear(sd, p + "mlp.fc2", d, 4 * d)
        sd[p + "ls2.gamma"] = 0.3 + 0.1 * torch.randn(d)
    _norm(sd, "norm", d)
    if local_cls_norm:
        _norm(sd, "local_cls_norm", d)
    return sd


def save(path: Path, sd: dict) -> Path:
    torch.save({k: v.clone() for k, v in sd.items()}, path)
    return path


# ---- Meta's forward, transcribed ----------------------------------------------------------
def meta_interpolate_pos_encoding(pos_embed, npatch, w, h, patch, offset, antialias):
    """dinov2 ``interpolate_pos_encoding``: ``w``, ``h`` are the image's dims 2 and 3."""
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    dim, m = pos_embed.shape[-1], int(math.sqrt(n))
    w0, h0 = w // patch, h // patch
    grid = pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": ((w0 + offset) / m, (h0 + offset) / m)}
    else:
        kwargs = {"size": (w0, h0)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    assert tuple(grid.shape[-2:]) == (w0, h0)
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def _blocks(sd, t, heads, eps, attend):
    c = t.shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    def lin(z, name, bias=None):
        return F.linear(z, sd[name + ".weight"], sd[name + ".bias"] if bias is None else bias)

    def ln(z, name):
        return F.layer_norm(z, (c,), sd[name + ".weight"], sd[name + ".bias"], eps=eps)

    for i in range(depth):
        p = f"blocks.{i}."
        t = t + sd[p + "ls1.gamma"] * lin(attend(ln(t, p + "norm1"), p), p + "attn.proj")
        y = ln(t, p + "norm2")
        if p + "mlp.w12.weight" in sd:
            a, b = lin(y, p + "mlp.w12").chunk(2, dim=-1)
            y = lin(F.silu(a) * b, p + "mlp.w3")
        else:
            y = lin(F.gelu(lin(y, p + "mlp.fc1")), p + "mlp.fc2")
        t = t + sd[p + "ls2.gamma"] * y
    return ln(t, "norm")[:, 0]


def _heads(q, k, v, heads):
    b, n, c = q.shape
    split = [z.reshape(b, n, heads, c // heads).transpose(1, 2) for z in (q, k, v)]
    return split


def meta_dinov2_forward(sd, x, heads, offset, antialias):
    """``DinoVisionTransformer.forward`` (eval) of dinov2: the normed CLS token."""
    b, _, w, h = x.shape
    patch = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = torch.cat((sd["cls_token"].expand(b, -1, -1), t.flatten(2).transpose(1, 2)), dim=1)
    t = t + meta_interpolate_pos_encoding(sd["pos_embed"], t.shape[1] - 1, w, h, patch,
                                          offset, antialias)
    if "register_tokens" in sd:
        t = torch.cat((t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]), dim=1)

    def attend(y, p):
        q, k, v = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).chunk(3, -1)
        q, k, v = _heads(q, k, v, heads)
        a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
        return (a @ v).transpose(1, 2).reshape(y.shape)

    return _blocks(sd, t, heads, 1e-6, attend)


def meta_rope(periods, rows, cols):
    """dinov3 ``RopePositionEmbedding.forward`` (eval, normalize_coords="separate"):
    (sin, cos), each ``(rows * cols, D_head)``, patches in raster order."""
    sin, cos = [], []
    for i in range(rows):
        for j in range(cols):
            y, x = 2 * (i + 0.5) / rows - 1, 2 * (j + 0.5) / cols - 1
            angles = torch.cat([2 * math.pi * y / periods, 2 * math.pi * x / periods])
            sin.append(torch.sin(angles).repeat(2))
            cos.append(torch.cos(angles).repeat(2))
    return torch.stack(sin), torch.stack(cos)


def meta_dinov3_forward(sd, x, heads):
    """``DinoVisionTransformer.forward`` (eval) of dinov3: the normed CLS token."""
    b = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    rows, cols = t.shape[-2:]
    t = torch.cat((sd["cls_token"].expand(b, -1, -1), sd["storage_tokens"].expand(b, -1, -1),
                   t.flatten(2).transpose(1, 2)), dim=1)
    sin, cos = meta_rope(sd["rope_embed.periods"].float(), rows, cols)
    prefix = t.shape[1] - rows * cols

    def rotate(z):  # rope_apply on the patch tokens only
        half = z.shape[-1] // 2
        turned = torch.cat([-z[..., half:], z[..., :half]], dim=-1)
        return torch.cat([z[:, :, :prefix], z[:, :, prefix:] * cos + turned[:, :, prefix:] * sin],
                         dim=2)

    def attend(y, p):
        bias = sd[p + "attn.qkv.bias"] * sd[p + "attn.qkv.bias_mask"]
        q, k, v = F.linear(y, sd[p + "attn.qkv.weight"], bias).chunk(3, -1)
        q, k, v = _heads(q, k, v, heads)
        q, k = rotate(q), rotate(k)
        a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
        return (a @ v).transpose(1, 2).reshape(y.shape)

    return _blocks(sd, t, heads, 1e-5, attend)


# ---- features equal Meta's ------------------------------------------------------------------
SIZES = [(518, 518), (224, 224), (98, 98), (140, 210)]


@pytest.mark.budget(15)
@pytest.mark.parametrize("regs", [0, 4])
def test_dinov2_files_give_meta_s_features_at_every_size(tmp_path, regs):
    """Plain files resize as Meta's hub builds them (offset 0.1, no antialias), register
    files with antialias to the exact size; at the 518 px native grid and elsewhere."""
    sd = dinov2_state(regs=regs)
    model = load_backbone(save(tmp_path / "dinov2_vits14_pretrain.pth", sd))
    offset, antialias = (0.0, True) if regs else (0.1, False)
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), meta_dinov2_forward(sd, x, 6, offset, antialias),
                                       atol=1e-5, rtol=1e-5, msg=f"{size}")


def test_timm_s_resize_is_the_register_models_not_the_plain_ones():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 37 * 37, 32)
    for grid in (16, 7, 10):
        px = grid * 14
        reg4 = meta_interpolate_pos_encoding(table, grid * grid, px, px, 14, 0.0, True)
        plain = meta_interpolate_pos_encoding(table, grid * grid, px, px, 14, 0.1, False)
        torch.testing.assert_close(timm_pos_embed(table, grid, grid), reg4, atol=1e-6, rtol=0)
        assert (timm_pos_embed(table, grid, grid) - plain).abs().max() > 1e-3
    # and so a plain model switched to timm's resize misses Meta's features off the grid
    sd = dinov2_state(depth=1)
    vit = build_backbone("dinov2_vits14", 14, 518, depth=1, pos_embed_interpolation="timm")
    vit.load_state_dict(read_reference_state(sd))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (vit.eval()(x) - meta_dinov2_forward(sd, x, 6, 0.1, False)).abs().max() > 1e-4


def read_reference_state(sd: dict) -> dict:
    from dino_core.interop.meta import read_meta_state

    return read_meta_state(sd).state


def test_dinov3_files_give_meta_s_features_at_every_size(tmp_path):
    sd = dinov3_state()
    model = load_backbone(save(tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", sd))
    # the file's bf16-rounded periods are the ones used: timm's own fp32 ones differ
    fresh = build_backbone("dinov3_vits16", 16, depth=2).eval()
    fresh.load_state_dict({**model.state_dict(), "rope.periods": fresh.rope.periods})
    for size in [(224, 224), (96, 96), (160, 240), (100, 120)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = meta_dinov3_forward(sd, x, 6)
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5,
                                       msg=f"{size}")
            assert (fresh(x) - expected).abs().max() > 1e-5


# ---- the architecture from the tensors, errors that name keys --------------------------------
def test_the_architecture_comes_from_the_tensors(tmp_path):
    cases = [
        (dinov2_state("s", depth=2), {"arch": "dinov2_vits14", "patch_size": 14, "depth": 2,
                                      "img_size": 518}),
        (dinov2_state("b", depth=1, regs=4, side=16), {"arch": "dinov2_vitb14_reg4",
                                                       "patch_size": 14, "depth": 1,
                                                       "img_size": 224}),
        (dinov2_state("g", depth=1, regs=4, side=4), {"arch": "dinov2_vitg14_reg4",
                                                      "patch_size": 14, "depth": 1,
                                                      "img_size": 56}),
        (dinov3_state("l", depth=1, local_cls_norm=True), {"arch": "dinov3_vitl16",
                                                           "patch_size": 16, "depth": 1,
                                                           "img_size": 224}),
    ]
    for i, (sd, meta) in enumerate(cases):
        w = read_reference(save(tmp_path / f"{i}.pth", sd))
        assert w.meta == meta and w.kind == meta["arch"][:6]
        assert torch.equal(w.mask_token, sd["mask_token"])  # beside the backbone, not in it
        assert "mask_token" not in w.backbones["teacher"]
    assert any("local_cls_norm dropped" in n for n in w.notes)
    with torch.device("meta"):  # the big ones: shapes only
        for i in (1, 2, 3):
            model = build_backbone(**read_reference(tmp_path / f"{i}.pth").meta)
            held = read_reference(tmp_path / f"{i}.pth").backbones["teacher"]
            assert {k: v.shape for k, v in model.state_dict().items()} == \
                {k: v.shape for k, v in held.items()}


def test_an_error_names_the_mismatched_keys(tmp_path):
    sd = dinov2_state(depth=2)
    del sd["blocks.1.ls2.gamma"]
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"bad\.pth: .*dinov2_vits14 with 2 blocks.*missing "
                                         r"keys: \['blocks\.1\.ls2\.gamma'\]; unexpected keys: "
                                         r"\['blocks\.0\.attn\.extra'\]"):
        load_backbone(save(tmp_path / "bad.pth", sd))
    odd = dinov3_state(depth=1)
    odd = {k: (v[..., :320] if v.shape[-1] == 384 else v) for k, v in odd.items()}
    with pytest.raises(ValueError, match=r"a dinov3 file of width 320 with 4 register tokens: "
                                         r"none of dinov3_vits16 \(width 384"):
        read_reference(save(tmp_path / "odd.pth", odd))
    mask = dinov3_state(depth=1)
    mask["blocks.0.attn.qkv.bias_mask"] = torch.ones(3 * 384)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.bias_mask is not the k-bias"):
        read_reference(save(tmp_path / "mask.pth", mask))


class RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_meta_file_holding_a_foreign_object_is_refused(tmp_path):
    marker = tmp_path / "ran"
    sd: dict = dinov3_state(depth=1)
    sd["extra"] = RunsACommand(marker)
    torch.save(sd, tmp_path / "dinov3_vits16_pretrain_lvd1689m-x.pth")
    with pytest.raises(ValueError, match=r"refused to load: it holds a pickled (posix|os|nt)"
                                         r"\.system"):
        load_backbone(tmp_path / "dinov3_vits16_pretrain_lvd1689m-x.pth")
    assert not marker.exists()


# ---- every place a checkpoint is read --------------------------------------------------------
@pytest.mark.parametrize("regs", [0, 4])
def test_init_from_a_meta_file_resizes_its_way_and_takes_the_mask_token(tmp_path, regs):
    sd = dinov2_state(depth=1, regs=regs)
    path = str(save(tmp_path / "dinov2_vits14_pretrain.pth", sd))
    spec = NetworkSpec(arch="dinov2_vits14_reg4" if regs else "dinov2_vits14", patch_size=14,
                       img_size=224, depth=1, out_dim=32, head_hidden_dim=16,
                       head_bottleneck_dim=8, mask_token=True)
    student, teacher = build_networks(spec)
    loss = torch.nn.Module()
    loss.register_buffer("center", torch.zeros(1, 32))
    line = apply_init_from(path, student, teacher, loss)
    assert "Meta's dinov2 backbone file" in line and "mask token" in line
    assert "resampled from 1369 to 256 patches" in line
    assert torch.equal(student.mask_token, sd["mask_token"])
    x = torch.randn(1, 3, 224, 224)  # Meta's model at 224 px, whichever resize it uses
    with torch.no_grad():
        expected = meta_dinov2_forward(sd, x, 6, 0.0 if regs else 0.1, bool(regs))
        for net in (student, teacher):
            torch.testing.assert_close(net.backbone.eval()(x), expected, atol=1e-5, rtol=1e-5)
    plain, _ = build_networks(NetworkSpec(arch=spec.arch, patch_size=14, img_size=224, depth=1,
                                          out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8))
    assert "mask token (1, 384) dropped" in apply_init_from(path, plain, teacher, loss)


@pytest.mark.budget(15)
def test_checkpoint_arguments_export_and_torch_hub_read_meta_files(tmp_path):
    sd = dinov3_state(depth=1)
    path = str(save(tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", sd))
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = meta_dinov3_forward(sd, x, 6)
        model, cfg = service_backbone.load_backbone(path)  # every eval's --checkpoint
        assert cfg is None
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        out = service_backbone.export_backbone(path, str(tmp_path / "b.safetensors"))
        torch.testing.assert_close(load_backbone(out)(x), expected, atol=1e-5, rtol=1e-5)
        hub = torch.hub.load(str(ROOT), "dinov3_vits16", source="local", weights=path, depth=1)
        torch.testing.assert_close(hub(x), expected, atol=1e-5, rtol=1e-5)
    from dino_core.interop.reference import reference_backbone_state

    with pytest.raises(ValueError, match="reference DINO format holds DINO v1's ViTs"):
        reference_backbone_state(model.state_dict())  # `dino export --format reference`
    with pytest.raises(ValueError, match="holds dinov3_vits16, depth 1"):
        torch.hub.load(str(ROOT), "dinov2_vits14", source="local", weights=path)
    fresh = torch.hub.load(str(ROOT), "dinov2_vits14_reg4", source="local", depth=1)
    assert fresh.patch_embed.proj.weight.shape[-1] == 14 and fresh.reg_token.shape[1] == 4
