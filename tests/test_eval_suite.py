"""Evaluation suite: attention maps and masks, heat maps, PCA, linear probe, `dino attention`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from dino_core import NetworkSpec, build_networks
from dino_core.augment.per_image import eval_transform
from dino_core.data.procedural import ProceduralShapes
from dino_core.eval.attention import (
    apply_colormap,
    attention_grid,
    attention_maps,
    attention_masks,
    cls_attention,
    heatmap_overlay,
    jaccard,
    mask_jaccard_over_dataset,
)
from dino_core.eval.linear import linear_train_transform, train_linear
from dino_core.eval.pca import pca_rgb, principal_components
from dino_core.models.backbone import build_backbone


def brute_force_mask(attn: np.ndarray, keep: float) -> np.ndarray:
    """The reference rule without sorting: a patch is kept when the mass of all patches with
    attention <= its own (itself included) exceeds ``1 - keep`` of the total (distinct values)."""
    flat = attn.reshape(len(attn), -1).astype(np.float64)
    out = np.zeros_like(flat, dtype=bool)
    for head, values in enumerate(flat):
        total = values.sum()
        for i, v in enumerate(values):
            out[head, i] = values[values <= v].sum() / total > 1 - keep
    return out.reshape(attn.shape)


@pytest.mark.parametrize("keep", [0.1, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 1, 7), (6, 2, 2)])
def test_attention_masks_match_brute_force(keep, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    attn = torch.rand(shape, generator=gen).pow(3)  # skewed, like trained attention
    mask = attention_masks(attn, keep)
    assert mask.dtype == torch.bool and mask.shape == attn.shape
    np.testing.assert_array_equal(mask.numpy(), brute_force_mask(attn.numpy(), keep))
    # the smallest set holding >= keep of the mass: without its weakest patch it holds less
    for a, m in zip(attn, mask):
        share = a[m].sum() / a.sum()
        assert share >= keep - 1e-6
        assert share - a[m].min() / a.sum() < keep


def test_attention_masks_upsample_each_patch_to_a_block():
    attn = torch.rand(2, 3, 4)
    small, big = attention_masks(attn, 0.6), attention_masks(attn, 0.6, patch_size=8)
    assert big.shape == (2, 24, 32)
    expected = np.kron(small.numpy(), np.ones((8, 8), dtype=bool))
    np.testing.assert_array_equal(big.numpy(), expected)


def test_jaccard_on_hand_made_masks():
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=bool)
    a[:2, :2] = True  # 4 pixels
    b[1:3, 1:3] = True  # 4 pixels, 1 shared
    assert jaccard(a, b) == pytest.approx(1 / 7)
    assert jaccard(a, a) == 1.0
    assert jaccard(a, ~a) == 0.0
    assert jaccard(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert jaccard(torch.from_numpy(a), b) == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="shapes differ"):
        jaccard(a, np.zeros((4, 5), dtype=bool))


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


@pytest.mark.parametrize("name", ["inferno", "viridis"])
def test_colormap_is_monotone_in_brightness(name):
    colours = apply_colormap(np.linspace(0, 1, 101), name)
    assert colours.shape == (101, 3) and colours.dtype == np.uint8
    lum = luminance(colours)
    assert np.all(np.diff(lum) >= -0.5)  # rounding to uint8 only
    assert lum[-1] - lum[0] > 150


def test_heatmap_overlay_shape_and_hot_spot():
    image = np.full((40, 56, 3), 100, dtype=np.uint8)
    attn = torch.zeros(5, 7)
    attn[0, 0] = 1.0  # one hot patch, top left
    out = heatmap_overlay(image, attn)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (56, 40)
    arr = np.asarray(out)
    assert arr.dtype == np.uint8
    assert luminance(arr[0, 0]) > luminance(arr[-1, -1]) + 50
    flat = np.asarray(heatmap_overlay(image, torch.ones(5, 7)))  # constant map: no crash
    assert flat.shape == (40, 56, 3)


@pytest.mark.parametrize(
    "patch, size, grid",
    [
        (16, (64, 64), (4, 4)),
        (16, (61, 75), (3, 4)),  # odd sizes: cropped to 48 x 64
        (8, (61, 75), (7, 9)),
        (8, (32, 40), (4, 5)),
    ],
)
def test_attention_maps_any_patch_and_size(patch, size, grid):
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch, 64, depth=2).eval()
    x = torch.randn(1, 3, *size)
    attn = attention_maps(vit, x)
    assert attn.shape == (3, *grid)
    # CLS-to-patch rows of a softmax: positive, at most 1 (CLS-to-CLS is left out)
    assert (attn > 0).all() and (attn.sum(dim=(1, 2)) <= 1 + 1e-5).all()
    masks = attention_masks(attn, 0.6, patch)
    assert masks.shape == (3, grid[0] * patch, grid[1] * patch)
    batched = cls_attention(vit, torch.cat([x, torch.randn(1, 3, *size)]))
    torch.testing.assert_close(batched[0], attn, rtol=1e-4, atol=1e-6)
    rgb = np.zeros((grid[0] * patch, grid[1] * patch, 3), dtype=np.uint8)
    grid_image = attention_grid(rgb, attn)
    assert grid_image.size == (4 * rgb.shape[1] + 5 * 2, rgb.shape[0] + 2 * 2)


def test_pca_rgb_shape_and_spread():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", 8, 64, depth=1).eval()
    picture = pca_rgb(vit, torch.randn(1, 3, 45, 70))
    assert picture.size == (64, 40) and picture.mode == "RGB"
    arr = np.asarray(picture)
    assert all(arr[..., c].min() == 0 and arr[..., c].max() == 255 for c in range(3))
    # two patches: one axis of variance, SVD gives two, the third is padded
    proj = principal_components(torch.randn(2, 5))
    assert proj.shape == (2, 3) and (proj[:, 2] == 0).all()
    torch.testing.assert_close(proj[:, 1], torch.zeros(2), atol=1e-5, rtol=0)
    assert proj[:, 0].abs().max() > 0.1


def test_mask_jaccard_over_dataset_keys_and_range():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", 8, 32, depth=1)
    res = mask_jaccard_over_dataset(vit, ProceduralShapes(6, image_size=40), 6, 36, 0.6)
    assert len(res["per_head"]) == 3 and res["n"] == 6
    assert all(0.0 <= j <= 1.0 for j in res["per_head"])
    assert res["best"] == max(res["per_head"]) == res["per_head"][res["best_head"]]
    assert res["mean"] == pytest.approx(float(np.mean(res["per_head"])))


class Colours(Dataset):
    """Noisy images whose colour is the class: linearly separable from almost any features."""

    BASE = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200)])

    def __init__(self, n: int, size: int, transform, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(len(self.BASE), size=n)
        noise = rng.normal(0, 30, (n, size, size, 3))
        self.images = np.clip(self.BASE[self.labels][:, None, None] + noise, 0, 255)
        self.images = torch.from_numpy(self.images.astype(np.uint8)).permute(0, 3, 1, 2)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i].contiguous()), int(self.labels[i])


def _splits(n_train: int = 48, n_val: int = 24):
    train = Colours(n_train, 16, linear_train_transform(16, scale=(0.3, 1.0)), seed=0)
    val = Colours(n_val, 16, eval_transform(16, resize_ratio=1.0), seed=1)
    return train, val


class TinyCNN(nn.Module):
    """A non-ViT backbone: the probe uses its pooled output."""

    embed_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu().mean(dim=(2, 3))


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_linear_probe_separates_easy_classes(kind):
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", 8, 16, depth=2) if kind == "vit" else TinyCNN()
    before = [p.detach().clone() for p in backbone.parameters()]
    train, val = _splits()
    res = train_linear(
        backbone,
        train,
        val,
        epochs=4,
        lr=0.5,
        batch_size=16,
        n_last_blocks=2,
        avgpool=True,
        num_classes=3,
    )
    assert res["top1"] >= 90.0 and res["top5"] == 100.0
    assert res["dim"] == (3 * 192 if kind == "vit" else 8)
    for p, q in zip(before, backbone.parameters()):  # the backbone stays frozen
        assert torch.equal(p, q)


class Interrupt(Exception):
    pass


def test_linear_probe_resume_equals_uninterrupted(tmp_path):
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", 8, 16, depth=1)
    train, val = _splits(40, 16)
    kwargs = dict(epochs=3, lr=0.1, batch_size=16, n_last_blocks=1, num_classes=3)
    full = train_linear(vit, train, val, **kwargs)

    def stop_after_two(epoch, stats):
        if epoch == 1:
            raise Interrupt

    ckpt = tmp_path / "probe.pt"
    with pytest.raises(Interrupt):
        train_linear(vit, train, val, checkpoint_path=ckpt, on_epoch_end=stop_after_two, **kwargs)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    resumed = train_linear(vit, train, val, checkpoint_path=ckpt, **kwargs)
    assert resumed["resumed_from"] == 2
    for a, b in zip(full["classifier"].parameters(), resumed["classifier"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert resumed["top1"] == full["top1"]
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)


def test_linear_probe_extended_to_more_epochs(tmp_path):
    """2 epochs, then the same checkpoint continued to 3: only epoch 1's lr differs from an
    uninterrupted 3-epoch run (the cosine curve of 2 epochs), so the probes stay close."""
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", 8, 16, depth=1)
    train, val = _splits(40, 16)
    kwargs = dict(lr=0.1, batch_size=16, n_last_blocks=1, num_classes=3)
    full = train_linear(vit, train, val, epochs=3, **kwargs)
    ckpt = tmp_path / "probe.pt"
    train_linear(vit, train, val, epochs=2, checkpoint_path=ckpt, **kwargs)
    extended = train_linear(vit, train, val, epochs=3, checkpoint_path=ckpt, **kwargs)
    assert extended["resumed_from"] == 2 and torch.load(ckpt, weights_only=True)["epoch"] == 3
    a, b = full["classifier"].linear.weight, extended["classifier"].linear.weight
    assert (a - b).norm() / a.norm() < 0.3
    assert abs(extended["top1"] - full["top1"]) <= 100 / 16  # at most one val image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A quickstart-shaped checkpoint directory with random weights, as a worker writes it."""
    from service.config import backbone_meta, load_config, to_yaml
    from service.storage.checkpoints import write_checkpoint

    cfg = load_config(
        "quickstart", overrides=["eval.procedural_train_size=48", "eval.procedural_val_size=24"]
    )
    m = cfg.model
    student, teacher = build_networks(
        NetworkSpec(
            arch=m.arch,
            patch_size=m.patch_size,
            img_size=cfg.aug.global_size,
            depth=m.depth,
            drop_path_rate=0.0,
            out_dim=m.out_dim,
            head_hidden_dim=m.head_hidden_dim,
            head_bottleneck_dim=m.head_bottleneck_dim,
        )
    )
    state = {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "config": cfg.model_dump(mode="json"),
        "backbone_meta": backbone_meta(cfg),
        "epoch": 1,
        "global_step": 32,
    }
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint_000001"
    write_checkpoint(directory, state, to_yaml(cfg))
    return str(directory)


def test_cli_attention_end_to_end(checkpoint, tmp_path, capsys):
    from service.cli import main

    out = tmp_path / "attn"
    assert (
        main(
            [
                "attention",
                "--checkpoint",
                checkpoint,
                "--procedural-index",
                "3",
                "--out",
                str(out),
                "--jaccard",
                "4",
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    heads = res["heads"]
    assert heads == 3 and res["patch_size"] == 8 and (res["height"], res["width"]) == (48, 48)
    names = {f"attn-head{i}.png" for i in range(heads)} | {
        f"mask-head{i}.png" for i in range(heads)
    }
    names |= {"attn-grid.png", "pca.png", "image.png"}
    assert {p.rsplit("/", 1)[-1] for p in res["paths"]} == names
    for name in names:
        assert (out / name).is_file()
    with Image.open(out / "attn-head0.png") as im:  # 48 px enlarged 5x for viewing
        assert im.size == (240, 240) and im.mode == "RGB"
    with Image.open(out / "mask-head0.png") as im:
        assert set(np.unique(np.asarray(im))) <= {0, 255}
    assert len(res["image_jaccard"]) == heads
    assert len(res["jaccard"]["per_head"]) == heads and res["jaccard"]["n"] == 4

    # an odd-sized image file given by path
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(
        tmp_path / "photo.png"
    )
    assert (
        main(
            [
                "attention",
                "--checkpoint",
                checkpoint,
                "--image",
                str(tmp_path / "photo.png"),
                "--out",
                str(tmp_path / "photo"),
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert (res["height"], res["width"]) == (32, 48) and "image_jaccard" not in res


def test_cli_eval_linear_with_resume_dir(checkpoint, tmp_path, capsys):
    from service.cli import main

    args = [
        "eval",
        "linear",
        "--checkpoint",
        checkpoint,
        "--train",
        "procedural",
        "--val",
        "procedural",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--image-size",
        "32",
        "--num-workers",
        "0",
        "--n-last-blocks",
        "1",
        "--output-dir",
        str(tmp_path),
        "--json",
    ]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 <= res["top1"] <= res["top5"] <= 100
    assert (res["n_train"], res["n_val"], res["num_classes"]) == (48, 24, 6)
    assert (tmp_path / "linear_probe.pt").is_file()
    assert json.loads((tmp_path / "linear_results.json").read_text())["top1"] == res["top1"]
    assert main(args) == 0  # the finished probe is resumed, not retrained
    again = json.loads(capsys.readouterr().out)
    assert again["resumed_from"] == 1 and again["top1"] == res["top1"]


def test_cli_attention_logs_to_the_checkpoints_mlflow_run(checkpoint, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from service.cli import main
    from service.tracking import MLflowTracker as Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    training = Tracker.start(uri, "dino", "quickstart", (tmp_path / "artifacts").as_uri())
    assert (
        main(
            [
                "attention",
                "--checkpoint",
                checkpoint,
                "--procedural-index",
                "0",
                "--out",
                str(tmp_path / "pics"),
                "--jaccard",
                "2",
                "--mlflow",
                "--tracking-uri",
                uri,
            ]
        )
        == 0
    )
    client = MlflowClient(uri)
    run = client.get_run(training.run_id)
    assert run.info.status == "RUNNING"  # a run still training is not marked finished
    assert {"eval_jaccard_best", "eval_jaccard_mean", "eval_jaccard_head0"} <= set(run.data.metrics)
    history = client.get_metric_history(training.run_id, "eval_jaccard_best")
    assert history[0].step == 32  # the checkpoint's global step
    logged = {a.path for a in client.list_artifacts(training.run_id, "eval")}
    assert {"eval/attn-grid.png", "eval/pca.png"} <= logged
    assert training.run_id in capsys.readouterr().err


def test_weights_choice_teacher_student_random(checkpoint):
    from service.evaluate import load_backbone

    teacher, cfg = load_backbone(checkpoint)
    random_a, _ = load_backbone(checkpoint, "random")
    random_b, _ = load_backbone(checkpoint, "random")
    student, _ = load_backbone(checkpoint, "student")
    t, a, b = (m.state_dict() for m in (teacher, random_a, random_b))
    assert t.keys() == a.keys()
    assert a and all(torch.equal(a[k], b[k]) for k in a)  # seeded by the run's train.seed
    assert not torch.equal(t["pos_embed"], a["pos_embed"])  # not the checkpoint's weights
    assert torch.equal(student.state_dict()["pos_embed"], t["pos_embed"])  # as saved
    with pytest.raises(ValueError, match="weights must be one of teacher, student, random"):
        load_backbone(checkpoint, "ema")


def test_cli_bad_checkpoint_is_one_line_not_a_traceback(checkpoint, tmp_path, capsys):
    from service.cli import main

    knn = ["eval", "knn", "--train", "procedural", "--val", "procedural", "--num-workers", "0"]
    assert main([*knn, "--checkpoint", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err == f"dino: CheckpointError: {tmp_path / 'missing'}: no such checkpoint or run folder\n"
    (tmp_path / "half").mkdir()  # a checkpoint whose manifest was never written
    assert main([*knn, "--checkpoint", str(tmp_path / "half")]) == 1
    assert "never completed" in capsys.readouterr().err
    assert main(["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "b.safetensors")]) == 0
    capsys.readouterr()
    assert main([*knn, "--checkpoint", str(tmp_path / "b.safetensors"), "--weights", "student"]) == 1
    assert "dino: ValueError: an exported backbone holds only its own weights, not 'student'" in \
        capsys.readouterr().err
