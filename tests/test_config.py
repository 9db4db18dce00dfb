"""Configuration: presets, YAML, overrides, validation messages, path resolution."""

import os
from pathlib import Path

import pytest

from service.config import ConfigError, flatten, load_config, preset_names, resolve_paths, to_yaml
from service.data import ShardSampler


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for k in ("DINO_STORAGE", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)


def test_defaults_are_the_papers():
    c = load_config()
    assert (c.model.arch, c.model.patch_size, c.model.out_dim) == ("vit_small", 16, 65536)
    assert (c.loss.student_temp, c.loss.teacher_temp, c.loss.center_momentum) == (0.1, 0.04, 0.9)
    assert (c.optim.momentum_teacher, c.optim.lr, c.optim.warmup_epochs) == (0.996, 5e-4, 10)
    assert (c.optim.weight_decay, c.optim.weight_decay_end, c.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert (c.optim.freeze_last_layer, c.model.drop_path_rate) == (1, 0.1)
    assert (c.aug.global_size, c.aug.local_size) == (224, 96)


def test_preset_file_and_overrides_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {epochs: 7, batch_size: 32}\noptim: {lr: 0.002}\n")
    c = load_config("quickstart", str(f), ["optim.lr=1e-3", "data.path=/imgs", "train.seed=3"])
    assert c.run_name == "quickstart"  # from the preset
    assert c.train.epochs == 7 and c.train.batch_size == 32  # file over preset
    assert c.optim.lr == 1e-3  # override over file
    assert c.data.path == "/imgs" and c.train.seed == 3


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("optim.lr=-1", "optim.lr", "greater than 0"),
        ("loss.teacher_temp=0", "loss.teacher_temp", "greater than 0"),
        ("optim.momentum_teacher=1.0", "optim.momentum_teacher", "less than 1"),
        ("optim.momentum_teacher=-0.1", "optim.momentum_teacher", "greater than or equal to 0"),
        ("model.arch=vit_huge", "model.arch", "'vit_tiny', 'vit_small', 'vit_base', 'resnet50', 'dinov2_vits14'"),
        ("train.bogus=1", "train.bogus", "unknown key; allowed keys here: epochs"),
        ("bogus=1", "bogus", "unknown key"),
        ("storage.root=ftp://host/x", "storage.root", "unknown storage scheme 'ftp'"),
        ("train.precision=fp8", "train.precision", "'auto', 'fp32', 'bf16' or 'fp16'"),
        ("aug.local_size=300", "aug", "local_size (300) must be <= global_size (224)"),
        ("train.register_model=team/dino", "train.register_model", "no '/' or ':'"),
        ("train.register_model=..", "train.register_model", "not only dots"),
        ("tracking.system_metrics_interval_s=0.5", "tracking.system_metrics_interval_s",
         "greater than or equal to 1"),
    ],
)
def test_invalid_values_name_field_and_allowed(override, field, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(None, None, [override])
    msg = str(e.value)
    assert f"{field}:" in msg and allowed in msg, msg


def test_registering_a_model_needs_tracking():
    """The name is only used when the run ends: refused when the config is read."""
    assert load_config().train.register_model is None and load_config().tracking.system_metrics
    assert load_config(None, None, ["train.register_model=dino-vits"]).train.register_model == (
        "dino-vits")
    with pytest.raises(ConfigError, match=r"config: train.register_model=dino-vits registers in "
                       r"MLflow's Model Registry: it needs tracking.enabled=true"):
        load_config(None, None, ["train.register_model=dino-vits", "tracking.enabled=false"])


def test_batch_not_divisible_by_workers():
    with pytest.raises(ConfigError, match=r"train.batch_size \(10\) must be divisible by ray.num_workers \(3\)"):
        load_config(None, None, ["train.batch_size=10", "ray.num_workers=3"])


def test_bad_override_syntax_and_unknown_preset():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, None, ["optim.lr"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*quickstart"):
        load_config("nope")


def test_environment_defaults(monkeypatch):
    monkeypatch.setenv("DINO_STORAGE", "s3://bucket/runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    c = load_config("quickstart")
    assert c.storage.root == "s3://bucket/runs" and c.tracking.uri == "http://127.0.0.1:5000"
    assert load_config("quickstart", None, ["storage.root=/x"]).storage.root == "/x"


def test_resolve_paths_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = resolve_paths(load_config(None, None, ["storage.root=runs", "data.path=imgs"]))
    assert c.storage.root == str(tmp_path / "runs") and Path(c.data.path).is_absolute()
    c = resolve_paths(load_config(None, None, ["storage.root=s3://b/r"]))
    assert c.storage.root == "s3://b/r" and c.data.path == "procedural"


def test_yaml_round_trip_and_flatten(tmp_path):
    c = load_config("quickstart", None, ["optim.lr=0.003"])
    f = tmp_path / "resolved.yaml"
    f.write_text(to_yaml(c))
    assert load_config(None, str(f)) == c
    flat = flatten(c)
    assert flat["optim.lr"] == 0.003 and flat["model.arch"] == "vit_tiny"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=-1"], "optim.lr: Input should be greater than 0 (got -1)"),
        (["optim.lr=inf"], "optim.lr: Input should be a finite number (got 'inf')"),
        (["loss.koleo_weight=nan"], "loss.koleo_weight: Input should be a finite number"),
        (["loss.teacher_temp=0"], "loss.teacher_temp: Input should be greater than 0 (got 0)"),
        (["loss.teacher_temp=-0.04"], "loss.teacher_temp: Input should be greater than 0"),
        (["optim.momentum_teacher=1.0"], "optim.momentum_teacher: Input should be less than 1"),
        (["optim.momentum_teacher=-0.1"],
         "optim.momentum_teacher: Input should be greater than or equal to 0"),
        (["train.batch_size=10", "ray.num_workers=3"],
         "train.batch_size (10) must be divisible by ray.num_workers (3); nearest allowed: 9 or 12"),
        (["train.batch_size=16", "ray.num_workers=2-4"],
         "train.batch_size (16) must be divisible by every size of ray.num_workers=2-4, the "
         "per-worker batch being global / world size; [3] do not divide it"),
        (["ray.num_workers=[4, 2]"], "a worker range needs 1 <= min <= max, got 4-2"),
        (["train.bogus=1"], "train.bogus: unknown key; allowed keys here: epochs, batch_size"),
        (["train.storage=s3://bucket/x"], "train.storage: unknown key; allowed keys here: epochs"),
        (["model.arch=vit_huge"],
         "model.arch: Input should be 'vit_tiny', 'vit_small', 'vit_base', 'resnet50', "
         "'dinov2_vits14'"),
        (["storage.root=foo://bucket/x"], "storage.root: unknown storage scheme 'foo' in "
         "'foo://bucket/x'; allowed: a local path or file://, s3://, gs://"),
    ],
)  # fmt: skip
def test_cli_rejects_bad_config_before_starting_ray(tmp_path, overrides, message):
    """`dino train` exits 2 naming the field and what is allowed, and takes nothing first:
    ray is never imported (``-X importtime`` lists every import), no child process runs, no
    Ray temp dir and nothing under the storage root appears."""
    import subprocess
    import sys
    import time

    import psutil

    storage, ray_tmp = tmp_path / "storage", tmp_path / "ray-tmp"
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "service.cli", "train", "--preset",
         "quickstart", f"storage.root={storage}", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmp)},
    )  # fmt: skip
    children: set[str] = set()
    while proc.poll() is None:  # watch for any child process (a Ray would start several)
        children |= {c.name() for c in psutil.Process(proc.pid).children(recursive=True)}
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stdout + stderr[-3000:]
    errors = [line for line in stderr.splitlines() if not line.startswith("import time:")]
    assert errors[0] == "dino: invalid configuration:" and message in "\n".join(errors), errors
    imported = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert "service.config" in imported  # the import log is there...
    assert not {m for m in imported if m == "ray" or m.startswith("ray.")}  # ...without ray
    assert not children and not ray_tmp.exists() and not storage.exists()
    assert stdout == ""



def test_a_resized_group_still_uses_each_image_of_the_epoch_once():
    """An elastic group: 2 workers for the first 3 global batches, then 3 workers, then 4 (the
    global batch of 12 stays); the epoch is covered exactly once, in the same global batches."""
    n, global_batch, seen = 130, 12, []
    plan = [(2, 0, 3), (3, 3, 7), (4, 7, None)]  # (world, first batch, end batch)
    for world, first, end in plan:
        per_rank = [list(ShardSampler(n, r, world, 3, 0, global_batch // world, first))
                    for r in range(world)]
        steps = (end or n // global_batch) - first
        for k in range(steps):
            seen.append(sorted(i for ranks in per_rank
                               for i in ranks[k * (global_batch // world):
                                              (k + 1) * (global_batch // world)]))
    flat = [i for b in seen for i in b]
    assert len(flat) == len(set(flat)) == n // global_batch * global_batch
    one_worker = list(ShardSampler(n, 0, 1, 3, 0, global_batch))
    assert seen == [sorted(one_worker[k * global_batch:(k + 1) * global_batch])
                    for k in range(n // global_batch)]

@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_equal_and_cover(world):
    n, batch = 100, 6
    shards = [list(ShardSampler(n, r, world, seed=0, epoch=1, batch=batch)) for r in range(world)]
    flat = [i for s in shards for i in s]
    steps = n // (batch * world)
    assert len(set(flat)) == len(flat) == steps * batch * world
    assert all(len(s) == steps * batch for s in shards)
    assert list(ShardSampler(n, 0, world, 0, 1, batch, skip_batches=2)) == shards[0][2 * batch:]
    assert list(ShardSampler(n, 0, world, 0, 2, batch)) != shards[0]  # reshuffled per epoch


# ---------------------------------------------------------------- issue 27: checked before Ray


def test_a_run_name_too_long_for_a_folder_name_is_refused_naming_the_limit():
    """300 characters ended in a raw 'File name too long' traceback (the run's folder)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, None, ["run_name=" + "a" * 300])
    msg = str(e.value)
    assert "run_name:" in msg and "at most 100 characters" in msg and "300" in msg, msg
    assert load_config(None, None, ["run_name=" + "a" * 100]).run_name == "a" * 100


@pytest.mark.parametrize("name", ["a/b", "-x", "a b", "caf\u00e9"])
def test_a_run_name_of_other_characters_is_refused_naming_the_allowed_ones(name):
    with pytest.raises(ConfigError) as e:
        load_config(None, None, [f"run_name={name}"])
    msg = str(e.value)
    assert "run_name:" in msg and "letters, digits, '_', '.' and '-'" in msg, msg


def test_crops_that_are_not_a_multiple_of_the_vit_patch_are_refused_naming_both():
    """model.patch_size=7 with 32 px crops trained without a word."""
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", None, ["model.patch_size=7"])  # 32 px global crops
    msg = str(e.value)
    assert "aug.global_size=32" in msg and "model.patch_size=7" in msg, msg
    assert "local_size" not in msg  # the quickstart has no local crops (aug.n_local=0)
    with pytest.raises(ConfigError) as e:
        load_config(None, None, ["model.arch=dinov2_vits14"])  # the default 96 px local crops
    msg = str(e.value)
    assert "aug.local_size=96" in msg and "model.patch_size=14" in msg and "98" in msg, msg


def test_crop_sizes_are_free_for_resnet_and_for_unused_local_crops():
    cfg = load_config(None, None, ["model.arch=resnet50", "model.patch_size=7",
                                   "aug.global_size=100", "aug.local_size=90"])
    assert (cfg.aug.global_size, cfg.aug.local_size) == (100, 90)
    assert load_config(None, None, ["aug.local_size=90", "aug.n_local=0"]).aug.local_size == 90
    for name in preset_names():  # every preset keeps to the rule
        load_config(name)
