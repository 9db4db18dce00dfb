"""The per-worker training function that Ray Train runs on every worker.

It builds the plain dino_core modules, restores state if there is any, wraps the student for
data parallelism, and loops over epochs calling ``dino_core.train_step``. Rank 0 logs
metrics to MLflow, prints progress and writes checkpoints, which it reports to Ray Train so
they land under the run's storage path.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dino_core import (
    DINOLoss,
    NetworkSpec,
    NonFiniteLossError,
    StepConfig,
    build_networks,
    build_optimizer,
    build_schedules,
    ema_parameter_lists,
    knn_classify,
    train_step,
)
from dino_core.eval import extract_features
from dino_core.export import backbone_state_from_checkpoint, save_backbone
from dino_core.loss import identity
from dino_core.models import compile_backbone
from service import checkpoint as ckpt
from service import data, storage
from service.config import DinoConfig, to_yaml
from service.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """What the driver hands every worker besides the config."""

    run_url: str  # storage URL of this run (its checkpoints are under it)
    tracking_uri: str | None
    mlflow_run_id: str | None


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def switch(value: str | bool, device: torch.device) -> bool:
    """``auto`` / true / false config switches; auto means true on GPUs."""
    return device.type == "cuda" if value == "auto" else bool(value)


def nonfinite_fault_steps() -> set[int]:
    """Fault injection for tests and drills: ``DINO_FAULT_NONFINITE_STEPS=5,9`` feeds NaN
    crops to the step at those global steps, so a real NaN loss goes through the real step."""
    raw = os.environ.get("DINO_FAULT_NONFINITE_STEPS", "")
    return {int(x) for x in raw.split(",") if x.strip()}


def seed_everything(*key: int) -> None:
    seed = int(np.random.default_rng(key).integers(2**31))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def network_spec(cfg: DinoConfig) -> NetworkSpec:
    m = cfg.model
    return NetworkSpec(
        arch=m.arch, patch_size=m.patch_size, img_size=cfg.aug.global_size, depth=m.depth,
        drop_path_rate=m.drop_path_rate, out_dim=m.out_dim, use_bn_in_head=m.use_bn_in_head,
        norm_last_layer=m.norm_last_layer, head_nlayers=m.head_nlayers,
        head_hidden_dim=m.head_hidden_dim, head_bottleneck_dim=m.head_bottleneck_dim,
    )


def backbone_meta(cfg: DinoConfig) -> dict[str, Any]:
    return {"arch": cfg.model.arch, "patch_size": cfg.model.patch_size,
            "depth": cfg.model.depth, "img_size": cfg.aug.global_size}


def say(message: str) -> None:
    """A line on the run's console. Ray Train patches ``print`` to log *and* echo when
    stdout is redirected (it always is in a Ray worker), which printed every line twice;
    the process's own stdout is forwarded to the driver once."""
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s")


class Worker:
    def __init__(self, cfg: DinoConfig, info: RunInfo) -> None:
        import ray.train
        import ray.train.torch

        self.cfg, self.info = cfg, info
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        seed_everything(cfg.train.seed, self.rank)
        self.tracker = (
            Tracker(info.tracking_uri, info.mlflow_run_id)
            if self.rank == 0 and info.tracking_uri and info.mlflow_run_id
            else None
        )
        self.dataset = data.train_dataset(cfg)
        self.augment = data.batched_augmentation(cfg)
        self.niter_per_ep = data.steps_per_epoch(len(self.dataset), cfg, self.world)

        self.student, self.teacher = build_networks(network_spec(cfg))
        if self.world > 1 and self.device.type == "cuda":
            # BN heads and ResNets normalise over the global batch, as the reference does;
            # torch has no SyncBatchNorm on CPU, where each worker uses its own batch
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self.student.to(self.device)
        self.teacher.to(self.device)
        self.ema_params = ema_parameter_lists(self.teacher, self.student)
        # a deferred non-finite check skips bad steps inside the fused AdamW kernel
        self.defer_check = switch(cfg.train.defer_nonfinite_check, self.device)
        self.optimizer = build_optimizer(self.student, fused=True if self.defer_check else None)
        reduce = all_reduce_mean if self.world > 1 else identity
        self.loss_fn = DINOLoss(cfg.model.out_dim, cfg.loss.student_temp,
                                cfg.loss.center_momentum, reduce).to(self.device)
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.step_cfg = StepConfig(clip_grad=cfg.optim.clip_grad, autocast_dtype=self.amp_dtype,
                                   all_reduce_mean=reduce, defer_nonfinite_check=self.defer_check)
        # deferred mode: non-finite steps counted on the device, read when metrics are read
        self.bad_steps = torch.zeros((), dtype=torch.long, device=self.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.fault_steps = nonfinite_fault_steps()
        self.deferred_seen = 0
        o, lo = cfg.optim, cfg.loss
        self.sched = build_schedules(
            epochs=cfg.train.epochs, niter_per_ep=self.niter_per_ep,
            global_batch_size=cfg.train.batch_size, lr=o.lr, min_lr=o.min_lr,
            warmup_epochs=o.warmup_epochs, weight_decay=o.weight_decay,
            weight_decay_end=o.weight_decay_end, momentum_teacher=o.momentum_teacher,
            warmup_teacher_temp=lo.warmup_teacher_temp, teacher_temp=lo.teacher_temp,
            warmup_teacher_temp_epochs=lo.warmup_teacher_temp_epochs,
        )
        self.epoch, self.global_step, self.batch_in_epoch = 0, 0, 0
        self.skipped_steps = 0
        self.skipped_images = 0
        self.restored_from = self._restore()
        if switch(cfg.train.compile, self.device):
            # in place, after restoring: parameter names (checkpoints, EMA pairs) do not change
            compile_backbone(self.student.backbone)
            compile_backbone(self.teacher.backbone)
        # wrap only after restoring into the plain module
        self.model = ray.train.torch.prepare_model(self.student, move_to_device=False) \
            if self.world > 1 else self.student

    # ---- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "center": self.loss_fn.center.detach().cpu(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()},
            "config": self.cfg.model_dump(mode="json"),
            "backbone_meta": backbone_meta(self.cfg),
        }

    def _restore(self) -> str | None:
        """The newest complete checkpoint of this run, else ``train.resume``, else None.

        The run's storage directory is scanned rather than trusting only Ray's record
        (``ray.train.get_checkpoint()``): a worker killed right after writing a checkpoint
        dies before Ray's controller registers it, and the restarted group would otherwise
        start from an older one, or from scratch. Damaged ones (manifest missing or not
        matching) are skipped with a warning.
        """
        import ray.train

        candidates = ckpt.checkpoint_dirs(self.info.run_url)
        found = ckpt.load_latest_valid(candidates) if candidates else None
        registered = ray.train.get_checkpoint()
        if found is not None and registered is not None:
            ray_url = storage.with_scheme(str(registered.path), self.info.run_url)
            if ray_url.rstrip("/") != str(found[0]).rstrip("/") and self.rank == 0:
                say(f"[dino] using {found[0]}: newer than Ray's last registered checkpoint "
                    f"{ray_url} (a worker died before reporting it)")
        if found is None and self.cfg.train.resume:
            found = (self.cfg.train.resume, ckpt.load_checkpoint(self.cfg.train.resume))
        if found is None:
            return None
        uri, s = found
        self.student.load_state_dict(s["student"], strict=True)
        self.teacher.load_state_dict(s["teacher"], strict=True)
        self.optimizer.load_state_dict(s["optimizer"])
        self.loss_fn.center.copy_(s["center"].to(self.device))
        if self.scaler and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        self.epoch, self.batch_in_epoch = s["epoch"], s["batch_in_epoch"]
        self.global_step, self.skipped_steps = s["global_step"], s.get("skipped_steps", 0)
        if self.rank == 0:
            say(f"[dino] resumed from {uri} at epoch {self.epoch} step {self.global_step}")
        return str(uri)

    # ---- reporting ---------------------------------------------------------------------
    def report(self, metrics: dict[str, float], with_checkpoint: bool) -> None:
        import ray.train

        if with_checkpoint and self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="dino-ckpt-") as d:
                ckpt.write_checkpoint(d, self.state(), to_yaml(self.cfg))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            say(f"[dino] checkpoint saved at epoch {self.epoch} step {self.global_step}")
        else:
            ray.train.report(metrics, checkpoint=None)

    def knn(self) -> dict[str, float]:
        """k-NN top-1/top-5 of the teacher backbone on the labeled split (rank 0 only)."""
        train_ds, val_ds = data.eval_datasets(self.cfg)
        e = self.cfg.eval
        backbone = self.teacher.backbone
        tf, tl = extract_features(backbone, data.eval_loader(train_ds, e.batch_size, 0),
                                  self.device, self.amp_dtype)
        vf, vl = extract_features(backbone, data.eval_loader(val_ds, e.batch_size, 0),
                                  self.device, self.amp_dtype)
        res = knn_classify(tf, tl, vf, vl, ks=(e.knn_k,), temperature=e.knn_temperature)
        return {"knn_top1": res[e.knn_k]["top1"], "knn_top5": res[e.knn_k]["top5"]}

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        total_steps = t.epochs * self.niter_per_ep
        if t.max_steps:
            total_steps = min(total_steps, t.max_steps)
        if self.global_step >= total_steps:
            if self.rank == 0:
                say(f"[dino] run already complete at step {self.global_step}")
            self.finish()
            return
        say(f"[dino] worker rank {self.rank}/{self.world} pid {os.getpid()} on {self.device}")
        pin = self.device.type == "cuda"
        last_metrics: dict[str, float] = {}
        started, steps_done = time.time(), 0
        while self.epoch < t.epochs and self.global_step < total_steps:
            seed_everything(t.seed, self.rank, self.epoch, self.batch_in_epoch)
            loader = data.train_loader(self.dataset, cfg, self.rank, self.world, self.epoch,
                                       self.batch_in_epoch, pin)
            window_start, window_images = time.time(), 0
            # the batched augmentation draws from its own generator, seeded like the loader's
            aug_gen = torch.Generator().manual_seed(
                int(np.random.default_rng((t.seed, self.rank, self.epoch, self.batch_in_epoch,
                                           7)).integers(2**62)))
            for batch, labels, n_skipped in loader:
                step_start = time.time()
                self.skipped_images += n_skipped
                if self._all_ranks_empty(labels):
                    # every image of the batch was unreadable: no step, on every rank alike
                    self.global_step += 1
                    self.batch_in_epoch += 1
                    continue
                if self.augment is not None:
                    crops = self.augment(batch.to(self.device, non_blocking=True), aug_gen)
                else:
                    crops = [c.to(self.device, non_blocking=True) for c in batch]
                if self.global_step in self.fault_steps:
                    crops = [c * float("nan") for c in crops]
                values = self.sched.at(self.global_step)
                try:
                    out = train_step(
                        student=self.model, teacher=self.teacher, loss_fn=self.loss_fn,
                        optimizer=self.optimizer, crops=crops, values=values,
                        step=self.global_step,
                        freeze_last_layer=self.epoch < cfg.optim.freeze_last_layer,
                        ema_params=self.ema_params, cfg=self.step_cfg, scaler=self.scaler,
                        clip_module=self.student,
                    )
                    if self.defer_check:
                        bad = ~out.finite
                        self.first_bad_step = torch.where(
                            bad & (self.first_bad_step < 0), self.global_step, self.first_bad_step)
                        self.bad_steps += bad
                except NonFiniteLossError as err:
                    self._on_nonfinite(err, 1)
                    out = None
                self.global_step += 1
                self.batch_in_epoch += 1
                steps_done += 1
                window_images += len(crops[0]) * self.world if crops else 0
                if self.defer_check and (self.global_step % t.log_every_steps == 0
                                         or self.global_step >= total_steps):
                    self._check_deferred()
                if out is not None and self.global_step % t.log_every_steps == 0 and (
                        not self.defer_check or bool(out.finite)):
                    elapsed = time.time() - window_start
                    ips = window_images / max(elapsed, 1e-9)
                    last_metrics = {
                        "loss": out.loss, **values,
                        **{k: float(v) for k, v in out.stats.items()},
                        "images_per_sec": ips, "step_time": time.time() - step_start,
                        "epoch": self.epoch, "skipped_images": self.skipped_images,
                        "nonfinite_steps": self.skipped_steps,
                    }
                    self.log(last_metrics, started, steps_done, total_steps)
                    window_start, window_images = time.time(), 0
                if self.global_step >= total_steps:
                    break
                if t.checkpoint_every_steps and self.global_step % t.checkpoint_every_steps == 0 \
                        and self.batch_in_epoch < self.niter_per_ep:
                    if self.defer_check:
                        self._check_deferred()  # never checkpoint past an unnoticed bad step
                    self.report({"epoch": self.epoch, "step": self.global_step,
                                 **{k: v for k, v in last_metrics.items() if k == "loss"}}, True)
            if self.defer_check:
                self._check_deferred()
            epoch_done = self.batch_in_epoch >= self.niter_per_ep
            if epoch_done:
                self.epoch += 1
                self.batch_in_epoch = 0
            metrics = {"epoch": self.epoch, "step": self.global_step}
            if "loss" in last_metrics:
                metrics["loss"] = last_metrics["loss"]
                metrics["teacher_entropy"] = last_metrics["teacher_entropy"]
            finished = self.epoch >= t.epochs or self.global_step >= total_steps
            e = cfg.eval.knn_every_epochs
            if e and (finished or (epoch_done and self.epoch % e == 0)):
                metrics.update(self._knn_all_ranks())
            ce = t.checkpoint_every_epochs
            save = finished or bool(ce and epoch_done and self.epoch % ce == 0)
            self.report(metrics, save)
        self.finish()

    def _all_ranks_empty(self, labels: torch.Tensor) -> bool:
        """True when this rank's batch is empty (all unreadable) on *any* rank: the ranks
        must take the same number of steps or DDP's all-reduces would pair up wrongly."""
        empty = torch.tensor(float(labels.numel() == 0))
        if self.world > 1:
            empty = empty.to(self.device) if dist.get_backend() == "nccl" else empty
            dist.all_reduce(empty, op=dist.ReduceOp.MAX)
        return bool(empty.item())

    def _on_nonfinite(self, err: NonFiniteLossError, count: int) -> None:
        """Stop (the default) or skip-and-count; raising keeps the last checkpoint as is."""
        self.skipped_steps += count
        t = self.cfg.train
        if t.on_nonfinite == "stop" or self.skipped_steps > t.max_skipped_steps:
            if self.tracker:
                self.tracker.log_metrics({"nonfinite_steps": self.skipped_steps},
                                         self.global_step)
                self.tracker.end("FAILED")
            if t.on_nonfinite == "skip":
                raise RuntimeError(
                    f"gave up after {self.skipped_steps} non-finite steps, the last at step "
                    f"{err.step} (train.max_skipped_steps={t.max_skipped_steps})") from err
            raise err
        log.warning("%s; skipped (%d so far)", err, self.skipped_steps)
        if self.rank == 0:
            say(f"[dino] non-finite loss at step {err.step}: step skipped "
                f"({self.skipped_steps} so far, at most {t.max_skipped_steps})")

    def _check_deferred(self) -> None:
        """Reads the device-side count of skipped non-finite steps (one host sync)."""
        seen = int(self.bad_steps.item())
        new = seen - self.deferred_seen
        if new <= 0:
            return
        self.deferred_seen = seen
        first = int(self.first_bad_step.item())
        self.first_bad_step.fill_(-1)
        self._on_nonfinite(NonFiniteLossError(first, float("nan")), new)

    def _knn_all_ranks(self) -> dict[str, float]:
        """k-NN on rank 0; the result is broadcast so every rank reports the same metrics."""
        res = torch.zeros(2, dtype=torch.float64)
        if self.rank == 0:
            r = self.knn()
            res = torch.tensor([r["knn_top1"], r["knn_top5"]], dtype=torch.float64)
            if self.tracker:
                self.tracker.log_metrics(r, self.global_step)
            say(f"[dino] epoch {self.epoch} k-NN top-1 {r['knn_top1']:.1f}% "
                f"(k={self.cfg.eval.knn_k})")
        if self.world > 1:
            res = res.to(self.device) if dist.get_backend() == "nccl" else res
            dist.broadcast(res, src=0)
            res = res.cpu()
        return {"knn_top1": float(res[0]), "knn_top5": float(res[1])}

    def log(self, m: dict[str, float], started: float, done: int, total: int) -> None:
        if self.rank != 0:
            return
        if self.tracker:
            self.tracker.log_metrics(m, self.global_step)
        # the same line locally and in a submitted job's logs (`dino jobs logs --follow`)
        rate = (time.time() - started) / max(done, 1)
        eta = _format_eta(rate * (total - self.global_step))
        say(
            f"[dino] epoch {self.epoch + 1}/{self.cfg.train.epochs} "
            f"step {self.global_step}/{total} loss {m['loss']:.4f} "
            f"lr {m['lr']:.2e} H(t) {m['teacher_entropy']:.2f} "
            f"{m['images_per_sec']:.1f} img/s ETA {eta}"
        )

    def finish(self) -> None:
        """Rank 0 exports the teacher backbone next to the checkpoints and to MLflow."""
        if self.world > 1:  # failed loads of every rank, not only rank 0's
            total = torch.tensor(float(self.skipped_images))
            total = total.to(self.device) if dist.get_backend() == "nccl" else total
            dist.all_reduce(total)
            self.skipped_images = int(total.item())
        if self.rank != 0:
            return
        with tempfile.TemporaryDirectory(prefix="dino-export-") as d:
            path = os.path.join(d, "teacher_backbone.safetensors")
            weights = backbone_state_from_checkpoint({"teacher": self.teacher.state_dict()})
            save_backbone(path, weights, backbone_meta(self.cfg))
            storage.makedirs(self.info.run_url)
            # retried through an outage; kept on local disk (and named) if storage never returns
            storage.upload_file(path, storage.join(self.info.run_url,
                                                   "teacher_backbone.safetensors"))
            if self.tracker:
                self.tracker.log_artifact(path)
                self.tracker.flush()
        if self.skipped_images:
            say(f"[dino] skipped {self.skipped_images} unreadable images "
                "(failed loads over all epochs and workers; the paths are in the log)")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point given to ``TorchTrainer``."""
    cfg = DinoConfig.model_validate(config["cfg"])
    Worker(cfg, RunInfo(**config["run"])).run()
