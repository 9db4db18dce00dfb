"""The training loop of one rank, the same under Ray Train and in this process.

It reads like DINO v1's ``train_one_epoch`` plus the service's policies: for each batch,
augment, step, then ask the cadence whether to log or checkpoint; at the end of an epoch,
evaluate and report. Everything distributed comes from the ``RunContext``; everything
tracked goes to a ``Tracker`` (a ``NullTracker`` on ranks > 0).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dino_core import NonFiniteLossError, train_step
from dino_core.augment.full import full_image_views
from dino_core.distill import teach, train_step_distill
from dino_core.step_recipe import train_step_recipe
from service import data, storage
from service.config import DinoConfig, to_yaml
from service.errors import DataError
from service.storage import checkpoints as ckpt
from service.tracking import Tracker
from service.train import distill
from service.train.collectives import max_over_ranks, sum_over_ranks
from service.train.context import RunContext
from service.train.evaluation import evaluate
from service.train.exports import export_backbone, tracked
from service.train.init_from import apply_init_backbone, apply_init_from
from service.train.policies import Cadence, FaultInjector, NonFiniteGuard
from service.train.progress import Progress, say
from service.train.state import TrainState, seed_everything
from service.train.stopping import Notice, Preempted, StopWatch


class Loop:
    """Builds the state of one rank (restoring the run's newest checkpoint) and trains it."""

    def __init__(self, cfg: DinoConfig, ctx: RunContext, run_url: str, tracker: Tracker,
                 faults: FaultInjector | None = None) -> None:
        self.cfg, self.ctx, self.run_url, self.tracker = cfg, ctx, run_url, tracker
        seed_everything(cfg.train.seed, ctx.rank)
        # full_image: encoded images from the loader, decoded and cropped on the device
        self.full_image = data.full_image(cfg, ctx.device.type)
        self.ray_data = cfg.data.loader == "ray_data"  # batches from the trainer's dataset
        self.dataset = None if self.ray_data else data.train_dataset(cfg, raw=self.full_image)
        self.augment = data.batched_augmentation(cfg)
        n_images = data.count_images(cfg.data.path) if self.ray_data else len(self.dataset)
        niter = data.steps_per_epoch(n_images, cfg, ctx.world_size)
        self.state = s = TrainState(cfg, ctx, niter)
        self.restored_from = s.restore(run_url, ctx)
        if cfg.train.init_from and self.restored_from is None:  # resume wins over init_from
            self._say(apply_init_backbone(cfg.train.init_from, s.student, s.teacher)
                      if s.distill is not None else
                      apply_init_from(cfg.train.init_from, s.student, s.teacher, s.loss_fn))
        if s.distill is not None:  # which weights taught this run, in its log and tracker
            self._say(f"[dino] distilling from {s.distill.uri} (SHA-256 {s.distill.sha256})")
            tracker.set_tag("distill_teacher_sha256", s.distill.sha256)
        s.compile()
        self.model = ctx.wrap_model(s.student)  # only after restoring into the plain module
        s.students.wrap(ctx.wrap_model)
        self.cadence = Cadence(cfg, niter)
        self.guard = NonFiniteGuard(cfg, s.defer_check, ctx.device, self._stopped, self._say)
        self.guard.skipped = s.skipped_steps
        self.faults = faults or FaultInjector(set(cfg.drill.nonfinite_steps))
        self.progress = Progress(ctx.world_size)
        self.skipped_images = self.images_attempted = 0
        self.last_metrics: dict[str, float] = {}
        self.stops = StopWatch(ctx, run_url, cfg.run_name, cfg.train.stop_check_every_steps)
        self.stopped = False  # a stop request ended the run early (it resumes later)

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        """Trains to the end (or a stop), tracked as ``exports.tracked`` says."""
        s = self.state
        with tracked(self.cfg, self.tracker):
            if s.global_step >= s.total_steps:
                self._say(f"[dino] run already complete at step {s.global_step}")
                # its last report may have been lost with its node after the checkpoint was
                # written: a sweep's record still learns where the run ended
                self.report({"epoch": s.epoch, "step": s.global_step}, checkpoint=False)
                self.finish()
                return
            say(f"[dino] worker rank {self.ctx.rank}/{self.ctx.world_size} pid {os.getpid()} "
                f"on {self.ctx.device}")
            while not s.finished:
                self.run_epoch()
                if self.stopped:
                    self._say(f"[dino] stopped at step {s.global_step} ({self.stops.reason}); "
                              "`dino train` with the same run name resumes from there")
                    return
                self.end_epoch()
            self.finish()

    def run_epoch(self) -> None:
        s = self.state
        for batch, labels, n_skipped in self.epoch_batches():
            self.seed_step()
            if self.full_image:
                batch, kept = full_image_views(self.augment, batch, self.ctx.device,
                                               self.aug_gen, data.full_image_side(self.cfg))
                n_skipped += int((~kept).sum())
                labels = labels[kept]
            self.skipped_images += n_skipped
            self.images_attempted += labels.numel() + n_skipped
            # one all-reduce per step: an all-unreadable batch anywhere, and stop notices
            empty, notice = max_over_ranks(
                [labels.numel() == 0, self.stops.local(s.global_step)], self.ctx.world_size)
            if notice:
                self.save_and_stop(self.stops.agreed(Notice(int(notice))))
                return
            if empty:
                # every image of the batch was unreadable: no step, on every rank alike (DDP's
                # all-reduces must pair up)
                s.global_step += 1
                s.batch_in_epoch += 1
                continue
            self.step(batch)
            if s.global_step >= s.total_steps:
                break
            if self.cadence.step_checkpoint_due(s.global_step, s.batch_in_epoch):
                self.guard.check()  # never checkpoint past an unnoticed bad step
                loss = {k: v for k, v in self.last_metrics.items() if k == "loss"}
                self.report({"epoch": s.epoch, "step": s.global_step, **loss}, checkpoint=True)
        self.guard.check()

    def save_and_stop(self, notice: Notice) -> None:
        """Commits a checkpoint of the current step, on every rank together, then ends
        the run (a stop request), holds until Ray replaces the group (a drain, a resize) or
        leaves (SIGTERM to a worker; Ray restarts the group)."""
        s, grace = self.state, self.cfg.train.preemption_grace_s
        started = time.time()
        self.guard.check()
        self.report({"epoch": s.epoch, "step": s.global_step}, checkpoint=True, background=False)
        took = time.time() - started
        self._say(f"[dino] {self.stops.reason}: checkpoint of step {s.global_step} committed "
                  f"in {took:.1f} s (train.preemption_grace_s={grace:g})")
        self.stops.saved()
        if notice == Notice.STOP:
            self.stopped = True
        elif notice == Notice.LEAVE:
            raise Preempted(f"{self.stops.reason}: left after the checkpoint of step "
                            f"{s.global_step}")
        else:
            self.stops.hold(grace + (self.stops.deadline_s or 0))

    def epoch_batches(self) -> Iterator[tuple[Any, torch.Tensor, int]]:
        """This rank's batches of the current epoch from where the state is. The loader's
        seeds depend on (seed, rank, epoch, batch) and each step's on (seed, rank, step), so a
        run resumed at an epoch boundary sees exactly the crops, drop-path masks and
        augmentations of an uninterrupted one, and with a packed dataset (whose reader
        resumes exactly) or the batched augmentation, a run resumed mid-epoch does too."""
        s, rank = self.state, self.ctx.rank
        self.progress.new_window()
        if self.ray_data:  # Ray Data's order is its own: a resumed epoch takes what is left
            yield from data.train_batches(self.ctx.dataset_shard("train"),
                                          self.cfg.train.batch_size // self.ctx.world_size,
                                          s.niter_per_ep - s.batch_in_epoch)
            return
        if s.batch_in_epoch == 0:
            s.data_streams = data.loader_streams(self.cfg)
        loader = data.train_loader(self.dataset, self.cfg, rank, self.ctx.world_size, s.epoch,
                                   s.batch_in_epoch, self.ctx.device.type == "cuda",
                                   s.data_streams)
        yield from loader

    def seed_step(self) -> None:
        """The step's own seeds: torch's (drop-path, ...), the batched augmentation's and the
        iBOT masks' (so a resumed run draws the masks it would have drawn)."""
        t, rank, step = self.cfg.train, self.ctx.rank, self.state.global_step
        seed_everything(t.seed, rank, step, 1)
        self.aug_gen = torch.Generator().manual_seed(int(np.random.default_rng(
            (t.seed, rank, step, 7)).integers(2**62)))
        if self.state.mask_sampler is not None:
            self.state.mask_sampler.generator.manual_seed(int(np.random.default_rng(
                (t.seed, rank, step, 11)).integers(2**62)))

    def step(self, batch: Any) -> None:
        s, device = self.state, self.ctx.device
        started = time.time()
        if self.full_image:
            crops = batch  # augmented already, on the device
        elif self.augment is not None:
            crops = self.augment(batch.to(device, non_blocking=True), self.aug_gen)
        else:
            crops = [c.to(device, non_blocking=True) for c in batch]
        crops = self.faults.crops(crops, s.global_step)
        values = s.sched.at(s.global_step)
        out = None
        try:
            # distillation's teacher is frozen (s.teacher is then the student's EMA copy)
            teacher = s.distill.teacher if s.distill is not None else s.teacher
            common = dict(student=self.model, teacher=teacher, optimizer=s.optimizer,
                          crops=crops, values=values, step=s.global_step,
                          freeze_last_layer=s.epoch < self.cfg.optim.freeze_last_layer,
                          ema_params=s.ema_params, cfg=s.step_cfg, scaler=s.scaler,
                          clip_module=s.student)
            if s.distill is not None:  # one teacher forward feeds every student
                t = teach(teacher, crops, s.step_cfg.n_global)
                out = train_step_distill(objective=s.distill.objective, targets=t, **common)
                out.stats |= s.students.step(t, common)
            elif s.recipe_loss is None:  # DINO v1
                out = train_step(loss_fn=s.loss_fn, **common)
            else:  # the DINOv2/DINOv3 recipe: masks of the global crops drawn on the host
                out = train_step_recipe(losses=s.recipe_loss, masks=s.masks(len(crops[0])),
                                        gram=s.gram, **common)
            self.guard.record(out, s.global_step)
        except NonFiniteLossError as err:
            self.guard.failed(err)
        s.global_step += 1
        s.batch_in_epoch += 1
        self.progress.step_done(len(crops[0]))
        log_due = self.cadence.log_due(s.global_step)
        if log_due or s.global_step >= s.total_steps:
            self.guard.check()
        if out is not None and log_due and (not s.defer_check or bool(out.finite)):
            self.log({"loss": out.loss, **values, **{k: float(v) for k, v in out.stats.items()},
                      "images_per_sec": self.progress.images_per_sec(),
                      "step_time": time.time() - started, "epoch": s.epoch,
                      "skipped_images": self.skipped_images, "nonfinite_steps": self.guard.skipped,
                      "world_size": self.ctx.world_size})
            self.progress.new_window()

    def check_unreadable(self) -> None:
        """Stops the run when more than ``data.max_unreadable_fraction`` of the images it
        tried so far were unreadable (the same decision on every rank: global counts)."""
        world, device = self.ctx.world_size, self.ctx.device
        skipped = sum_over_ranks(self.skipped_images, world, device)
        attempted = sum_over_ranks(self.images_attempted, world, device)
        limit = self.cfg.data.max_unreadable_fraction
        if attempted and skipped / attempted > limit:
            raise DataError(
                f"data.path={self.cfg.data.path}: {int(skipped)} of {int(attempted)} images "
                f"could not be read, more than data.max_unreadable_fraction={limit:g} "
                "(the paths are in the log)")

    def end_epoch(self) -> None:
        s = self.state
        self.check_unreadable()
        epoch_done = s.batch_in_epoch >= s.niter_per_ep
        if epoch_done:
            s.epoch += 1
            s.batch_in_epoch = 0
        metrics: dict[str, Any] = {"epoch": s.epoch, "step": s.global_step}
        # the teacher's entropy: DINO's, or DINO distillation's (feature distillation has none)
        metrics |= {k: v for k, v in self.last_metrics.items() if k in ("loss", "teacher_entropy")}
        if self.cadence.knn_due(s.epoch, epoch_done, s.finished):
            knn = evaluate(self.cfg, self.ctx, s.teacher.backbone, s.amp_dtype, self.tracker,
                           s.global_step)
            self._say(f"[dino] epoch {s.epoch_label} k-NN top-1 {knn['knn_top1']:.1f}% "
                      f"(k={self.cfg.eval.knn_k})")
            metrics.update(knn)
        save = self.cadence.epoch_checkpoint_due(s.epoch, epoch_done, s.finished)
        self.report(metrics, checkpoint=save)

    # ---- reporting ---------------------------------------------------------------------
    def report(self, metrics: dict[str, Any], checkpoint: bool,
               background: bool | None = None) -> None:
        """Every rank reports; rank 0 writes the checkpoint to local disk and hands it
        over: uploaded in the background (``train.checkpoint_upload``, one upload in flight,
        the next report waits for it) or before this returns (``background=False``: a
        checkpoint that must be committed before the workers go)."""
        s = self.state
        s.skipped_steps = self.guard.skipped  # the guard counts; the state saves the count
        if background is None:  # a local root is a copy on this disk: nothing to wait for
            background = (self.cfg.train.checkpoint_upload == "background"
                          and not storage.is_local(self.run_url))
        if checkpoint and self.ctx.rank == 0:
            started = time.time()
            d = tempfile.mkdtemp(prefix="dino-ckpt-")  # the context removes it once uploaded
            ckpt.write_checkpoint(d, s.state_dict(), to_yaml(self.cfg))
            self.ctx.report(metrics, d, background)
            self.tracker.log_metrics({"checkpoint_stall_s": time.time() - started},
                                     s.global_step)
            where = " on local disk, uploading in the background" if background else ""
            self._say(f"[dino] checkpoint saved at epoch {s.epoch_label} step {s.global_step}"
                      f"{where}")
        else:
            self.ctx.report(metrics, None)

    def log(self, m: dict[str, float]) -> None:
        self.last_metrics = m
        if self.ctx.rank != 0:
            return
        s = self.state
        self.tracker.log_metrics(m, s.global_step)
        say(self.progress.line(m, f"{s.epoch_label}/{self.cfg.train.epochs}", s.global_step,
                                s.total_steps))

    def _say(self, message: str) -> None:
        if self.ctx.rank == 0:
            say(message)

    def _stopped(self, skipped: int) -> None:
        self.tracker.log_metrics({"nonfinite_steps": skipped}, self.state.global_step)
        self.tracker.end("FAILED")

    def finish(self) -> None:
        """Rank 0 exports the teacher backbone next to the checkpoints and to the tracker."""
        # failed loads of every rank, not only rank 0's
        self.skipped_images = int(sum_over_ranks(self.skipped_images, self.ctx.world_size,
                                                 self.ctx.device))
        if self.state.distill is not None:  # every rank re-hashes its own frozen teacher
            self._say(distill.unmoved(self.state.distill, self.state.global_step))
        if self.ctx.rank != 0:
            return
        for folder, cfg, teacher in (("", self.cfg, self.state.teacher),
                                     *self.state.students.exports()):  # train.distill.students
            export_backbone(teacher, cfg, self.run_url, self.tracker, folder)
        self.tracker.flush()
        if self.skipped_images:
            say(f"[dino] skipped {self.skipped_images} unreadable images "
                "(failed loads over all epochs and workers; the paths are in the log)")
