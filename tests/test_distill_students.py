"""Several students at once (issue 24, ``train.distill.students``), in process, no Ray: one
frozen-teacher forward a step feeds the run's student and two tiny extra ones; each extra
student has its own optimizer, EMA copy, checkpoint section, exported backbone and metrics;
the run's own student trains exactly as it would alone; a run stopped mid-epoch and resumed
repeats every student's losses; bad settings fail when the config is read, naming them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_distill_runs import FAST, _teacher_file
from test_train_loop import TINY, LossRecorder, _run

from dino_core.interop.export import load_backbone
from service.config import load_config
from service.errors import CheckpointError, ConfigError
from service.evaluate import load_backbone as load_any_backbone
from service.storage import checkpoints as ckpt
from service.train import distill
from service.train.context import InProcessContext
from service.train.loop import Loop
from service.train.preflight import preflight

# beside TINY's ViT-Tiny/8 with one block: a patch-4 one and a two-block one
STUDENTS = ["train.distill.students.p4.patch_size=4", "train.distill.students.d2.depth=2"]
NAMES = ("p4", "d2")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return _teacher_file(tmp_path_factory.mktemp("students-teacher") / "teacher.safetensors")


@pytest.fixture(scope="module")
def dino_teacher(tmp_path_factory) -> Path:
    """A DINO run's folder after one step of TINY: a backbone and a 64-prototype head."""
    root = tmp_path_factory.mktemp("students-dino-teacher")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(root, "teacher", "train.max_steps=1")
    finally:
        torch.set_num_threads(threads)
    return root / "teacher"


def _counted(root: Path, name: str, teacher: Path, *more: str) -> tuple[LossRecorder, Loop, int]:
    """A distillation run, counting the frozen teacher's forward calls."""
    cfg = load_config(None, None, [*TINY, f"storage.root={root}", f"run_name={name}", *FAST,
                                   f"train.distill.teacher={teacher}", *more])
    run_url = str(root / name)
    tracker = LossRecorder()
    loop = Loop(cfg, InProcessContext(run_url, cfg.train.keep_last), run_url, tracker)
    calls = []
    loop.state.distill.teacher.register_forward_hook(lambda *args: calls.append(1))
    loop.run()
    return tracker, loop, len(calls)


def _losses(tracker: LossRecorder, prefix: str = "") -> dict[int, float]:
    return {step: m[f"{prefix}loss"] for step, m in tracker.metrics if f"{prefix}loss" in m}


@pytest.mark.budget(20)  # 1.5 s measured (two runs of 12 steps), ~5x that at load average 9
def test_one_teacher_forward_feeds_every_student_each_with_its_own_state(
        tmp_path, teacher, one_torch_thread):
    tracker, loop, calls = _counted(tmp_path, "multi", teacher, *STUDENTS)
    s = loop.state
    assert s.global_step == 12 and calls == 12  # not 12 x 3
    # the run's own student trains as it would alone: the extra ones touch nothing of it
    alone, _, alone_calls = _counted(tmp_path, "alone", teacher)
    assert alone_calls == 12 and _losses(alone) == _losses(tracker)

    extras = {x.name: x for x in s.students.extras}
    assert tuple(extras) == NAMES
    main_params = {id(p) for p in s.student.parameters()}
    seen = set(main_params)
    for name, x in extras.items():
        # its own optimizer, over its own parameters and nothing else
        in_optimizer = {id(p) for g in x.optimizer.param_groups for p in g["params"]}
        assert in_optimizer == {id(p) for p in x.student.parameters()}, name
        assert not in_optimizer & seen, name
        seen |= in_optimizer
        assert x.optimizer is not s.optimizer
        # it learns, and its metrics are under its name
        losses = _losses(tracker, f"{name}/")
        assert sorted(losses) == list(range(1, 13)), name
        assert sum(list(losses.values())[-3:]) / 3 < 0.7 * losses[1], (name, losses)
        assert {f"{name}/loss_feat_cls", f"{name}/loss_feat_patch"} <= set(tracker.metrics[0][1])
        # its EMA copy is exported next to the run's backbone, as its own model
        exported = load_backbone(tmp_path / "multi" / "students" / name
                                 / "teacher_backbone.safetensors")
        for k, v in exported.state_dict().items():
            assert torch.equal(v, x.ema.backbone.state_dict()[k].cpu()), (name, k)
    assert exported.patch_embed.patch_size == (8, 8) and len(exported.blocks) == 2
    p4 = load_backbone(tmp_path / "multi" / "students" / "p4" / "teacher_backbone.safetensors")
    assert p4.patch_embed.patch_size == (4, 4) and len(p4.blocks) == 1
    model, cfg = load_any_backbone(str(tmp_path / "multi" / "students" / "p4"
                                       / "teacher_backbone.safetensors"))  # as `dino eval` reads it
    assert model.patch_embed.patch_size == (4, 4) and cfg.model.patch_size == 4
    assert cfg.train.distill.students == {}
    assert load_backbone(tmp_path / "multi" / "teacher_backbone.safetensors").patch_embed \
        .patch_size == (8, 8)

    # the checkpoint: a section of its own for each student; none in a run without them
    _, state = ckpt.load(str(tmp_path / "multi"))
    assert set(state["students"]) == set(NAMES)
    for name, x in extras.items():
        saved = state["students"][name]
        assert set(saved["student"]) == set(x.student.state_dict())
        assert set(saved["teacher"]) == set(saved["student"])  # its EMA copy
        assert saved["optimizer"]["state"]  # its AdamW moments
    assert "students" not in ckpt.load(str(tmp_path / "alone"))[1]


@pytest.mark.budget(20)  # 3.1 s measured (a DINO step, three runs), ~5x that at load average 9
def test_a_run_of_several_students_stopped_mid_epoch_resumes_with_the_same_losses(
        tmp_path, dino_teacher, one_torch_thread):
    """Stopped at step 9 of 12, in its second epoch; DINO and feature distillation (each
    student's DINO center and MLP projectors are in the checkpoint)."""
    teacher = dino_teacher
    more = [*STUDENTS, "train.distill.projector_hidden_dim=16", "train.distill.objective=both"]
    whole, _, _ = _counted(tmp_path, "whole", teacher, *more)
    first, stopped, _ = _counted(tmp_path, "split", teacher, *more, "train.max_steps=9")
    assert stopped.state.global_step == 9 and stopped.state.batch_in_epoch == 3
    second, resumed, calls = _counted(tmp_path, "split", teacher, *more)
    assert resumed.restored_from is not None and calls == 3
    for prefix in ("", *(f"{n}/" for n in NAMES)):
        assert sorted(_losses(second, prefix)) == [10, 11, 12]
        assert {**_losses(first, prefix), **_losses(second, prefix)} == _losses(whole, prefix)
    assert {"d2/loss_dino", "p4/loss_feat_patch", "p4/teacher_entropy"} <= set(
        whole.metrics[0][1])
    for x, y in zip(resumed.state.students.extras, stopped.state.students.extras, strict=True):
        assert not torch.equal(next(x.ema.parameters()), next(y.ema.parameters()))  # trained on
        assert not torch.equal(x.objective.dino.center, y.objective.dino.center)

    # other students than the checkpoint's: refused before Ray, and by the loop itself
    both = [f"train.distill.teacher={teacher}", "train.distill.objective=both",
            "train.distill.projector_hidden_dim=16"]
    cfg = load_config(None, None, [*TINY, f"storage.root={tmp_path}", "run_name=split", *both,
                                   STUDENTS[0], "train.distill.students.d2.depth=3"])
    with pytest.raises(ConfigError, match="train.distill.students.d2.depth: 2 there, 3 here"):
        preflight(cfg, str(tmp_path / "split"))
    with pytest.raises(ConfigError, match=r"train.distill.students: \['d2', 'p4'\] there, "
                                          r"\['p4'\] here"):
        preflight(load_config(None, None, [*TINY, f"storage.root={tmp_path}", "run_name=split",
                                           *both, STUDENTS[0]]), str(tmp_path / "split"))
    with pytest.raises(CheckpointError, match=r"holds the students \['d2', 'p4'\]"):
        _run(tmp_path, "split", *FAST, *both, STUDENTS[0])
    # a student's head of another K than the teacher's, before Ray
    with pytest.raises(ConfigError, match="64 prototypes, train.distill.students.d2.out_dim=32; "
                                          "set train.distill.students.d2.out_dim=64"):
        distill.check(load_config(None, None, [*TINY, *both, "train.distill.students.d2.out_dim=32"]))


def test_bad_student_settings_fail_when_the_config_is_read(tmp_path):
    """One line each, naming train.distill.students; empty (the default) is no student."""
    assert load_config(None, None, TINY).train.distill.students == {}
    assert load_config(None, None, TINY).student_configs() == {}
    teacher = ["train.distill.teacher=t.safetensors"]
    good = load_config(None, None, [*TINY, *teacher, STUDENTS[1], "model.patch_size=14",
                                    "train.distill.students.g.arch=dinov2_vits14",
                                    "aug.global_size=28", "aug.local_size=14"])
    models = {n: c.model for n, c in good.student_configs().items()}
    assert models["g"].arch == "dinov2_vits14" and models["g"].patch_size == 14
    assert models["d2"].depth == 2 and models["d2"].arch == "vit_tiny"  # model.*'s, overridden
    assert good.student_configs()["g"].train.distill.students == {}  # what its export records
    for overrides, says in (
        (["train.distill.students.s.arch=vit_huge"],
         "train.distill.students.s.arch: Input should be 'vit_tiny'"),
        (["train.distill.students.a/b.arch=vit_tiny"], "'a/b' is not a folder name"),
        (["train.distill.students={.hidden: {depth: 2}}"], "'.hidden' is not a folder name"),
        (["train.distill.students.Tiny.depth=2", "train.distill.students.tiny.depth=3"],
         "'Tiny' and 'tiny' name one folder"),
        (["train.distill.students.s.dpeth=2"], "s.dpeth: not a model.* setting"),
        (["train.distill.students.s.depth=0"], "train.distill.students.s.depth: Input should "
                                               "be greater than or equal to 1"),
        (["train.distill.students.s.patch_size=16"],
         "train.distill.students.s: aug.local_size=8 is not a multiple of model.patch_size=16"),
        (["train.distill.students.s.arch=resnet50", "optim.layer_decay=0.9"],
         r"needs a ViT \(train.distill.students.s.arch=resnet50"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(None, None, [*TINY, *teacher, *overrides])
        lines = str(err.value).splitlines()
        assert len(lines) == 2 and "train.distill.students" in lines[1], lines  # one problem
        assert re.search(says, lines[1]), lines
    with pytest.raises(ConfigError, match=r"train.distill.students=\['s'\] needs a teacher"):
        load_config(None, None, [*TINY, "train.distill.students.s.depth=2"])
