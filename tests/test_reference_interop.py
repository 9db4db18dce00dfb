"""Interop with the reference DINO code (facebookresearch/dino): its files are read safely and
written in its exact key layout, its position-table interpolation is reproduced, and a run can
start from its weights (``train.init_from``).

The reference files are built here from tiny models, by a naive generator of main_dino's and
the released files' layouts written from the reference sources (``main_dino.py``,
``utils.py``, ``vision_transformer.py``), independent of ``dino_core.interop.reference_keys``.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dino_core import NetworkSpec, build_networks
from dino_core.interop.export import load_backbone, save_backbone
from dino_core.interop.reference import read_reference, reference_checkpoint, save_reference
from dino_core.models.backbone import build_backbone
from dino_core.models.packed import PackedMultiCropWrapper
from service.cli.main import main
from service.config import backbone_meta, load_config, network_spec, to_yaml
from service.errors import CheckpointError
from service.evaluate import backbone as service_backbone
from service.storage import checkpoints as ckpt
from service.train.init_from import apply_init_from, check_init_from

ROOT = Path(__file__).resolve().parents[1]
HEADS = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12}


# ---- a naive generator of the reference layouts ------------------------------------------
def reference_vit_keys(depth: int) -> set[str]:
    """Every key of the reference ``vit_*(num_classes=0)`` state dict."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    for i in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    return keys


def reference_head_keys(nlayers: int = 3, use_bn: bool = False) -> set[str]:
    """Every key of the reference ``DINOHead`` (old-style weight norm on the last layer)."""
    keys = {"last_layer.weight_g", "last_layer.weight_v"}
    if nlayers == 1:
        return keys | {"mlp.weight", "mlp.bias"}
    i = 0
    for n in range(nlayers):
        keys |= {f"mlp.{i}.weight", f"mlp.{i}.bias"}
        i += 1
        if n < nlayers - 1:
            if use_bn:
                keys |= {f"mlp.{i}.{s}" for s in ("weight", "bias", "running_mean",
                                                 "running_var", "num_batches_tracked")}
                i += 1
            i += 1  # GELU
    return keys


def to_reference_layout(wrapper_state: dict, prefix: str) -> dict:
    """Our multi-crop wrapper state dict in main_dino's names (``prefix``: DDP's module.)."""
    out = {}
    one_layer = not any(k.startswith("head.mlp.") and not k.startswith("head.mlp.0.")
                        for k in wrapper_state)
    for k, v in wrapper_state.items():
        k = k.replace("last_layer.parametrizations.weight.original0", "last_layer.weight_g")
        k = k.replace("last_layer.parametrizations.weight.original1", "last_layer.weight_v")
        if one_layer and k.startswith("head.mlp.0."):
            k = "head.mlp." + k[len("head.mlp.0."):]
        out[prefix + k] = v.clone()
    return out


def tiny_networks(arch="vit_tiny", patch=16, img=224, depth=2, out_dim=64, nlayers=3,
                  use_bn=False, hidden=32, bottleneck=16, seed=0):
    torch.manual_seed(seed)
    spec = NetworkSpec(arch=arch, patch_size=patch, img_size=img, depth=depth, out_dim=out_dim,
                       head_hidden_dim=hidden, head_bottleneck_dim=bottleneck,
                       head_nlayers=nlayers, use_bn_in_head=use_bn)
    student, teacher = build_networks(spec)
    with torch.no_grad():  # all four parts differ, and the position table is far from flat
        for p in [*teacher.parameters(), *student.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
        for net in (student, teacher):
            if hasattr(net.backbone, "pos_embed"):
                net.backbone.pos_embed.normal_()
    return student, teacher


def main_dino_file(path: Path, student, teacher, center=None, epoch=7, teacher_ddp=False) -> Path:
    """A ``checkpoint.pth`` as main_dino saves it."""
    optimizer = torch.optim.AdamW(student.parameters())
    k = teacher.head.last_layer.parametrizations.weight.original1.shape[0]
    patch = teacher.backbone.patch_embed.proj.weight.shape[-1]
    args = argparse.Namespace(arch="vit_tiny", patch_size=patch, out_dim=k, norm_last_layer=True,
                              use_bn_in_head=False, lr=5e-4, epochs=100,
                              global_crops_scale=(0.4, 1.0), rank=0, world_size=8, gpu=0)
    torch.save({
        "student": to_reference_layout(student.state_dict(), "module."),
        "teacher": to_reference_layout(teacher.state_dict(), "module." if teacher_ddp else ""),
        "optimizer": optimizer.state_dict(), "epoch": epoch, "args": args,
        "dino_loss": {"center": torch.randn(1, k) if center is None else center},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                        "growth_interval": 2000, "_growth_tracker": 0},
    }, path)
    return path


def hub_file(path: Path, backbone_state: dict) -> Path:
    """A released backbone-only file (``dino_vits16_pretrain.pth`` & co.)."""
    torch.save({k: v.clone() for k, v in backbone_state.items()}, path)
    return path


# ---- the reference ViT forward, transcribed ----------------------------------------------
def reference_interpolate_pos_encoding(pos_embed, x, w, h, patch):
    """``VisionTransformer.interpolate_pos_encoding`` of the reference: ``w``, ``h`` are the
    image's dims 2 and 3 (``B, nc, w, h = x.shape``)."""
    npatch, n = x.shape[1] - 1, pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    dim, side = x.shape[-1], math.sqrt(n)
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    grid = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / side, h0 / side), mode="bicubic")
    assert (int(w0), int(h0)) == tuple(grid.shape[-2:])
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], grid), dim=1)


def reference_vit_forward(sd: dict, x: torch.Tensor, patch: int, heads: int) -> torch.Tensor:
    """The reference ``VisionTransformer.forward`` (eval: no dropout, no drop-path) on a
    state dict of its names: the CLS token after the final norm."""
    b, _, w, h = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = torch.cat((sd["cls_token"].expand(b, -1, -1), t.flatten(2).transpose(1, 2)), dim=1)
    t = t + reference_interpolate_pos_encoding(sd["pos_embed"], t, w, h, patch)
    c = t.shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    def ln(z, name):
        return F.layer_norm(z, (c,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    def lin(z, name):
        return F.linear(z, sd[name + ".weight"], sd[name + ".bias"])

    for i in range(depth):
        p = f"blocks.{i}."
        y = ln(t, p + "norm1")
        n = y.shape[1]
        q, k, v = lin(y, p + "attn.qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        t = t + lin((attn @ v).transpose(1, 2).reshape(b, n, c), p + "attn.proj")
        t = t + lin(F.gelu(lin(ln(t, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    return ln(t, "norm")[:, 0]


# ---- reading ------------------------------------------------------------------------------
def test_a_main_dino_checkpoint_is_read_in_our_names(tmp_path):
    student, teacher = tiny_networks()
    center = torch.randn(1, 64)
    path = main_dino_file(tmp_path / "checkpoint.pth", student, teacher, center)
    w = read_reference(path)
    assert w.kind == "checkpoint" and w.epoch == 7 and torch.equal(w.center, center)
    assert w.meta == {"arch": "vit_tiny", "patch_size": 16, "depth": 2, "img_size": 224}
    assert w.args["world_size"] == 8
    for which, net in (("teacher", teacher), ("student", student)):
        ours = net.state_dict()
        assert w.backbones[which].keys() == net.backbone.state_dict().keys()
        assert all(torch.equal(v, ours["backbone." + k]) for k, v in w.backbones[which].items())
        assert w.heads[which].keys() == net.head.state_dict().keys()
        assert all(torch.equal(v, ours["head." + k]) for k, v in w.heads[which].items())
    # a teacher under DDP (main_dino wraps it when the model has BatchNorm) reads the same
    ddp = read_reference(main_dino_file(tmp_path / "ddp.pth", student, teacher, center,
                                        teacher_ddp=True))
    assert all(torch.equal(ddp.backbones["teacher"][k], v)
               for k, v in w.backbones["teacher"].items())


def test_a_released_backbone_file_loads_with_its_shapes_inferred(tmp_path):
    student, teacher = tiny_networks(patch=8, img=64, depth=3)
    path = hub_file(tmp_path / "dino_vittiny8_pretrain.pth", teacher.backbone.state_dict())
    w = read_reference(path)
    assert w.kind == "backbone" and not w.heads and w.center is None
    assert w.meta == {"arch": "vit_tiny", "patch_size": 8, "depth": 3, "img_size": 64}
    model = load_backbone(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), teacher.backbone.eval()(x))
    with pytest.raises(ValueError, match="not 'student'"):
        load_backbone(path, "student")
    fresh = load_backbone(path, "random")
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert not torch.equal(fresh.pos_embed, model.pos_embed)


def test_a_released_resnet50_file_and_a_batchnorm_checkpoint(tmp_path):
    student, teacher = tiny_networks(arch="resnet50", depth=None, out_dim=32, use_bn=True)
    flat = {**teacher.backbone.state_dict(), "fc.weight": torch.zeros(1000, 2048)}
    w = read_reference(hub_file(tmp_path / "dino_resnet50_pretrain.pth", flat))
    assert w.meta["arch"] == "resnet50" and "fc.weight" not in w.backbones["teacher"]
    out = reference_checkpoint(teacher.state_dict(), student.state_dict(), epoch=3)
    # main_dino wraps the teacher in DDP too when the model has BatchNorm
    assert all(k.startswith("module.") for k in out["teacher"])
    assert reference_head_keys(3, use_bn=True) == {
        k.removeprefix("module.head.") for k in out["teacher"] if k.startswith("module.head.")}
    assert out["args"].arch == "resnet50" and out["args"].use_bn_in_head is True


class Payload:
    """Anything that is not a tensor, a container or a Namespace."""


class RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_file_holding_other_objects_is_refused_before_anything_runs(tmp_path):
    torch.save({"teacher": {"x": Payload()}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth: refused to load: it holds a pickled "
                                         r"\S*Payload"):
        read_reference(tmp_path / "odd.pth")
    marker = tmp_path / "ran"
    torch.save({"args": argparse.Namespace(), "x": RunsACommand(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth: refused.*(posix|os|nt)\.system"):
        load_backbone(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth"):
        read_reference(tmp_path / "junk.pth")
    (tmp_path / "notes.pth").write_text("junk\n")  # torch's legacy reader: a KeyError
    with pytest.raises(ValueError, match=r"notes\.pth is not a readable torch file"):
        read_reference(tmp_path / "notes.pth")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither a main_dino checkpoint"):
        read_reference(tmp_path / "other.pth")


# ---- writing ------------------------------------------------------------------------------
def load_pretrained_weights_keys(path: Path, checkpoint_key: str) -> dict:
    """What the reference's ``utils.load_pretrained_weights`` hands ``load_state_dict``."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint_key in state:
        state = state[checkpoint_key]
    state = {k.replace("module.", ""): v for k, v in state.items()}
    return {k.replace("backbone.", ""): v for k, v in state.items()}


@pytest.mark.parametrize("nlayers", [3, 1])
def test_an_export_has_main_dino_s_exact_layout(tmp_path, nlayers):
    student, teacher = tiny_networks(nlayers=nlayers)
    center = torch.randn(1, 64)
    obj = reference_checkpoint(teacher.state_dict(), student.state_dict(), center=center,
                               epoch=5, args={"lr": 1e-4})
    path = save_reference(tmp_path / "checkpoint.pth", obj)
    vit, head = reference_vit_keys(2), reference_head_keys(nlayers)
    assert set(obj["teacher"]) == {f"backbone.{k}" for k in vit} | {f"head.{k}" for k in head}
    assert set(obj["student"]) == {f"module.{k}" for k in obj["teacher"]}
    assert obj["epoch"] == 5 and torch.equal(obj["dino_loss"]["center"], center)
    args = obj["args"]
    assert (args.arch, args.patch_size, args.out_dim, args.lr) == ("vit_tiny", 16, 64, 1e-4)
    assert args.momentum_teacher == 0.996  # main_dino's default for what was not given
    # eval_knn.py / eval_linear.py / visualize_attention.py: nothing of the ViT is missing
    for key in ("teacher", "student"):
        loaded = load_pretrained_weights_keys(path, key)
        assert vit - set(loaded) == set()  # load_state_dict(strict=False).missing_keys
        assert loaded["pos_embed"].shape == (1, 197, 192)  # the reference's 224 px table
        assert all(torch.equal(loaded[k], v) for k, v in
                   (teacher if key == "teacher" else student).backbone.state_dict().items())


def test_import_export_import_gives_equal_tensors(tmp_path):
    student, teacher = tiny_networks()
    first = read_reference(main_dino_file(tmp_path / "a.pth", student, teacher))
    ours = {which: {**{f"backbone.{k}": v for k, v in first.backbones[which].items()},
                    **{f"head.{k}": v for k, v in first.heads[which].items()}}
            for which in ("teacher", "student")}
    obj = reference_checkpoint(ours["teacher"], ours["student"], center=first.center,
                               epoch=first.epoch)
    second = read_reference(save_reference(tmp_path / "b.pth", obj))
    original = torch.load(tmp_path / "a.pth", weights_only=False)
    for which in ("teacher", "student"):
        assert set(obj[which]) == set(original[which])  # key for key main_dino's
        for part in ("backbones", "heads"):
            a, b = getattr(first, part)[which], getattr(second, part)[which]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(first.center, second.center) and second.epoch == first.epoch
    assert second.meta == first.meta


def test_a_table_of_another_size_is_written_at_224_px(tmp_path):
    _, teacher = tiny_networks(img=96)
    obj = reference_checkpoint(teacher.state_dict())
    pos = obj["teacher"]["backbone.pos_embed"]
    assert pos.shape == (1, 197, 192)
    expected = reference_interpolate_pos_encoding(teacher.backbone.pos_embed.detach(),
                                                  torch.zeros(1, 197, 192), 224, 224, 16)
    assert torch.equal(pos, expected)


# ---- the position-table interpolation ------------------------------------------------------
@pytest.mark.parametrize("size", [(96, 96), (224, 224), (480, 480), (160, 224), (100, 100)])
def test_features_equal_the_reference_vit_forward_at_every_size(tmp_path, size):
    _, teacher = tiny_networks()
    path = hub_file(tmp_path / "dino_vittiny16_pretrain.pth", teacher.backbone.state_dict())
    ours, sd = load_backbone(path), torch.load(path, weights_only=True)
    assert ours.pos_embed_interpolation == "reference"
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = reference_vit_forward(sd, x, 16, HEADS["vit_tiny"])
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        timm_way = build_backbone("vit_tiny", 16, depth=2, pos_embed_interpolation="timm")
        timm_way.load_state_dict(sd)
        differs = (timm_way.eval()(x) - expected).abs().max().item()
    if size == (224, 224):
        assert differs < 1e-5  # the table's own grid: both leave it alone
    else:
        assert differs > 1e-3  # antialiased, to the exact size: other numbers


def test_the_packed_forward_and_the_attention_read_out_use_the_same_table(tmp_path):
    from dino_core.models import last_self_attention

    _, teacher = tiny_networks()
    vit = teacher.backbone.eval()
    crops = [torch.randn(2, 3, 224, 224), torch.randn(2, 3, 96, 96)]
    packed = PackedMultiCropWrapper(vit, teacher.head, "sdpa")
    with torch.no_grad():
        torch.testing.assert_close(packed.features(crops), teacher.features(crops),
                                   atol=1e-5, rtol=1e-5)
        attn = last_self_attention(vit, crops[1][:1])
    assert attn.shape == (1, 3, 37, 37)


# ---- the service: every --checkpoint, dino export, torch.hub --------------------------------
def test_every_checkpoint_argument_takes_reference_files(tmp_path):
    student, teacher = tiny_networks()
    path = str(main_dino_file(tmp_path / "checkpoint.pth", student, teacher))
    x = torch.randn(1, 3, 224, 224)
    for which, net in (("teacher", teacher), ("student", student)):
        model, cfg = service_backbone.load_backbone(path, which)
        assert cfg is None
        with torch.no_grad():
            assert torch.equal(model(x), net.backbone.eval()(x))
    fresh, _ = service_backbone.load_backbone(path, "random")
    assert not torch.equal(fresh.cls_token, teacher.backbone.cls_token)
    assert service_backbone.checkpoint_config(path) is None
    assert service_backbone.checkpoint_step(path) == 0
    out = service_backbone.export_backbone(path, str(tmp_path / "b.safetensors"), "student")
    with torch.no_grad():
        assert torch.equal(load_backbone(out)(x), student.backbone(x))
    assert load_backbone(out).pos_embed_interpolation == "reference"


def test_dino_export_format_reference_from_a_checkpoint_and_a_safetensors(tmp_path, capsys):
    from test_train_loop import TINY

    cfg = load_config(None, None, [*TINY, "model.depth=2"])
    student, teacher = build_networks(network_spec(cfg))
    center = torch.randn(1, cfg.model.out_dim)
    state = {"student": student.state_dict(), "teacher": teacher.state_dict(),
             "center": center, "epoch": 3, "global_step": 18,
             "config": cfg.model_dump(mode="json"), "backbone_meta": backbone_meta(cfg)}
    directory = ckpt.write_checkpoint(tmp_path / "checkpoint_x", state, to_yaml(cfg))
    out = tmp_path / "checkpoint.pth"
    assert main(["export", "--checkpoint", str(directory), "--out", str(out),
                 "--format", "reference"]) == 0
    w = read_reference(out)
    assert w.epoch == 3 and torch.equal(w.center, center) and w.args["batch_size_per_gpu"] == 8
    assert w.meta == {"arch": "vit_tiny", "patch_size": 8, "depth": 2, "img_size": 224}
    assert set(torch.load(out, weights_only=False)["teacher"]) == (
        {f"backbone.{k}" for k in reference_vit_keys(2)} | {f"head.{k}" for k in
                                                            reference_head_keys(3)})
    x = torch.randn(1, 3, 224, 224)  # the 16 px table went out at 224 px: the same there
    with torch.no_grad():
        assert torch.allclose(load_backbone(out)(x), teacher.backbone.eval()(x), atol=1e-5)
    sf = save_backbone(tmp_path / "b.safetensors",
                       {k[9:]: v for k, v in teacher.state_dict().items()
                        if k.startswith("backbone.")}, backbone_meta(cfg))
    flat = tmp_path / "flat.pth"
    assert main(["export", "--checkpoint", str(sf), "--out", str(flat),
                 "--format", "reference"]) == 0
    assert set(torch.load(flat, weights_only=True)) == reference_vit_keys(2)
    assert "wrote" in capsys.readouterr().out


def test_torch_hub_load_from_this_repository(tmp_path):
    _, teacher = tiny_networks()
    small = build_backbone("vit_small", 16, depth=2)
    path = hub_file(tmp_path / "dino_deitsmall16_pretrain.pth", small.state_dict())
    model = torch.hub.load(str(ROOT), "vit_small", source="local", weights=str(path), depth=2)
    x = torch.randn(1, 3, 96, 96)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(x), small.eval()(x))
    with pytest.raises(ValueError, match="holds vit_small/16, depth 2"):
        torch.hub.load(str(ROOT), "vit_base", source="local", weights=str(path))
    with pytest.raises(ValueError, match="no downloads"):
        torch.hub.load(str(ROOT), "vit_small", source="local", pretrained=True)
    fresh = torch.hub.load(str(ROOT), "vit_tiny", source="local", depth=1, patch_size=8)
    assert fresh.patch_embed.proj.weight.shape[-1] == 8 and len(fresh.blocks) == 1
    tree = ast.parse((ROOT / "hubconf.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m.split(".")[0] for m in imported} <= {"__future__", "typing", "torch", "dino_core"}


# ---- train.init_from ------------------------------------------------------------------------
def tiny_run_networks(depth=1, out_dim=64, seed=0):
    """Networks of ``test_train_loop.TINY``'s model, as a reference run would hold them."""
    return tiny_networks(patch=8, img=16, depth=depth, out_dim=out_dim, hidden=64,
                         bottleneck=32, seed=seed)


def test_init_from_starts_the_loop_from_the_file_with_a_fresh_schedule(tmp_path,
                                                                          one_torch_thread):
    from test_train_loop import TINY, LossRecorder

    from service.train.context import InProcessContext
    from service.train.loop import Loop

    student, teacher = tiny_run_networks()
    center = torch.randn(1, 64)
    path = main_dino_file(tmp_path / "checkpoint.pth", student, teacher, center, epoch=90)
    cfg = load_config(None, None, [*TINY, f"storage.root={tmp_path}", "run_name=cont",
                                   f"train.init_from={path}", "train.max_steps=2"])
    run_url = str(tmp_path / "cont")
    loop = Loop(cfg, InProcessContext(run_url, 3), run_url, LossRecorder())
    s = loop.state
    assert s.global_step == 0 and s.epoch == 0 and loop.restored_from is None
    for mine, theirs in ((s.teacher, teacher), (s.student, student)):
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.state_dict().items())
    assert torch.equal(s.loss_fn.center, center)
    assert s.sched.at(0)["lr"] == 0.0  # the warm-up starts again
    loop.run()
    assert s.global_step == 2
    # the run's own checkpoint wins over init_from when it resumes
    again = Loop(cfg, InProcessContext(run_url, 3), run_url, LossRecorder())
    assert again.restored_from is not None and again.state.global_step == 2
    assert torch.equal(again.state.teacher.backbone.cls_token, s.teacher.backbone.cls_token)
    assert not torch.equal(again.state.teacher.backbone.cls_token, teacher.backbone.cls_token)


def test_init_from_a_backbone_file_resamples_the_table_and_names_mismatches(tmp_path):
    _, released = tiny_networks(patch=8, img=64, depth=1)
    path = str(hub_file(tmp_path / "dino_vittiny8_pretrain.pth", released.backbone.state_dict()))
    student, teacher = tiny_run_networks(seed=1)
    head = {k: v.clone() for k, v in student.head.state_dict().items()}
    center = torch.zeros(1, 64)
    loss = torch.nn.Module()
    loss.register_buffer("center", center)
    line = apply_init_from(path, student, teacher, loss)
    assert "the backbone into teacher and student" in line and "resampled from 64 to 4" in line
    expected = reference_interpolate_pos_encoding(released.backbone.pos_embed.detach(),
                                                  torch.zeros(1, 5, 192), 16, 16, 8)
    for net in (student, teacher):
        assert torch.equal(net.backbone.pos_embed, expected)
        assert torch.equal(net.backbone.blocks[0].attn.qkv.weight,
                           released.backbone.blocks[0].attn.qkv.weight)
    assert all(torch.equal(v, head[k]) for k, v in student.head.state_dict().items())
    assert torch.equal(loss.center, torch.zeros(1, 64))
    deeper = str(hub_file(tmp_path / "deeper.pth", tiny_run_networks(depth=2)[1]
                          .backbone.state_dict()))
    with pytest.raises(ValueError, match=r"its backbone is vit_tiny/8, depth 2.*this run's is "
                                         r"vit_tiny/8, depth 1.*model.depth.*blocks\.1\.attn"):
        apply_init_from(deeper, student, teacher, loss)
    other_head = main_dino_file(tmp_path / "k.pth", *tiny_run_networks(out_dim=32))
    with pytest.raises(ValueError, match=r"its head is out_dim 32.*model.out_dim.*dino export"):
        apply_init_from(str(other_head), student, teacher, loss)


def test_init_from_our_checkpoint_and_our_exported_backbone(tmp_path):
    saved_student, saved_teacher = tiny_run_networks()
    center = torch.randn(1, 64)
    state = {"student": saved_student.state_dict(), "teacher": saved_teacher.state_dict(),
             "center": center, "epoch": 1, "global_step": 6}
    directory = ckpt.write_checkpoint(tmp_path / "checkpoint_a", state, "{}\n")
    student, teacher = tiny_run_networks(seed=1)
    loss = torch.nn.Module()
    loss.register_buffer("center", torch.zeros(1, 64))
    line = apply_init_from(str(directory), student, teacher, loss)
    assert "teacher and student backbones, heads, center" in line and "(step 6)" in line
    for mine, saved in ((student, saved_student), (teacher, saved_teacher)):
        assert all(torch.equal(v, saved.state_dict()[k]) for k, v in mine.state_dict().items())
    assert torch.equal(loss.center, center)
    backbone = {k[9:]: v for k, v in saved_teacher.state_dict().items()
                if k.startswith("backbone.")}
    sf = save_backbone(tmp_path / "b.safetensors", backbone,
                       {"arch": "vit_tiny", "patch_size": 8, "depth": 1, "img_size": 16})
    student, teacher = tiny_run_networks(seed=1)
    apply_init_from(str(sf), student, teacher, loss)
    for net in (student, teacher):
        assert all(torch.equal(v, backbone[k]) for k, v in net.backbone.state_dict().items())


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_preflight_checks_that_init_from_exists_and_reads_as_weights(tmp_path):
    """Its contents too, before Ray (they were read only in the worker, ~1 minute in): an
    empty, a damaged and a malicious file are each one CheckpointError naming the file, and
    nothing of the malicious one runs."""
    with pytest.raises(CheckpointError, match="train.init_from: no file"):
        check_init_from(str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match="train.init_from"):
        check_init_from(str(tmp_path / "no_run"))
    student, teacher = tiny_run_networks()
    good = main_dino_file(tmp_path / "checkpoint.pth", student, teacher, torch.zeros(1, 64))
    check_init_from(str(good))
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5 + b"not a header")
    marker = tmp_path / "ran"
    torch.save({"teacher": _RunsCode(marker)}, tmp_path / "evil.pth")
    for name in ("empty.pth", "bad.safetensors", "evil.pth"):
        with pytest.raises(CheckpointError, match=f"train.init_from.*{name}"):
            check_init_from(str(tmp_path / name))
    assert not marker.exists()
