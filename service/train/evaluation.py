"""k-NN of the teacher during training, on the labeled split (``eval.*``), on rank 0; the
result is broadcast so that every rank reports the same metrics."""

from __future__ import annotations

import torch
from torch import nn

from dino_core import knn_classify
from dino_core.eval import extract_features
from service import data
from service.config import DinoConfig
from service.train.collectives import broadcast_from_rank0
from service.train.context import RunContext


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
    values = torch.zeros(2, dtype=torch.float64)
    if ctx.rank == 0:
        r = knn_metrics(cfg, backbone, ctx.device, amp_dtype)
        values = torch.tensor([r["knn_top1"], r["knn_top5"]], dtype=torch.float64)
    values = broadcast_from_rank0(values, ctx.world_size, ctx.device)
    return {"knn_top1": float(values[0]), "knn_top5": float(values[1])}
