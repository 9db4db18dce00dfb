"""Faults at the input boundary, really injected: unreadable and odd image files, secrets in
the environment, and concurrent drivers on one storage root. (Bad configs are in
test_config.py, next to the other validation tests.)"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_service_train import TINY

from dino_core.augment.per_image import eval_transform
from dino_core.data.collate import collate_multicrop
from dino_core.data.folder import ImageFolder, load_rgb
from service import data
from service.config import load_config
from service.storage import runlock

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- the messy folder

RED, BLUE = (220, 20, 20), (20, 20, 220)
# files that no decoder can read: skipped, counted once each, named in the log
UNREADABLE = ["a/empty.jpg", "a/empty.png", "a/html.jpg", "a/truncated.jpg", "a/truncated.png"]
# odd but valid: each must come out as 8-bit RGB
ODD = [
    "a/cmyk.jpg", "a/exif6.jpg", "a/gray.jpg", "a/gray.png", "a/gray16.png", "a/huge.jpg",
    "a/palette.png", "a/palette_alpha.png", "a/rgba.png", "a/tiny.jpg", "a/tiny.png",
]  # fmt: skip
N_PLAIN = 16  # b/plain_XX.jpg: 16 + 11 + 5 = 32 files, two global batches of 16


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_messy_folder(root: Path) -> Path:
    """An ImageFolder tree (class/file) of plain, odd-but-valid and unreadable images."""
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_PLAIN):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            b / f"plain_{i:02d}.jpg"
        )
    noise = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    jpeg, png = _encoded(noise, "JPEG"), _encoded(noise, "PNG")
    (a / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # an interrupted download
    (a / "truncated.png").write_bytes(png[: len(png) // 2])
    (a / "empty.jpg").write_bytes(b"")
    (a / "empty.png").write_bytes(b"")
    (a / "html.jpg").write_text("<html><body>404 Not Found</body></html>")

    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(a / "cmyk.jpg")  # magenta ink
    sideways = Image.new("RGB", (40, 20), RED)  # stored 40x20, displayed 20x40
    sideways.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    sideways.save(a / "exif6.jpg", exif=exif.tobytes(), quality=95)
    Image.new("L", (12, 8), 77).save(a / "gray.jpg")
    Image.new("L", (12, 8), 77).save(a / "gray.png")
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(a / "gray16.png")
    Image.new("RGB", (6000, 4000), (30, 60, 90)).save(a / "huge.jpg", quality=50)  # ~0.4 MB
    palette = Image.new("P", (4, 2), 0)
    palette.putpalette([*RED, *BLUE] + [0] * 762)
    palette.paste(1, (2, 0, 4, 2))  # left half index 0 (red), right half index 1 (blue)
    palette.save(a / "palette.png")
    palette.save(a / "palette_alpha.png", transparency=0)  # red is the transparent index
    rgba = Image.new("RGBA", (6, 6), (*BLUE, 255))
    rgba.paste((*RED, 0), (0, 0, 3, 6))  # left half fully transparent
    rgba.save(a / "rgba.png")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(a / "tiny.png")
    Image.new("RGB", (1, 1), (200, 100, 50)).save(a / "tiny.jpg", quality=100)
    return root


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> Path:
    return write_messy_folder(tmp_path_factory.mktemp("messy") / "images")


def _mean(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.crop(box), dtype=np.float64).reshape(-1, 3).mean(0)


def test_odd_images_become_rgb_and_unreadable_ones_are_skipped(messy_folder, caplog):
    ds = ImageFolder(messy_folder)  # no size hint: every image at full size
    assert ds.classes == ["a", "b"] and len(ds) == N_PLAIN + len(ODD) + len(UNREADABLE)
    with caplog.at_level(logging.WARNING, logger="dino_core.data.folder"):
        items = {Path(p).relative_to(messy_folder).as_posix(): ds[i]
                 for i, (p, _) in enumerate(ds.samples)}  # fmt: skip
    assert sorted(k for k, v in items.items() if v is None) == UNREADABLE
    assert ds.num_skipped == len(UNREADABLE)
    warned = re.findall(r"skipping unreadable image (\S+):", caplog.text)
    assert sorted(warned) == sorted(str(messy_folder / name) for name in UNREADABLE)
    for name, item in items.items():
        if item is not None:
            image, label = item
            assert image.mode == "RGB", name
            assert label == (0 if name.startswith("a/") else 1), name
    print(
        f"{len(items)} files: {ds.num_skipped} skipped, counted and logged by path; "
        f"{len(ODD)} odd ones converted to RGB"
    )

    def image(name: str) -> Image.Image:
        return items[name][0]

    upright = image("a/exif6.jpg")
    assert upright.size == (20, 40)  # EXIF orientation 6 applied
    top, bottom = _mean(upright, (2, 2, 18, 18)), _mean(upright, (2, 22, 18, 38))
    assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]  # left half went to the top
    np.testing.assert_allclose(_mean(image("a/cmyk.jpg"), (0, 0, 16, 16)), [255, 0, 255], atol=3)
    for name in ("a/gray.jpg", "a/gray.png"):
        np.testing.assert_allclose(np.asarray(image(name)), 77, atol=1)
    np.testing.assert_array_equal(np.asarray(image("a/gray16.png"))[0, :, 0], [0, 100, 255])
    np.testing.assert_array_equal(np.asarray(image("a/palette.png"))[0, [0, 3]], [RED, BLUE])
    np.testing.assert_array_equal(np.asarray(image("a/palette_alpha.png"))[0, [0, 3]],
                                  [(0, 0, 0), BLUE])  # transparent -> black  # fmt: skip
    np.testing.assert_array_equal(np.asarray(image("a/rgba.png"))[0, [0, 5]], [(0, 0, 0), BLUE])
    assert image("a/tiny.png").size == image("a/tiny.jpg").size == (1, 1)
    assert image("a/huge.jpg").size == (6000, 4000)


def test_skips_are_counted_across_loader_processes(messy_folder):
    """Two DataLoader worker processes, each with its own copy of the dataset: the count
    travels back with the batches."""
    ds = ImageFolder(messy_folder, transform=eval_transform(size=16), size_hint=18)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                         collate_fn=collate_multicrop)  # fmt: skip
    kept = skipped = 0
    for images, labels, n_skipped in loader:
        kept, skipped = kept + labels.numel(), skipped + n_skipped
        assert images.shape == (labels.numel(), 3, 16, 16)
    assert (kept, skipped) == (N_PLAIN + len(ODD), len(UNREADABLE))
    assert ds.num_skipped == 0  # this process's copy decoded nothing: counts must not live here


@pytest.mark.parametrize("backend", ["batched", "per_image"])
def test_service_training_dataset_decodes_big_jpegs_small(messy_folder, backend):
    cfg = load_config(None, None, [*TINY, f"data.path={messy_folder}", f"aug.backend={backend}"])
    ds = data.train_dataset(cfg)
    hint = data.decode_size_hint(cfg)
    # batched: the canvas, round(16 * 8 / 7); per-image: 8 px local crops at scale 0.05 and
    # aspect 3/4 need 8 / sqrt(0.05 * 3 / 4) = 41.3 px
    assert ds.size_hint == hint == (18 if backend == "batched" else 42)
    assert load_rgb(messy_folder / "a" / "huge.jpg", hint).size == (750, 500)  # 1/8 scale
    for i, (path, _) in enumerate(ds.samples):
        item = ds[i]
        assert (item is None) == (Path(path).relative_to(messy_folder).as_posix() in UNREADABLE)
        if item is None:
            continue
        if backend == "batched":
            assert item[0].shape == (3, 18, 18) and item[0].dtype == torch.uint8, path
        else:
            assert [tuple(v.shape) for v in item[0]] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2, path
    # the paper's crops: 96 px local crops at scale 0.05 need a 496 px shorter side
    paper = load_config(None, None, ["aug.backend=per_image"])
    assert data.decode_size_hint(paper) == 496


# ---------------------------------------------------------------------------- bad data, end to end
# In process (``InProcessContext``): skipping and counting are the loop's and the loader's;
# under Ray the same lines are only forwarded (Ray runs that read unreadable data:
# test_shards_runs' damaged shard and the 2-worker runs of test_service_train).


def _loop(cfg, name: str, root: Path, tracker=None):
    from service.tracking import NullTracker
    from service.train.context import InProcessContext
    from service.train.loop import Loop

    run_url = str(root / name)
    loop = Loop(cfg, InProcessContext(run_url), run_url, tracker or NullTracker())
    loop.run()
    return loop


@pytest.mark.budget(30)
def test_train_on_a_messy_folder_counts_and_names_skipped_files(messy_folder, tmp_path, capfd):
    """One epoch of two steps sees every file once; decoding happens in a DataLoader worker
    process, whose warnings name each skipped file (a stderr handler, as a worker process's
    logging set-up has, inherited by the forked loader process); the count reaches MLflow."""
    from mlflow.tracking import MlflowClient

    from service.tracking import MLflowTracker

    root = tmp_path / "runs"
    cfg = load_config(None, None, [*TINY, f"data.path={messy_folder}", f"storage.root={root}",
                                   "train.epochs=1", "data.num_workers=1", "run_name=messy"])
    uri = f"sqlite:///{root / 'mlflow.db'}"
    root.mkdir()
    tracker = MLflowTracker.start(uri, "dino", "messy", None)
    handler = logging.StreamHandler(os.fdopen(os.dup(2), "w"))
    logger = logging.getLogger("dino_core.data.folder")
    logger.addHandler(handler)
    try:
        _loop(cfg, "messy", root, tracker)
    finally:
        logger.removeHandler(handler)
        tracker.end()
    out, err = capfd.readouterr()
    assert "step 2/2" in out
    assert f"[dino] skipped {len(UNREADABLE)} unreadable images" in out, out
    named = set(re.findall(r"skipping unreadable image (\S+):", out + err))
    assert named == {str(messy_folder / name) for name in UNREADABLE}, named

    history = MlflowClient(uri).get_metric_history(tracker.run_id, "skipped_images")
    assert max(m.value for m in history) == len(UNREADABLE)


def _all_unreadable_batch_seed(n: int, bad: set[int], batch: int) -> int:
    for seed in range(20):
        order = list(data.ShardSampler(n, 0, 1, seed, 0, batch))
        if any(bad >= set(order[i : i + batch]) for i in range(0, n, batch)):
            return seed
    raise AssertionError("no seed gives an all-unreadable batch")


def test_a_batch_of_only_unreadable_files_does_not_kill_the_run(tmp_path, capfd,
                                                                one_torch_thread):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(8):
        (root / "a" / f"empty_{i}.jpg").write_bytes(b"")
        Image.new("RGB", (24, 24), (10 * i, 0, 0)).save(root / "b" / f"ok_{i}.png")
    seed = _all_unreadable_batch_seed(16, set(range(8)), 4)  # a/ sorts first: indices 0-7
    cfg = load_config(None, None, [*TINY, f"data.path={root}", f"storage.root={tmp_path / 'runs'}",
                                   "train.batch_size=4", "train.epochs=1", f"train.seed={seed}",
                                   "tracking.enabled=false", "run_name=allbad"])
    loop = _loop(cfg, "allbad", tmp_path / "runs")
    assert loop.state.global_step == 4
    assert "[dino] skipped 8 unreadable images" in capfd.readouterr().out


# ---------------------------------------------------------------------------- concurrency


def test_run_lock_refuses_a_second_driver_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from service.storage import runlock\n"
         "with runlock.hold(sys.argv[1], 'r'):\n print('held', flush=True); time.sleep(600)",
         str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunInUseError, match=rf"run 'r' is being trained right now "
                           rf"by pid {holder.pid} on "):  # fmt: skip
            with runlock.hold(str(tmp_path), "r"):
                pass
        with runlock.hold(str(tmp_path), "other"):  # other names are free
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a crashed driver: no cleanup code runs
        holder.wait()
    with runlock.hold(str(tmp_path), "r") as lock:  # the kernel released it
        assert lock is not None and f"pid {os.getpid()} " in lock.read_text()


@dataclass
class Driver:
    """A ``dino train`` process (``-X importtime``: what it imported is on stderr) whose
    output goes to files, so that no pipe fills up while the test waits on something else."""

    proc: subprocess.Popen
    out: Path
    err: Path

    @classmethod
    def start(cls, args: list[str], logs: Path) -> Driver:
        logs.mkdir(parents=True)
        out, err = logs / "stdout", logs / "stderr"
        with open(out, "w") as o, open(err, "w") as e:
            proc = subprocess.Popen(
                [sys.executable, "-X", "importtime", "-m", "service.cli", "train", *args],
                cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""}, stdout=o, stderr=e, text=True)
        return cls(proc, out, err)

    def result(self, timeout: float) -> tuple[int, str, str]:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.out.read_text(), self.err.read_text()


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_2*"))


def _snapshot_names(run_dir: Path) -> set[str]:
    import json

    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    return {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}


@pytest.mark.integration
@pytest.mark.budget(240)
def test_concurrent_drivers_on_one_storage_root_never_share_a_run_directory(tmp_path, module_ray):
    """`dino train` drivers at once on one storage root, of the module's shared cluster: two
    without a run name (started together), and two with the same one: the second is started
    once the first holds the run's lock (so they overlap whatever the machine's speed), and
    refuses at once, naming it, before importing Ray; the first is then ended by a stop
    request. Tracking is off: two first runs on a fresh default sqlite store race on creating
    its tables (see the report of issue 8)."""
    from service.storage.runlock import LOCK_FILE
    from service.train.stopping import request_stop

    root = tmp_path / "runs"
    common = [*TINY, f"storage.root={root}", "train.epochs=1", "tracking.enabled=false",
              f"ray.address={module_ray.address}", "ray.cpus_per_worker=0.5",
              "train.stop_check_every_steps=1"]
    t0 = time.monotonic()
    procs = {
        "unnamed1": Driver.start(common, tmp_path / "unnamed1"),
        "unnamed2": Driver.start(common, tmp_path / "unnamed2"),
        "winner": Driver.start([*common, "run_name=shared", "train.epochs=1000",
                                "train.checkpoint_every_epochs=0"], tmp_path / "winner"),
    }
    lock = root / "shared" / LOCK_FILE
    deadline = time.monotonic() + 120
    winner = procs["winner"]
    while not (lock.is_file() and f"pid {winner.proc.pid} " in lock.read_text()):
        if time.monotonic() > deadline or winner.proc.poll() is not None:
            raise AssertionError(f"the first driver never held {lock}:\n"
                                 f"{winner.err.read_text()[-3000:]}")
        time.sleep(0.2)
    procs["loser"] = Driver.start([*common, "run_name=shared"], tmp_path / "loser")
    outs = {"loser": procs["loser"].result(timeout=120)}
    request_stop(str(root / "shared"), "the test is done")
    for name in ("unnamed1", "unnamed2", "winner"):
        outs[name] = procs[name].result(timeout=400)
    print(f"four drivers: {time.monotonic() - t0:.1f} s")

    # no run name: each driver picks a fresh one and keeps to its own directory
    names = []
    for key in ("unnamed1", "unnamed2"):
        rc, stdout, stderr = outs[key]
        assert rc == 0, stdout[-3000:] + stderr[-3000:]
        names.append(re.search(r"\[dino\] run '([^']+)'", stdout).group(1))
    assert len(set(names)) == 2 and all(re.fullmatch(r"dino-\d{8}-\d{6}-[0-9a-f]{6}", n)
                                        for n in names)  # fmt: skip
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted([*names, "shared"])
    for name in [*names, "shared"]:
        ckpts = _checkpoints(root / name)
        assert len(ckpts) == 1, (name, ckpts)  # one checkpoint (epoch or stop), no other's
        assert _snapshot_names(root / name) == {ckpts[0].name}
        config = (ckpts[0] / "config.yaml").read_text()
        assert f"run_name: {name}\n" in config and (ckpts[0] / "manifest.json").is_file()

    # the same name: one trains (until the stop request), the other refuses at once
    rc, stdout, stderr = outs["winner"]
    assert rc == 1 and "stopped on request" in stdout + stderr, stdout[-3000:] + stderr[-3000:]
    rc, _, message = outs["loser"]
    assert rc == 1, message[-3000:]
    assert f"run 'shared' is being trained right now by pid {winner.proc.pid} on " in message
    assert "another run_name=" in message
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in message.splitlines()
                if ln.startswith("import time:")}
    assert "service.cli" in imported and "ray" not in imported  # refused before Ray
