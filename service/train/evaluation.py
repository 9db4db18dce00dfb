"""k-NN of the teacher during training, on the labeled split (``eval.*``); the result is
broadcast so that every rank reports the same metrics.

``knn_on_rank0`` extracts every feature on rank 0 while the others wait (the baseline);
``knn_distributed`` has every rank extract its share of both splits, gathers them in dataset
order and classifies on rank 0: the same features in the same order, so the same numbers.
``evaluate``, which the loop calls, runs it, logs its metrics and, on rank 0, a picture of the
backbone's last-block attention on the first images of the val split."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, IterableDataset, Subset

from dino_core import knn_classify
from dino_core.eval import extract_features
from dino_core.eval.attention_display import attention_sheet
from dino_core.models.backbone import is_vit
from service import data
from service.config import DinoConfig
from service.tracking import Tracker
from service.train.collectives import all_gather_rows, broadcast_from_rank0
from service.train.context import RunContext

log = logging.getLogger(__name__)
ATTENTION_IMAGES = 4  # the first images of the val split: the same ones at every evaluation


def knn_metrics(cfg: DinoConfig, backbone: nn.Module, device: torch.device,
                amp_dtype: torch.dtype | None) -> dict[str, float]:
    """k-NN top-1/top-5 of ``backbone`` on the labeled split (this process alone)."""
    train_ds, val_ds = data.eval_datasets(cfg)
    e = cfg.eval
    tf, tl = extract_features(backbone, data.eval_loader(train_ds, e.batch_size, 0), device,
                              amp_dtype)
    vf, vl = extract_features(backbone, data.eval_loader(val_ds, e.batch_size, 0), device,
                              amp_dtype)
    res = knn_classify(tf, tl, vf, vl, ks=(e.knn_k,), temperature=e.knn_temperature)
    return {"knn_top1": res[e.knn_k]["top1"], "knn_top5": res[e.knn_k]["top5"]}


def knn_on_rank0(cfg: DinoConfig, ctx: RunContext, backbone: nn.Module,
                 amp_dtype: torch.dtype | None) -> dict[str, float]:
    """``knn_metrics`` on rank 0 alone, broadcast to every rank."""
    values = torch.zeros(2, dtype=torch.float64)
    if ctx.rank == 0:
        r = knn_metrics(cfg, backbone, ctx.device, amp_dtype)
        values = torch.tensor([r["knn_top1"], r["knn_top5"]], dtype=torch.float64)
    values = broadcast_from_rank0(values, ctx.world_size, ctx.device)
    return {"knn_top1": float(values[0]), "knn_top5": float(values[1])}


def share(n: int, batch_size: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of ``n`` images: whole extraction batches of the global
    order (rank ``r`` takes batches ``[r * nb // W, (r + 1) * nb // W)`` of the
    ``nb = ceil(n / batch_size)``), so the last rank's last batch is the only short one.

    Shares differ by at most one batch, not one image: every batch is then the very batch
    ``knn_metrics`` feeds the model, so the features are bit-identical whatever kernels the
    device picks for a batch's shape (splitting by image was bit-exact on CPU too, in the
    test's and the benchmark's settings; a GPU GEMM may pick another kernel for a 37-image
    batch than for a 128-image one, which could not be checked here)."""
    batches = -(-n // batch_size)
    first, last = rank * batches // world_size, (rank + 1) * batches // world_size
    return range(min(first * batch_size, n), min(last * batch_size, n))


def _readable(loader: Any, seen: list[int]) -> Iterator[Any]:
    for batch in loader:  # counts the batches holding an image, which extract_features keeps
        seen[0] += int(len(batch[1]) > 0)
        yield batch


def extract_share(ds: Dataset, batch_size: int, ctx: RunContext, backbone: nn.Module,
                  amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's features ``(n, D)`` and labels ``(n,)``: its ``share`` of ``ds``; of a
    streamed (packed) split, which has no random access to share out, all on rank 0. An
    empty or wholly unreadable share gives ``(0, 0)`` and ``(0,)``: other ranks may still
    hold images."""
    empty = torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    n = len(ds)
    if isinstance(ds, IterableDataset):
        rows = range(n) if ctx.rank == 0 else range(0)
    else:
        rows = share(n, batch_size, ctx.rank, ctx.world_size)
    if len(rows) == 0:
        return empty
    part = ds if len(rows) == n else Subset(ds, rows)
    seen = [0]
    try:
        return extract_features(backbone, _readable(data.eval_loader(part, batch_size, 0), seen),
                                ctx.device, amp_dtype)
    except ValueError:
        if seen[0]:
            raise
        return empty


def knn_distributed(cfg: DinoConfig, ctx: RunContext, backbone: nn.Module,
                    amp_dtype: torch.dtype | None,
                    splits: tuple[Dataset, Dataset] | None = None) -> dict[str, float]:
    """``knn_on_rank0``'s numbers, exactly, with the extraction spread over the ranks: each
    extracts its ``share`` of both labeled splits, every rank receives all features and
    labels in dataset order, rank 0 classifies (on the host, as ``knn_metrics`` does) and
    broadcasts. ``splits``: the labeled (train, val) splits, if already opened.

    Raises:
        ValueError: a split has no readable image (on every rank alike).
    """
    e = cfg.eval
    gathered = []
    for ds in splits or data.eval_datasets(cfg):
        feats, labels = extract_share(ds, e.batch_size, ctx, backbone, amp_dtype)
        gathered.append((all_gather_rows(feats, ctx.world_size, ctx.device),
                         all_gather_rows(labels, ctx.world_size, ctx.device)))
    (tf, tl), (vf, vl) = gathered
    if len(tl) == 0 or len(vl) == 0:
        raise ValueError("no readable images in the evaluation split")
    values = torch.zeros(2, dtype=torch.float64)
    if ctx.rank == 0:
        res = knn_classify(tf, tl, vf, vl, ks=(e.knn_k,), temperature=e.knn_temperature)
        values = torch.tensor([res[e.knn_k]["top1"], res[e.knn_k]["top5"]],
                              dtype=torch.float64)
    values = broadcast_from_rank0(values, ctx.world_size, ctx.device)
    return {"knn_top1": float(values[0]), "knn_top5": float(values[1])}


def evaluate(cfg: DinoConfig, ctx: RunContext, backbone: nn.Module,
             amp_dtype: torch.dtype | None, tracker: Tracker, step: int) -> dict[str, float]:
    """The evaluation during training (``eval.knn_every_epochs``), on every rank: the k-NN
    (``knn_distributed``), logged at ``step``; then rank 0 logs ``attention_picture`` as the
    tracker's ``attention/step_<step, 7 digits>.png`` (rank 0 alone: no rank waits for it)."""
    splits = data.eval_datasets(cfg)
    knn = knn_distributed(cfg, ctx, backbone, amp_dtype, splits)
    tracker.log_metrics(knn, step)
    if ctx.rank == 0 and tracker.uri is not None:  # drawn only for a run that keeps it
        log_attention(tracker, splits[1], backbone, ctx.device, step)
    return knn


def attention_picture(val: Dataset, backbone: nn.Module, device: torch.device,
                      n: int = ATTENTION_IMAGES) -> Image.Image | None:
    """``attention_sheet`` of the first ``n`` images of the val split (as the k-NN sees them;
    unreadable ones left out); None for a backbone that is not a ViT or no readable image."""
    if not is_vit(backbone):
        return None
    part = val if isinstance(val, IterableDataset) else Subset(val, range(min(n, len(val))))
    images = next(iter(data.eval_loader(part, n, 0)), (None,))[0]
    if images is None or len(images) == 0:
        return None
    return attention_sheet(backbone, images[:n].to(device))


def log_attention(tracker: Tracker, val: Dataset, backbone: nn.Module, device: torch.device,
                  step: int) -> None:
    """Draws ``attention_picture`` and logs it; a picture that fails is a warning: it never
    stops training."""
    try:
        picture = attention_picture(val, backbone, device)
    except Exception as err:  # noqa: BLE001 - the picture is for people; training goes on
        log.warning("the attention picture of step %d was not drawn: %s", step, err)
        return
    if picture is None:
        return
    with tempfile.TemporaryDirectory(prefix="dino-attention-") as d:
        path = os.path.join(d, f"step_{step:07d}.png")
        picture.save(path)
        tracker.log_artifact(path, "attention")
