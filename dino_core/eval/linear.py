"""Linear probe on a frozen backbone (Caron et al., 2021, Sec. 4.1 and Appendix; the reference
``eval_linear.py``).

A single linear layer is trained on frozen features with SGD (momentum 0.9, no weight decay),
lr ``base_lr * batch / 256`` with a cosine decay over the epochs, on RandomResizedCrop + flip
views; accuracy is read on Resize + CenterCrop views of the val split. Because every step sees
a new random crop, the backbone runs (under ``torch.no_grad``) at every step: features cannot be
precomputed once.

ViT features are the CLS tokens of the last ``n_last_blocks`` blocks, optionally with the mean
patch token (paper: n=4 for ViT-S, n=1 + avgpool for ViT-B); a ResNet gives its pooled output.

Resuming: the classifier, optimizer, scheduler and epoch are saved to a local file after every
epoch, and each epoch's shuffling and crops are a function of ``(seed, epoch)``, so a run
stopped after any epoch and resumed gives the same classifier as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dino_core.augment.per_image import IMAGENET_MEAN, IMAGENET_STD
from dino_core.data.collate import collate_multicrop
from dino_core.models.backbone import embed_dim_of, is_vit
from dino_core.models.vit_features import intermediate_features


class LinearClassifier(nn.Module):
    """One linear layer on flattened features, initialised as the reference (N(0, 0.01), 0).

    Args:
        dim: feature width.
        num_labels: number of classes.
    """

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, dim)`` -> logits ``(B, num_labels)``."""
        return self.linear(x.flatten(1))


def linear_train_transform(
    size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """RandomResizedCrop (torchvision's default scale, as the reference) + horizontal flip,
    mapping an RGB PIL image or uint8 tensor to float32 ``(3, size, size)``."""
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, scale=scale, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


@torch.no_grad()
def probe_features(
    backbone: nn.Module, x: torch.Tensor, n_last_blocks: int = 4, avgpool: bool = False
) -> torch.Tensor:
    """Frozen features ``(B, D_probe)`` of images ``(B, 3, H, W)``; see :func:`probe_dim`."""
    if is_vit(backbone):
        return intermediate_features(backbone, x, n_last_blocks, avgpool)
    return backbone(x)


def probe_dim(backbone: nn.Module, n_last_blocks: int = 4, avgpool: bool = False) -> int:
    """Width of :func:`probe_features`: ``(n_last_blocks + avgpool) * D`` for a ViT, else ``D``."""
    dim = embed_dim_of(backbone)
    vit = is_vit(backbone)
    return (n_last_blocks + int(avgpool)) * dim if vit else dim


def cosine_factor(epoch: int, epochs: int) -> float:
    """lr multiplier at the start of ``epoch``: ``CosineAnnealingLR(T_max=epochs, eta_min=0)``
    in closed form, so a run resumed with another ``epochs`` follows the new curve."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@torch.no_grad()
def evaluate_linear(
    backbone: nn.Module,
    classifier: nn.Module,
    loader: DataLoader,
    n_last_blocks: int = 4,
    avgpool: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of the probe over ``loader``."""
    classifier.eval()
    n = top1 = top5 = 0
    loss = 0.0
    for images, labels, *_ in loader:
        if labels.numel() == 0:
            continue
        images, labels = images.to(device), labels.to(device)
        logits = classifier(probe_features(backbone, images, n_last_blocks, avgpool))
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = pred == labels[:, None]
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(dim=1).sum())
        n += labels.numel()
    if n == 0:
        raise ValueError("no readable images in the validation split")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "n": n}


def train_linear(
    backbone: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    epochs: int = 100,
    lr: float = 0.001,
    batch_size: int = 256,
    n_last_blocks: int = 4,
    avgpool: bool = False,
    num_classes: int = 1000,
    device: torch.device | str = "cpu",
    checkpoint_path: str | Path | None = None,
    num_workers: int = 0,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Trains a linear probe on the frozen ``backbone`` and evaluates it on ``val_ds``.

    Args:
        backbone: frozen feature extractor (a timm ViT or a ResNet with ``embed_dim``).
        train_ds: ``(image (3, H, W), label)`` samples, ideally through
            :func:`linear_train_transform`; ``None`` samples are skipped.
        val_ds: same, through the deterministic eval transform.
        epochs: total epochs (paper: 100).
        lr: base lr at batch 256 (reference default 0.001).
        batch_size: batch of the probe's SGD.
        n_last_blocks, avgpool: the ViT feature recipe (see :func:`probe_features`).
        num_classes: classifier outputs.
        device: where the backbone and the probe run.
        checkpoint_path: local file written after every epoch; if it exists the run resumes.
        num_workers: data loader processes.
        weight_decay: SGD weight decay (reference: 0).
        seed: seeds the probe's init, and each epoch's shuffling and crops together with the
            epoch index.
        on_epoch_end: called as ``on_epoch_end(epoch, {"train_loss", "lr"})`` after the
            checkpoint of ``epoch`` (0-based) is written; progress output or tests' interrupts.

    Returns:
        ``{"top1", "top5", "val_loss", "train_loss", "epochs", "n_val", "num_classes", "dim",
        "resumed_from", "classifier"}``: accuracies in %, ``train_loss`` of the last epoch run
        here (NaN if the checkpoint was already complete), ``classifier`` the trained module.
    """
    if epochs < 1 or batch_size < 1 or num_classes < 2:
        raise ValueError(
            f"need epochs >= 1, batch_size >= 1 and num_classes >= 2, got {epochs}, "
            f"{batch_size} and {num_classes}"
        )
    device = torch.device(device)
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    dim = probe_dim(backbone, n_last_blocks, avgpool)
    with torch.random.fork_rng(devices=[]):  # the probe's init depends on `seed` alone
        torch.manual_seed(seed)
        classifier = LinearClassifier(dim, num_classes).to(device)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=lr * batch_size / 256.0, momentum=0.9, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: cosine_factor(e, epochs))
    start = 0
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state["dim"] != dim or state["num_classes"] != num_classes:
            raise ValueError(
                f"{checkpoint_path} holds a probe of dim {state['dim']} and "
                f"{state['num_classes']} classes, not {dim} and {num_classes}"
            )
        classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["epoch"])
        # a resume with another `epochs` continues on the new curve from this epoch on
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * cosine_factor(start, epochs)
    train_loss = float("nan")
    for epoch in range(start, epochs):
        classifier.train()
        train_loss = _train_epoch(
            backbone,
            classifier,
            optimizer,
            train_ds,
            batch_size,
            num_workers,
            n_last_blocks,
            avgpool,
            device,
            (seed, epoch),
        )
        lr_now = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if checkpoint_path is not None:
            _save(
                checkpoint_path,
                {
                    "classifier": classifier.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "dim": dim,
                    "num_classes": num_classes,
                },
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"train_loss": train_loss, "lr": lr_now})
    val_loader = DataLoader(
        val_ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_multicrop,
    )
    res = evaluate_linear(backbone, classifier, val_loader, n_last_blocks, avgpool, device)
    return {
        "top1": res["top1"],
        "top5": res["top5"],
        "val_loss": res["loss"],
        "train_loss": train_loss,
        "epochs": epochs,
        "n_val": res["n"],
        "num_classes": num_classes,
        "dim": dim,
        "resumed_from": start,
        "classifier": classifier,
    }


def _train_epoch(
    backbone,
    classifier,
    optimizer,
    dataset,
    batch_size,
    num_workers,
    n_last_blocks,
    avgpool,
    device,
    seed: tuple[int, int],
) -> float:
    """One epoch of SGD on the probe; returns the mean training loss."""
    # Main-process crops draw from torch's global generator: seed it for this epoch only
    # (fork_rng restores it afterwards), and the loader's generator seeds order and workers.
    epoch_seed = int(np.random.default_rng(seed).integers(2**62))
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(epoch_seed)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            collate_fn=collate_multicrop,
            generator=torch.Generator().manual_seed(epoch_seed),
        )
        for images, labels, *_ in loader:
            if labels.numel() == 0:
                continue
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            feats = probe_features(backbone, images, n_last_blocks, avgpool)
            loss = F.cross_entropy(classifier(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * labels.numel()
            count += labels.numel()
    if count == 0:
        raise ValueError("no readable images in the training split")
    return total / count


def _save(path: str | Path, state: dict[str, Any]) -> None:
    """Writes to a temporary file, then renames: a crash mid-write never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
