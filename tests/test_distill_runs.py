"""Distillation through the service (issue 24), in process (``InProcessContext``), no Ray: a
tiny teacher (a random ViT saved as our exported file, or a tiny DINO run's folder with its
head) teaches a student of another patch size through the real loop; the teacher's weights
never move and are not in the checkpoints (their URI and SHA-256 are); a run stopped
mid-epoch and resumed repeats an uninterrupted run's losses; a teacher whose weights changed
stops the resume, naming both hashes; a missing teacher stops `dino train` before Ray;
teachers of every kind read with their heads; two gloo ranks (DDP, no Ray) distil as one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_train_loop import TINY, _run

from dino_core.distill import FrozenTeacher, parameter_sha256
from dino_core.interop.export import load_backbone, save_backbone
from dino_core.interop.reference import read_reference
from dino_core.models import build_backbone
from service.cli.main import main
from service.config import load_config, resolve_paths
from service.errors import CheckpointError, ConfigError
from service.evaluate import load_backbone as load_any_backbone
from service.evaluate.reference_export import export_reference
from service.models.teacher import read_teacher
from service.storage import checkpoints as ckpt
from service.train import driver
from service.train.preflight import preflight

# the student: TINY's ViT-Tiny/8, one block, on 16 px global crops (a 2 x 2 grid)
FAST = ["optim.lr=0.05"]  # x 8 / 256: a 1.6e-3 peak, for a loss that falls within 12 steps


def _teacher_file(path: Path, seed: int = 5) -> Path:
    """A random one-block ViT-Tiny/4 (a 4 x 4 grid at 16 px) as ``dino export`` writes it."""
    torch.manual_seed(seed)
    net = build_backbone("vit_tiny", 4, 16, depth=1)
    return save_backbone(path, net.state_dict(),
                         {"arch": "vit_tiny", "patch_size": 4, "depth": 1, "img_size": 16})


def _file_sha(path: Path) -> str:
    return parameter_sha256(FrozenTeacher(load_backbone(path)))


def _distill(root: Path, name: str, teacher: Path | str, *more: str):
    return _run(root, name, *FAST, f"train.distill.teacher={teacher}", *more)


def test_a_student_learns_from_a_teacher_file_that_never_moves(tmp_path, capfd,
                                                                one_torch_thread):
    teacher = _teacher_file(tmp_path / "teacher.safetensors")
    before = _file_sha(teacher)
    tracker, _, loop = _distill(tmp_path, "d", teacher, "eval.knn_every_epochs=2",
                                "eval.image_size=16", "eval.procedural_train_size=48",
                                "eval.procedural_val_size=24")
    s = loop.state
    losses = tracker.losses()
    assert any("knn_top1" in m for _, m in tracker.metrics)  # k-NN of the EMA copy
    out = capfd.readouterr().out
    assert f"[dino] distilling from {teacher} (SHA-256 {before})" in out
    assert f"[dino] the teacher's weights are unchanged after 12 steps (SHA-256 {before})" in out
    assert sorted(losses) == list(range(1, 13))
    assert sum(list(losses.values())[-3:]) / 3 < 0.5 * losses[1], losses  # it learns
    assert {"loss_feat_cls", "loss_feat_patch"} <= set(tracker.metrics[0][1])
    # the teacher: never in the optimizer, unchanged in memory and on disk
    in_optimizer = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in s.distill.teacher.parameters()}
    assert s.distill.teacher.sha256() == before == _file_sha(teacher) == s.distill.sha256

    # the checkpoint: the student and its EMA copy, the teacher's URI and hash, not its weights
    _, state = ckpt.load(str(tmp_path / "d"))
    assert state["distill"]["teacher_sha256"] == before
    assert state["distill"]["teacher_uri"] == str(teacher)
    assert set(state["teacher"]) == set(state["student"])  # the EMA copy of the student
    assert any(k.startswith("cls_proj.") for k in state["student"])
    teacher_shapes = {tuple(v.shape) for v in load_backbone(teacher).state_dict().values()}
    assert ("backbone.patch_embed.proj.weight" in state["student"]
            and tuple(state["student"]["backbone.patch_embed.proj.weight"].shape)
            not in teacher_shapes)  # the student's patch 8, not the teacher's 4

    # what a DINO run gives, unchanged: the exported backbone is the EMA copy's, the
    # evaluations read it from the run folder, the reference export writes it alone
    exported = load_backbone(tmp_path / "d" / "teacher_backbone.safetensors")
    assert exported.patch_embed.patch_size == (8, 8)
    for k, v in exported.state_dict().items():
        assert torch.equal(v, s.teacher.backbone.state_dict()[k].cpu()), k
    model, cfg = load_any_backbone(str(tmp_path / "d"))
    assert cfg.train.distill.teacher == str(teacher) and model.patch_embed.patch_size == (8, 8)
    out = export_reference(str(tmp_path / "d"), str(tmp_path / "ref.pth"))  # backbone alone
    assert read_reference(out).kind == "backbone"


@pytest.mark.budget(15)  # 2.0-5.4 s measured at load average 4-6: a ResNet-50
def test_a_resnet_student_learns_from_a_vit_teacher(tmp_path, one_torch_thread):
    """Any ``model.arch`` is a student: a ResNet-50's 1 x 1 map at 16 px against the
    teacher's 4 x 4 grid; what it exports is a ResNet-50."""
    teacher = _teacher_file(tmp_path / "teacher.safetensors")
    tracker, _, loop = _distill(tmp_path, "r", teacher, "model.arch=resnet50",
                                "model.use_bn_in_head=true", "train.max_steps=2")
    assert sorted(tracker.losses()) == [1, 2] and loop.state.distill.sha256 == _file_sha(teacher)
    exported = load_backbone(tmp_path / "r" / "teacher_backbone.safetensors")
    assert type(exported).__name__ == "ResNet"


@pytest.fixture(scope="module")
def dino_teacher(tmp_path_factory) -> Path:
    """A tiny DINO run's folder (one epoch of TINY: ViT-Tiny/8 with a 64-prototype head)."""
    root = tmp_path_factory.mktemp("dino-teacher")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(root, "teacher", "train.epochs=1")
    finally:
        torch.set_num_threads(threads)
    return root / "teacher"


def test_a_run_stopped_mid_epoch_resumes_with_the_same_losses(tmp_path, dino_teacher,
                                                              one_torch_thread):
    """DINO and feature distillation together (the DINO center is in the checkpoint); a
    patch-4 student of the patch-8 teacher; stopped at step 9 of 12, in its second epoch."""
    both = ["train.distill.objective=both", "model.patch_size=4",
            "train.distill.projector_hidden_dim=32"]
    whole, _, loop = _distill(tmp_path, "whole", dino_teacher, *both)
    assert {"loss_dino", "loss_feat_cls", "loss_feat_patch", "teacher_entropy"} <= set(
        whole.metrics[0][1])
    assert loop.state.distill.teacher.head is not None
    # the DINO run's teacher (backbone and head) as read again from its folder: unmoved
    assert loop.state.distill.sha256 == FrozenTeacher(*read_teacher(str(dino_teacher),
                                                                    True)).sha256()
    first, _, stopped = _distill(tmp_path, "split", dino_teacher, *both, "train.max_steps=9")
    assert stopped.state.global_step == 9 and stopped.state.batch_in_epoch == 3
    second, _, resumed = _distill(tmp_path, "split", dino_teacher, *both)
    assert resumed.restored_from is not None and resumed.state.global_step == 12
    assert sorted(second.losses()) == [10, 11, 12]
    assert {**first.losses(), **second.losses()} == whole.losses()  # bit for bit


def test_resuming_with_a_changed_teacher_fails_naming_both_hashes(tmp_path, one_torch_thread):
    """In the loop (the resumed state) and in the checks before Ray (the manifest)."""
    teacher = _teacher_file(tmp_path / "teacher.safetensors", seed=5)
    old = _file_sha(teacher)
    _distill(tmp_path, "r", teacher, "train.max_steps=3")
    _teacher_file(teacher, seed=6)  # the same file, other weights
    new = _file_sha(teacher)
    assert new != old
    with pytest.raises(CheckpointError) as err:
        _distill(tmp_path, "r", teacher)
    msg = str(err.value)
    assert f"train.distill.teacher={teacher}" in msg and old in msg and new in msg, msg
    # and before Ray, from the checkpoint's manifest (a worker group would fail each restart)
    cfg = load_config(None, None, [*TINY, f"storage.root={tmp_path}", "run_name=r",
                                   f"train.distill.teacher={teacher}"])
    with pytest.raises(CheckpointError) as err:
        preflight(cfg, str(tmp_path / "r"))
    assert old in str(err.value) and new in str(err.value), err.value
    # settings that change the student's modules are refused before Ray, naming them
    for more, named in (([f"train.distill.teacher={teacher}",
                          "train.distill.projector_hidden_dim=32"],
                         "train.distill.projector_hidden_dim: 0 there, 32 here"),
                        ([f"train.distill.teacher={teacher}", "train.distill.cls_weight=0"],
                         "train.distill.cls_weight"), ([], "train.distill.teacher: set there")):
        cfg = load_config(None, None, [*TINY, f"storage.root={tmp_path}", "run_name=r", *more])
        with pytest.raises(ConfigError, match=named):
            preflight(cfg, str(tmp_path / "r"))


def test_the_teacher_settings_are_checked_before_training(tmp_path, monkeypatch, capsys):
    """`dino train` stops with one line naming train.distill.teacher, Ray never started: a
    missing file, a distillation preset without a teacher, a DINO objective with a teacher
    file that holds no head; the schema names the settings distillation does not use."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "init_ray", refuse)

    def dino(*args: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        rc = main(["train", *args, f"storage.root={tmp_path / 'runs'}"])
        return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]

    missing = tmp_path / "nope.safetensors"
    rc, err = dino("--preset", "distill_quickstart", f"train.distill.teacher={missing}")
    assert rc == 1 and len(err) == 1, err
    assert "CheckpointError: train.distill.teacher: no file" in err[0] and str(missing) in err[0]
    rc, err = dino("--preset", "distill_vits_from_vitb", "data.path=procedural")
    assert rc == 2 and len(err) == 1 and "set train.distill.teacher=" in err[0], err
    teacher = _teacher_file(tmp_path / "teacher.safetensors")
    rc, err = dino("--preset", "distill_quickstart", f"train.distill.teacher={teacher}",
                   "train.distill.objective=dino")
    assert rc == 2 and len(err) == 1 and "DINO head" in err[0] and "run folder" in err[0], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("state.pt"))

    quick = resolve_paths(load_config("distill_quickstart"))  # Ray workers run elsewhere
    assert quick.train.distill.teacher == str(
        Path("runs/quickstart/teacher_backbone.safetensors").resolve())
    with pytest.raises(ConfigError, match="loss.ibot_weight=1.0 with train.distill.teacher"):
        load_config(None, None, [*TINY, f"train.distill.teacher={teacher}",
                                 "loss.ibot_weight=1.0"])
    with pytest.raises(ConfigError, match="train.distill.cls_weight=0"):
        load_config(None, None, ["train.distill.cls_weight=0", "train.distill.patch_weight=0"])


def test_teachers_of_every_kind_read_with_their_heads(tmp_path, dino_teacher, one_torch_thread):
    """A run folder and main_dino's checkpoint.pth give the backbone and the DINO head (of
    the checkpoint's K, the same weights); an exported or released backbone file gives the
    backbone, and asked for a head, an error naming the setting and what to give."""
    folder_backbone, folder_head = read_teacher(str(dino_teacher), with_head=True)
    assert folder_head is not None and folder_head.last_layer.weight.shape[0] == 64
    ref = export_reference(str(dino_teacher), str(tmp_path / "checkpoint.pth"))
    ref_backbone, ref_head = read_teacher(ref, with_head=True)
    assert parameter_sha256(ref_head) == parameter_sha256(folder_head)
    ours, theirs = folder_backbone.state_dict(), ref_backbone.state_dict()
    assert set(ours) == set(theirs)  # the position table: resampled to 224 px by the export
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k != "pos_embed")
    exported = str(dino_teacher / "teacher_backbone.safetensors")
    assert read_teacher(exported)[1] is None
    released = export_reference(exported, str(tmp_path / "backbone.pth"))
    for path in (exported, released):
        with pytest.raises(ConfigError, match="train.distill.teacher=.*needs the teacher's DINO head"):
            read_teacher(path, with_head=True)


def _ddp_worker(rank: int, world: int, init_file: str, overrides: list[str],
                crops: list[torch.Tensor], out_dir: str) -> None:
    """Two steps of the service's distillation pieces (``service.train.distill.build``) on
    this rank's slice of a fixed global batch, the student wrapped in DDP as
    ``ray.train.torch.prepare_model`` wraps it (a parameter without a gradient would fail
    DDP's second step)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dino_core.builder import ema_parameter_lists
    from dino_core.distill import train_step_distill
    from dino_core.losses.dino import identity
    from dino_core.optim import build_optimizer
    from dino_core.step import StepConfig
    from service.train import distill
    from service.train.collectives import all_reduce_mean

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = load_config(None, None, overrides)
        student, ema, d = distill.build(cfg, torch.device("cpu"), world)
        per = crops[0].shape[0] // world
        model = DistributedDataParallel(student) if world > 1 else student
        optimizer, losses = build_optimizer(student), []
        step_cfg = StepConfig(all_reduce_mean=all_reduce_mean if world > 1 else identity)
        for step in range(2):
            out = train_step_distill(
                student=model, teacher=d.teacher, objective=d.objective, optimizer=optimizer,
                crops=[c[rank * per:(rank + 1) * per] for c in crops], values={
                    "lr": 1e-3, "weight_decay": 0.04, "momentum": 0.9, "teacher_temp": 0.04},
                step=step, cfg=step_cfg, ema_params=ema_parameter_lists(ema, student),
                clip_module=student)
            losses.append(out.loss)
            if step == 0:
                center = d.objective.dino.center.clone()
        torch.save({"losses": losses, "center": center, "student": student.state_dict()},
                   os.path.join(out_dir, f"w{world}-r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.budget(45)  # 5.6 s measured, 26 s at load average ~6 (two spawned processes import torch)
def test_two_ranks_distil_as_one_rank_over_the_whole_batch(tmp_path, dino_teacher):
    """DDP over 2 gloo ranks: every rank holds the same student after two steps, the
    first step's loss and DINO center equal one rank's over the whole batch."""
    import torch.multiprocessing as mp

    overrides = [*TINY, "model.drop_path_rate=0", "model.patch_size=4",
                 f"train.distill.teacher={dino_teacher}", "train.distill.objective=both"]
    g = torch.Generator().manual_seed(1)
    crops = ([torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
             + [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)])
    threads = torch.get_num_threads()
    try:  # one rank here (a spawned process costs seconds of imports)
        _ddp_worker(0, 1, str(tmp_path / "init1"), overrides, crops, str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init2"), overrides, crops, str(tmp_path)),
             nprocs=2)
    one = torch.load(tmp_path / "w1-r0.pt")
    two = [torch.load(tmp_path / f"w2-r{r}.pt") for r in range(2)]
    for k, v in two[0]["student"].items():
        assert torch.equal(v, two[1]["student"][k]), k
    for r in two:
        assert r["losses"][0] == pytest.approx(one["losses"][0], abs=1e-5)
        assert torch.allclose(r["center"], one["center"], atol=1e-6)


@pytest.mark.budget(15)
def test_init_from_starts_the_students_backbone_and_its_ema_copy(tmp_path, one_torch_thread):
    """``train.init_from`` with distillation: the student's backbone and its EMA copy start
    from the file (a backbone of the student's shape, as a small DINO run exports it); the
    projectors start fresh and no center is read. A resumed run keeps its own weights."""
    teacher = _teacher_file(tmp_path / "teacher.safetensors")
    torch.manual_seed(11)
    start = build_backbone("vit_tiny", 8, 16, depth=1)
    init = save_backbone(tmp_path / "small.safetensors", start.state_dict(),
                         {"arch": "vit_tiny", "patch_size": 8, "depth": 1, "img_size": 16})
    from service.tracking import NullTracker
    from service.train.context import InProcessContext
    from service.train.loop import Loop

    cfg = load_config(None, None, [*TINY, *FAST, f"train.distill.teacher={teacher}",
                                   f"train.init_from={init}", "train.max_steps=2",
                                   f"storage.root={tmp_path}", "run_name=warm",
                                   "tracking.enabled=false"])
    loop = Loop(cfg, InProcessContext(str(tmp_path / "warm")), str(tmp_path / "warm"),
                NullTracker())
    s = loop.state
    for net in (s.student, s.teacher):
        got = net.backbone.state_dict()
        assert all(torch.equal(got[k], v) for k, v in start.state_dict().items())
    loop.run()
    moved = s.student.backbone.state_dict()
    assert not all(torch.equal(moved[k], v) for k, v in start.state_dict().items())
    again = Loop(cfg, InProcessContext(str(tmp_path / "warm")), str(tmp_path / "warm"),
                 NullTracker())  # its own checkpoint wins over init_from
    assert again.restored_from is not None
    assert all(torch.equal(again.state.student.backbone.state_dict()[k], v)
               for k, v in moved.items())
