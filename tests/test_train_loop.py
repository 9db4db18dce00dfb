"""The real training loop, in this process, through ``InProcessContext``: no Ray.

A run stopped at the end of its first epoch and resumed from the checkpoint it wrote gives
the same per-step losses as the same run trained without a stop.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from service.config import load_config
from service.storage import checkpoints as ckpt
from service.train.context import InProcessContext
from service.train.exports import BACKBONE_FILE
from service.train.loop import Loop

TINY = [
    "model.arch=vit_tiny", "model.depth=1", "model.patch_size=8", "model.out_dim=64",
    "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "aug.global_size=16",
    "aug.local_size=8", "aug.n_local=2", "aug.backend=batched", "data.procedural_size=48",
    "data.procedural_image_size=24", "data.num_workers=0", "train.batch_size=8",
    "train.epochs=2", "train.log_every_steps=1", "optim.warmup_epochs=1",
    "tracking.enabled=false", "eval.knn_every_epochs=0",
]  # fmt: skip


class LossRecorder:
    """A ``Tracker`` that keeps what the loop logs, step by step."""

    uri = run_id = None

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[str] = []
        self.status: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(str(path))

    def flush(self) -> bool:
        return True

    def end(self, status: str = "FINISHED") -> None:
        self.status = status

    def losses(self) -> dict[int, float]:
        return {step: m["loss"] for step, m in self.metrics if "loss" in m}


def _run(root: Path, name: str, *overrides: str) -> tuple[LossRecorder, InProcessContext, Loop]:
    cfg = load_config(None, None, [*TINY, f"storage.root={root}", f"run_name={name}",
                                   *overrides])
    run_url = str(root / name)
    ctx, tracker = InProcessContext(run_url, cfg.train.keep_last), LossRecorder()
    loop = Loop(cfg, ctx, run_url, tracker)
    loop.run()
    return tracker, ctx, loop


def test_loop_runs_in_process_and_a_resumed_run_repeats_the_losses(tmp_path, one_torch_thread):
    whole, ctx, loop = _run(tmp_path, "whole")
    niter = loop.state.niter_per_ep
    assert niter == 6 and sorted(whole.losses()) == list(range(1, 2 * niter + 1))
    assert {"loss", "lr", "teacher_entropy", "images_per_sec", "step_time"} <= set(whole.metrics[0][1])
    assert loop.state.global_step == 2 * niter and loop.state.epoch == 2
    assert [m["step"] for m, _ in ctx.reports] == [niter, 2 * niter]
    assert all(url is not None for _, url in ctx.reports)  # an epoch checkpoint each
    assert (tmp_path / "whole" / BACKBONE_FILE).is_file()

    # a finished run started again (its node lost after the last checkpoint, before its
    # report reached the driver) trains nothing and reports where it ended, without a new
    # checkpoint: a sweep's record still learns the epochs
    again, ctx_again, done = _run(tmp_path, "whole")
    assert done.restored_from is not None and not again.losses()
    assert ctx_again.reports == [({"epoch": 2, "step": 2 * niter}, None)]

    first, _, stopped = _run(tmp_path, "split", f"train.max_steps={niter}")
    assert stopped.restored_from is None and stopped.state.global_step == niter
    saved = ckpt.checkpoint_dirs(str(tmp_path / "split"))
    assert len(saved) == 1 and ckpt.verify(saved[0])["global_step"] == niter

    second, _, resumed = _run(tmp_path, "split")
    assert resumed.restored_from == saved[0]
    assert sorted(second.losses()) == list(range(niter + 1, 2 * niter + 1))
    split = {**first.losses(), **second.losses()}
    assert split == whole.losses()  # bit for bit: the same floats, step by step


def test_in_process_context_keeps_the_last_checkpoints(tmp_path, one_torch_thread):
    _, ctx, loop = _run(tmp_path, "keep", "train.checkpoint_every_steps=2", "train.keep_last=2",
                        "train.epochs=1")
    assert len([u for _, u in ctx.reports if u]) == 3  # steps 2, 4 and the epoch's end (6)
    kept = ckpt.checkpoint_dirs(str(tmp_path / "keep"))
    assert [ckpt.verify(d)["global_step"] for d in kept] == [4, 6]
    assert ckpt.resolve(str(tmp_path / "keep")) == kept[-1]


def test_a_nonfinite_loss_stops_the_in_process_loop_with_the_state_untouched(
        tmp_path, one_torch_thread):
    """The drill is a config setting (``drill.nonfinite_steps``)."""
    from dino_core import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="global step 3"):
        _run(tmp_path, "nan", "train.checkpoint_every_steps=2", "drill.nonfinite_steps=[3]")
    kept = ckpt.checkpoint_dirs(str(tmp_path / "nan"))
    assert [ckpt.verify(d)["global_step"] for d in kept] == [2]


def test_no_environment_variable_puts_nans_into_a_run(tmp_path, monkeypatch, one_torch_thread):
    """The loop once read ``DINO_FAULT_NONFINITE_STEPS``: a stray variable in a user's
    environment fed NaN crops to a real run. Set now, it does nothing."""
    monkeypatch.setenv("DINO_FAULT_NONFINITE_STEPS", "1,2,3")
    _, _, loop = _run(tmp_path, "clean", "train.epochs=1")
    assert loop.state.global_step == loop.state.total_steps and loop.guard.skipped == 0


@pytest.fixture(scope="module")
def packed_images(tmp_path_factory) -> Path:
    from dino_core.data.procedural import write_image_folder
    from service.data.pack import pack

    root = tmp_path_factory.mktemp("packed")
    write_image_folder(root / "imgs", 52, 24, 3, 0, masks=False)
    pack(str(root / "imgs"), str(root / "shards"), shard_bytes=8_000, parallel=False)
    return root / "shards"


@pytest.mark.parametrize("crop_source", ["canvas", "full_image"])
def test_a_run_stopped_mid_epoch_on_packed_data_resumes_exactly(
        tmp_path, packed_images, one_torch_thread, crop_source):
    data = [f"data.path={packed_images}", "data.num_workers=2", "data.shuffle_buffer=4",
            f"aug.crop_source={crop_source}", "train.epochs=2"]
    whole, _, loop = _run(tmp_path, "whole", *data)
    niter = loop.state.niter_per_ep
    assert niter == 6 and sorted(whole.losses()) == list(range(1, 2 * niter + 1))
    first, _, stopped = _run(tmp_path, "split", *data, f"train.max_steps={niter + 3}")
    assert stopped.state.batch_in_epoch == 3  # mid-epoch
    second, _, resumed = _run(tmp_path, "split", *data)
    assert resumed.restored_from is not None
    assert {**first.losses(), **second.losses()} == whole.losses()


def test_activation_checkpointing_gives_the_same_losses(tmp_path, one_torch_thread):
    """Recomputing the student's blocks in backward (drop-path masks replayed from the saved
    RNG state) changes memory, not numerics."""
    steps = ["train.max_steps=4", "train.epochs=1", "model.depth=2"]
    plain, _, _ = _run(tmp_path, "plain", *steps)
    ckpted, _, loop = _run(tmp_path, "ckpt", *steps, "train.activation_checkpointing=true")
    assert loop.state.student.backbone.grad_checkpointing
    assert len(plain.losses()) == 4
    assert ckpted.losses() == pytest.approx(plain.losses(), rel=1e-6)


def test_packed_crops_give_the_same_losses(tmp_path, one_torch_thread):
    """train.packed_crops=sdpa: one backbone call for all crops, the same training."""
    steps = ["train.max_steps=3", "train.epochs=1", "model.drop_path_rate=0.1"]
    plain, _, _ = _run(tmp_path, "plain", *steps)
    packed, _, loop = _run(tmp_path, "packed", *steps, "train.packed_crops=sdpa")
    assert type(loop.state.student).__name__ == "PackedMultiCropWrapper"
    assert len(plain.losses()) == 3
    assert packed.losses() == pytest.approx(plain.losses(), rel=1e-5)


def test_the_fused_head_loss_gives_the_same_losses(tmp_path, one_torch_thread):
    """train.fused_head_loss: last layer + softmax + cross-entropy chunked over K."""
    steps = ["train.max_steps=3", "train.epochs=1"]
    plain, _, _ = _run(tmp_path, "plain", *steps)
    fused, _, loop = _run(tmp_path, "fused", *steps, "train.fused_head_loss=true")
    assert loop.state.step_cfg.fused_head_loss
    assert len(plain.losses()) == 3
    assert fused.losses() == pytest.approx(plain.losses(), rel=1e-5)
