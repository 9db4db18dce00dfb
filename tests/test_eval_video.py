"""Video object segmentation (DAVIS 2017 protocol): J and F against naive implementations,
label propagation against a loop over patches, the procedural videos, the DAVIS layout and
``dino eval video`` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_core.data.davis import DavisVideos, davis_palette, write_davis
from dino_core.data.video import ProceduralVideos
from dino_core.eval.video import (
    grid_round_trip,
    neighborhood_mask,
    propagate,
    segment_video,
    vit_frame_features,
)
from dino_core.eval.video_metrics import (
    boundary_f,
    boundary_map,
    region_jaccard,
    summarize,
    video_scores,
)

torch.set_num_threads(1)


def blobs(rng: np.random.Generator, shape=(24, 30), n=3) -> np.ndarray:
    """A boolean mask of a few random rectangles and discs."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros(shape, bool)
    for _ in range(n):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 7)
        if rng.random() < 0.5:
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        else:
            mask |= (abs(yy - cy) <= r) & (abs(xx - cx) <= r / 2)
    return mask


# --- J and F --------------------------------------------------------------------------------

def naive_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = union = 0
    for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
        inter += x and y
        union += x or y
    return 1.0 if union == 0 else inter / union


def test_region_jaccard_on_hand_made_masks_and_against_a_pixel_count():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2, :2] = True
    b[1:3, 1:3] = True  # 4 + 4 pixels, 1 shared
    assert region_jaccard(a, b) == pytest.approx(1 / 7)
    assert region_jaccard(a, a) == 1.0 and region_jaccard(a, ~a) == 0.0
    assert region_jaccard(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # toolkit: empty = 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = blobs(rng), blobs(rng)
        assert region_jaccard(x, y) == pytest.approx(naive_jaccard(x, y))
    with pytest.raises(ValueError, match="shapes differ"):
        region_jaccard(a, np.zeros((4, 5)))


def naive_boundary(seg: np.ndarray) -> np.ndarray:
    """seg2bmap's rule pixel by pixel: differs from the right, lower or lower-right neighbour
    (outside the image counts as 0); last row: right only; last column: lower only."""
    h, w = seg.shape
    at = lambda y, x: bool(seg[y, x]) if y < h and x < w else False  # noqa: E731
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue
            if y == h - 1:
                out[y, x] = at(y, x) != at(y, x + 1)
            elif x == w - 1:
                out[y, x] = at(y, x) != at(y + 1, x)
            else:
                out[y, x] = any(at(y, x) != at(y + dy, x + dx) for dy, dx in ((0, 1), (1, 0), (1, 1)))
    return out


def naive_f(gt: np.ndarray, pred: np.ndarray, bound_th: float) -> float:
    """Boundary F by brute-force distances: a boundary pixel is matched when a pixel of the
    other boundary lies within Euclidean distance r = ceil(bound_th * diagonal)."""
    r = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    pb, gb = np.argwhere(naive_boundary(pred)), np.argwhere(naive_boundary(gt))
    if len(pb) == 0 or len(gb) == 0:
        return 1.0 if len(pb) == len(gb) else 0.0

    def matched(src, dst):
        return sum(any((sy - dy) ** 2 + (sx - dx) ** 2 <= r * r for dy, dx in dst) for sy, sx in src)

    p, rc = matched(pb, gb) / len(pb), matched(gb, pb) / len(gb)
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


def test_boundary_map_of_a_square_counted_by_hand():
    seg = np.zeros((4, 4), bool)
    seg[1:3, 1:3] = True
    expected = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(boundary_map(seg), expected)
    rng = np.random.default_rng(1)
    for _ in range(10):
        m = blobs(rng, (9, 11))
        np.testing.assert_array_equal(boundary_map(m), naive_boundary(m))


@pytest.mark.parametrize("bound_th", [0.008, 0.05, 2])
def test_boundary_f_against_brute_force_distances(bound_th):
    rng = np.random.default_rng(int(bound_th * 1000))
    for _ in range(6):
        gt, pred = blobs(rng), blobs(rng)
        assert boundary_f(gt, pred, bound_th) == pytest.approx(naive_f(gt, pred, bound_th))


def test_boundary_f_hand_cases():
    square = np.zeros((64, 64), bool)
    square[10:30, 10:30] = True
    assert boundary_f(square, square) == 1.0
    far = np.roll(square, 25, axis=1)  # 25 px away; the tolerance is ceil(0.008 * 90.5) = 1 px
    assert boundary_f(square, far) == 0.0
    near = np.roll(square, 1, axis=1)  # every boundary pixel has one within 1 px
    assert boundary_f(square, near) == 1.0
    empty = np.zeros_like(square)
    assert boundary_f(empty, empty) == 1.0 and boundary_f(square, empty) == 0.0
    # a pixel at (5, 5) against the 2x2 block at (5..6, 5..6). Boundaries: the pixel's is
    # {(4,4), (4,5), (5,4), (5,5)}, the block's the 3x3 ring rows/cols 4..6 without (5,5).
    # Tolerance 0: 3 shared, P = 3/4, R = 3/8, F = 1/2. Tolerance 1 px (a plus-shaped disk):
    # every pixel boundary point is near the block's, P = 1; all block points but (6,6)
    # are near the pixel's, R = 7/8, F = 2 * 7/8 / (15/8) = 14/15.
    dot, block = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    dot[5, 5] = True
    block[5:7, 5:7] = True
    assert boundary_f(block, dot, 0) == pytest.approx(1 / 2)
    assert boundary_f(block, dot, 1) == pytest.approx(14 / 15)
    assert naive_f(block, dot, 1) == pytest.approx(14 / 15)


def test_video_scores_skip_the_first_and_last_frame_and_average_objects():
    gt = np.zeros((4, 8, 8), np.uint8)
    gt[:, 1:4, 1:4] = 1
    gt[:, 5:7, 5:7] = 2
    gt[0, 0, 0] = 255  # DAVIS's void: background
    pred = gt.copy()
    pred[0] = 0
    pred[3] = 0  # neither first nor last frame is scored
    res = video_scores(gt, pred)
    assert res["j"] == [1.0, 1.0] and res["f"] == [1.0, 1.0]
    pred[2][pred[2] == 2] = 0  # object 2 lost in one of the two scored frames
    res = video_scores(gt, pred)
    assert res["j"] == [1.0, 0.5] and res["f"] == [1.0, 0.5]
    summary = summarize([res, {"j": [0.0], "f": [0.5]}])  # objects weigh the same
    assert summary["j"] == pytest.approx(100 * 1.5 / 3)
    assert summary["f"] == pytest.approx(100 * 2 / 3)
    assert summary["jf"] == pytest.approx((50 + 200 / 3) / 2) and summary["n_objects"] == 3
    with pytest.raises(ValueError, match="at least 3 frames"):
        video_scores(gt[:2], pred[:2])


# --- label propagation ----------------------------------------------------------------------

def test_neighborhood_mask_matches_the_reference_loop():
    h, w, size = 4, 5, 1
    expected = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    y, x = i - size + p, j - size + q
                    if 0 <= y < h and 0 <= x < w:
                        expected[i, j, y, x] = 1
    assert torch.equal(neighborhood_mask(h, w, size), expected.reshape(h * w, h * w))


@pytest.mark.parametrize("topk", [1, 4, 30])
def test_propagate_matches_a_loop_over_target_patches(topk):
    gen = torch.Generator().manual_seed(topk)
    c, h, w, d, k = 3, 3, 4, 6, 3
    n = h * w
    tar = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
    src = F.normalize(torch.randn(c, n, d, generator=gen), dim=-1)
    seg = torch.rand(c, k, h, w, generator=gen)
    mask = neighborhood_mask(h, w, 1)
    out = propagate(tar, src, seg, topk, mask)
    expected = torch.zeros(k, n)
    for t in range(n):
        weights = [(math.exp(float(tar[t] @ src[ci, s]) / 0.1) * float(mask[t, s]), ci, s)
                   for ci in range(c) for s in range(n)]
        kth = sorted((wt for wt, _, _ in weights), reverse=True)[min(topk, c * n) - 1]
        kept = [(wt, ci, s) for wt, ci, s in weights if wt >= kth and wt > 0]
        total = sum(wt for wt, _, _ in kept)
        for wt, ci, s in kept:
            expected[:, t] += wt / total * seg[ci].reshape(k, n)[:, s]
    torch.testing.assert_close(out, expected.reshape(k, h, w), rtol=1e-4, atol=1e-5)


def coded_frames(codes: list[np.ndarray], patch: int) -> list[torch.Tensor]:
    """Frames whose channel 0 holds a per-patch code (the features read it back)."""
    return [torch.from_numpy(np.kron(c, np.ones((patch, patch)))).float().expand(3, -1, -1)
            for c in codes]


def code_features(num_codes: int, patch: int):
    return lambda x: F.one_hot(x[0, 0, ::patch, ::patch].long().reshape(-1), num_codes).float()


def naive_upsampled_argmax(grid_labels: np.ndarray, num_labels: int, patch: int) -> np.ndarray:
    """Per pixel: bilinear weights of the patch grid (half-pixel centres, edges clamped) on
    the one-hot labels, then the arg-max."""
    gh, gw = grid_labels.shape
    out = np.zeros((gh * patch, gw * patch), np.uint8)
    for y in range(gh * patch):
        for x in range(gw * patch):
            sy = min(max((y + 0.5) / patch - 0.5, 0), gh - 1)
            sx = min(max((x + 0.5) / patch - 0.5, 0), gw - 1)
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, gh - 1), min(x0 + 1, gw - 1)
            score = np.zeros(num_labels)
            for yy, xx, wt in ((y0, x0, (1 - sy + y0) * (1 - sx + x0)),
                               (y0, x1, (1 - sy + y0) * (sx - x0)),
                               (y1, x0, (sy - y0) * (1 - sx + x0)),
                               (y1, x1, (sy - y0) * (sx - x0))):
                score[grid_labels[yy, xx]] += wt
            out[y, x] = score.argmax()
    return out


def test_a_static_video_keeps_its_first_mask():
    patch, h, w = 8, 4, 6
    codes = np.arange(h * w).reshape(h, w)  # every patch its own feature: identity affinities
    features = code_features(h * w, patch)
    # bands along whole rows have no corners, which the bilinear upsampling would round:
    # they come back exactly, J = F = 100
    bands = np.zeros((h * patch, w * patch), np.uint8)
    bands[8:24] = 1
    bands[24:] = 2
    pred = segment_video(features, coded_frames([codes] * 5, patch), bands, patch)
    assert pred.shape == (5, 32, 48) and pred.dtype == np.uint8
    np.testing.assert_array_equal(pred, np.stack([bands] * 5))
    res = summarize([video_scores(np.stack([bands] * 5), pred)])
    assert res["j"] == 100.0 and res["f"] == 100.0 and res["jf"] == 100.0
    # rectangles: every frame is the first frame's patch labels, upsampled
    mask = np.zeros_like(bands)
    mask[8:24, 8:16] = 1
    mask[16:32, 32:48] = 2
    pred = segment_video(features, coded_frames([codes] * 4, patch), mask, patch)
    expected = naive_upsampled_argmax(mask[patch // 2 :: patch, patch // 2 :: patch], 3, patch)
    np.testing.assert_array_equal(pred[0], mask)
    for frame in pred[1:]:
        np.testing.assert_array_equal(frame, expected)
    np.testing.assert_array_equal(grid_round_trip(mask, (h, w), patch), expected)


def test_labels_follow_the_features_of_a_moving_object():
    """An object (code 0) slides one patch a frame over a background of unique codes: its
    label follows the matching features, not the position."""
    patch, h, w = 4, 5, 8
    codes, grids = [], []
    for t in range(6):
        c = 1 + np.arange(h * w).reshape(h, w)
        g = np.zeros((h, w), np.uint8)
        c[1:3, t : t + 2] = 0
        g[1:3, t : t + 2] = 1
        codes.append(c)
        grids.append(g)
    first = np.kron(grids[0], np.ones((patch, patch), np.uint8))
    features = code_features(h * w + 1, patch)
    pred = segment_video(features, coded_frames(codes, patch), first, patch, n_last_frames=2,
                         topk=3, neighborhood=2)
    # the label of each patch, read at its centre
    np.testing.assert_array_equal(pred[:, patch // 2 :: patch, patch // 2 :: patch],
                                  np.stack(grids))
    # a jump of 3 patches between frames, a window of 1 patch and only the first frame as
    # context: the object's new patches see no matching source, so the label is lost there
    stuck = segment_video(features, coded_frames(codes[::3], patch), first, patch,
                          n_last_frames=0, topk=1, neighborhood=1)
    assert (stuck[1, patch // 2 :: patch, patch // 2 :: patch][grids[3] == 1] == 1).mean() < 0.5


def test_vit_features_drive_the_propagation_and_other_backbones_are_refused():
    from dino_core.models.backbone import build_backbone

    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=1).eval()
    video = ProceduralVideos(1, num_frames=3, image_size=32, seed=3)[0]
    from dino_core.eval.video import frame_size, prepare_frame

    size = frame_size(32, 32, None, 8)
    frames = [prepare_frame(f, size) for f in video.frames]
    pred = segment_video(vit_frame_features(vit), frames, video.masks[0], 8)
    assert pred.shape == video.masks.shape
    np.testing.assert_array_equal(pred[0], video.masks[0])
    assert set(np.unique(pred)) <= set(np.unique(video.masks[0]))
    with pytest.raises(TypeError, match="patch tokens of a ViT"):
        vit_frame_features(build_backbone("resnet50"))


# --- the procedural videos -------------------------------------------------------------------

def test_procedural_videos_are_deterministic_and_masks_respect_occlusion():
    ds = ProceduralVideos(6, num_frames=8, image_size=48, seed=5)
    occluded_pixels = 0
    for index in range(len(ds)):
        video, layers = ds.sample(index)
        again, _ = ProceduralVideos(6, num_frames=8, image_size=48, seed=5).sample(index)
        np.testing.assert_array_equal(video.frames, again.frames)
        np.testing.assert_array_equal(video.masks, again.masks)
        assert video.frames.shape == (8, 48, 48, 3) and video.frames.dtype == np.uint8
        assert video.masks.dtype == np.uint8
        n = layers.shape[1]
        assert 2 <= n <= 3
        # naive compositing: the highest id whose own mask covers the pixel, else 0
        expected = np.zeros_like(video.masks)
        for t in range(8):
            for y in range(48):
                for x in range(48):
                    covering = [k + 1 for k in range(n) if layers[t, k, y, x]]
                    expected[t, y, x] = max(covering, default=0)
        np.testing.assert_array_equal(video.masks, expected)
        occluded_pixels += int((layers.sum(axis=1) >= 2).sum())
        assert set(np.unique(video.masks[0])) == set(range(n + 1))  # every id in frame 0
        for k in range(n):  # every object moves: its centroid shifts
            first, last = np.argwhere(layers[0, k]).mean(0), np.argwhere(layers[-1, k]).mean(0)
            assert np.linalg.norm(first - last) > 3
    assert occluded_pixels > 0  # the paths cross
    other = ProceduralVideos(1, num_frames=8, image_size=48, seed=6)[0]
    assert not np.array_equal(other.frames, ds[0].frames)
    with pytest.raises(ValueError, match="num_frames"):
        ProceduralVideos(1, num_frames=2)


# --- the DAVIS layout ------------------------------------------------------------------------

def build_davis(root, videos: dict[str, np.ndarray]) -> None:
    """A DAVIS 2017 folder written by hand with PIL (palette PNGs via putpalette)."""
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (256 * 3 - 12)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(videos) + "\n")
    for name, masks in videos.items():
        for sub in ("JPEGImages", "Annotations"):
            (root / sub / "480p" / name).mkdir(parents=True)
        for t, m in enumerate(masks):
            rgb = np.stack([m * 80, 255 - m * 80, np.full_like(m, 90)], -1).astype(np.uint8)
            Image.fromarray(rgb).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg",
                                      quality=95)
            png = Image.fromarray(m.astype(np.uint8))  # "L"; putpalette makes it "P"
            png.putpalette(palette)
            png.save(root / "Annotations" / "480p" / name / f"{t:05d}.png")


def test_davis_reader_on_a_hand_built_folder(tmp_path):
    masks = np.zeros((3, 16, 24), np.uint8)
    masks[:, 2:8, 3:9] = 1
    masks[1:, 9:14, 12:20] = 2
    build_davis(tmp_path, {"bear": masks, "car": masks[:, ::-1].copy()})
    ds = DavisVideos(tmp_path, "val")
    assert len(ds) == 2 and ds.names == ["bear", "car"]
    video = ds[0]
    assert video.name == "bear" and video.frames.shape == (3, 16, 24, 3)
    np.testing.assert_array_equal(video.masks, masks)
    np.testing.assert_array_equal(ds[1].masks, masks[:, ::-1])
    with Image.open(tmp_path / "Annotations/480p/bear/00000.png") as im:
        assert im.mode == "P"
    (tmp_path / "Annotations/480p/car/00002.png").unlink()
    with pytest.raises(ValueError, match="00002.jpg has no annotation"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="ImageSets/2017/test.txt"):
        DavisVideos(tmp_path, "test")


def test_write_davis_round_trip_of_the_procedural_set(tmp_path):
    ds = ProceduralVideos(2, num_frames=3, image_size=32, seed=1)
    write_davis(tmp_path / "DAVIS", [ds[0], ds[1]])
    back = DavisVideos(tmp_path / "DAVIS")
    for index in range(2):
        np.testing.assert_array_equal(back[index].masks, ds[index].masks)
        diff = np.abs(back[index].frames.astype(int) - ds[index].frames.astype(int)).mean()
        assert diff < 12  # JPEG
    with Image.open(tmp_path / "DAVIS/Annotations/480p/procedural-000/00000.png") as im:
        assert im.mode == "P" and im.getpalette()[3:6] == davis_palette()[1].tolist()


# --- service and CLI -------------------------------------------------------------------------

@pytest.fixture
def checkpoint(random_quickstart_checkpoint: str) -> str:
    return random_quickstart_checkpoint


def test_cli_eval_video_procedural_json_with_masks(checkpoint, tmp_path, capsys):
    from service.cli import main

    out = tmp_path / "pred"
    argv = ["eval", "video", "--checkpoint", checkpoint, "--weights", "random", "--videos", "2",
            "--frames", "4", "--frame-size", "32", "--out", str(out), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_videos"] == 2 and res["patch_size"] == 8 and res["input_size"] == [32, 32]
    assert 0 <= res["j"] <= 100 and 0 <= res["f"] <= 100
    assert res["jf"] == pytest.approx((res["j"] + res["f"]) / 2)
    trip = res["grid_round_trip"]
    assert 0 < trip["j"] <= 100 and trip["jf"] == pytest.approx((trip["j"] + trip["f"]) / 2)
    ds = ProceduralVideos(2, num_frames=4, image_size=32)
    assert res["n_objects"] == sum(int(ds[i].masks[0].max()) for i in range(2))
    for index in range(2):
        video = ds[index]
        files = sorted((out / video.name).glob("*.png"))
        assert [f.name for f in files] == [f"{t:05d}.png" for t in range(4)]
        with Image.open(files[0]) as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.asarray(im), video.masks[0])
        pred = np.stack([np.asarray(Image.open(f)) for f in files])
        score = video_scores(video.masks, pred)  # the files are what was scored
        assert res["per_video"][video.name]["j"] == pytest.approx(100 * np.mean(score["j"]))


def test_cli_eval_video_on_a_davis_folder_with_an_exported_backbone(checkpoint, tmp_path,
                                                                    capsys):
    from service.cli import main

    write_davis(tmp_path / "DAVIS", [ProceduralVideos(1, 3, 48, seed=2)[0]])
    file = tmp_path / "b.safetensors"
    assert main(["export", "--checkpoint", checkpoint, "--out", str(file)]) == 0
    capsys.readouterr()
    assert main(["eval", "video", "--checkpoint", str(file), "--data", str(tmp_path / "DAVIS"),
                 "--image-size", "32", "--topk", "3"]) == 0
    text = capsys.readouterr().out
    assert "procedural-000" in text and "J&F-mean" in text and "input 32x32" in text
    assert main(["eval", "video", "--checkpoint", str(file), "--data",
                 str(tmp_path / "nowhere")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_video_eval_refuses_a_resnet(tmp_path):
    from dino_core.interop.export import save_backbone
    from dino_core.models.backbone import build_backbone
    from service.evaluate.video import video_eval

    file = save_backbone(tmp_path / "r.safetensors", build_backbone("resnet50").state_dict(),
                         {"arch": "resnet50"})
    with pytest.raises(ValueError, match="ViT patch tokens"):
        video_eval(str(file), videos=1, frames=3, frame_side=32)
