"""k-NN during training, spread over real gloo process groups of 2 and 3 ranks, gives exactly
the numbers of rank 0 alone: every rank's share is extracted, gathered in dataset order (the
features bit-identical to one process's), classified on rank 0 and broadcast."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset, IterableDataset

from dino_core.eval import extract_features
from dino_core.models.backbone import build_backbone
from service import data
from service.config import load_config
from service.train.collectives import all_gather_rows
from service.train.evaluation import (
    extract_share,
    knn_distributed,
    knn_metrics,
    knn_on_rank0,
    share,
)

# odd split sizes: the shares are unequal, and at 3 ranks rank 0 has no val batch at all
TRAIN, VAL, BATCH = 61, 30, 16
OVERRIDES = ["model.arch=vit_tiny", "model.depth=1", "eval.image_size=32",
             f"eval.procedural_train_size={TRAIN}", f"eval.procedural_val_size={VAL}",
             f"eval.batch_size={BATCH}", "eval.knn_k=5", "tracking.enabled=false"]


class Ctx:
    """The part of ``RunContext`` the evaluation reads."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")


def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 16, 32, depth=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        cfg, ctx, model = load_config(None, None, OVERRIDES), Ctx(rank, world), backbone()
        gathered, rows = [], []
        for ds in data.eval_datasets(cfg):
            f, y = extract_share(ds, BATCH, ctx, model, None)
            rows.append(len(y))
            gathered.append((all_gather_rows(f, world, ctx.device),
                             all_gather_rows(y, world, ctx.device)))
        result = {"distributed": knn_distributed(cfg, ctx, model, None),
                  "rank0": knn_on_rank0(cfg, ctx, model, None),
                  "gathered": gathered, "rows": rows}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process():
    """Features, labels and k-NN metrics of one process over the whole splits (one thread,
    as each rank has)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, model = load_config(None, None, OVERRIDES), backbone()
        splits = [extract_features(model, data.eval_loader(ds, BATCH, 0))
                  for ds in data.eval_datasets(cfg)]
        return splits, knn_metrics(cfg, model, torch.device("cpu"), None)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_knn_equals_rank0_only_exactly(world, single_process):
    splits, expected = single_process
    with tempfile.TemporaryDirectory() as d:
        # forked, as DataLoader workers are: spawned ones re-import torch and the service,
        # 10-30 s each on a busy 2-core machine; each sets one thread before any torch op
        mp.start_processes(_worker, args=(world, free_port(), d), nprocs=world,
                           start_method="fork")
        results = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
    for r in results:  # every rank reports the same numbers, those of one process
        assert r["distributed"] == expected and r["rank0"] == expected
        for (f, y), (ef, ey) in zip(r["gathered"], splits, strict=True):
            assert torch.equal(y, ey)
            assert torch.equal(f, ef)  # bit-identical, in dataset order
    rows = [r["rows"] for r in results]  # (train, val) rows per rank: unequal shares
    assert [sum(c) for c in zip(*rows, strict=True)] == [TRAIN, VAL]
    assert len({tuple(c) for c in rows}) > 1
    if world == 3:
        assert rows[0][1] == 0  # 2 val batches for 3 ranks: rank 0 gathers from an empty share
    assert 0 < expected["knn_top5"] <= 100 and expected["knn_top1"] <= expected["knn_top5"]


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 61, 64, 200])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shares_are_whole_batches_covering_the_split_in_order(n, world):
    batch = 16
    shares = [share(n, batch, r, world) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(n))  # contiguous, in rank order
    batches = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    counts = []
    for s in shares:  # a share is a run of the single process's batches
        own = [b for b in batches if b[0] in s]
        assert [i for b in own for i in b] == list(s)
        counts.append(len(own))
    assert max(counts) - min(counts) <= 1


class Unreadable(Dataset):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int):
        return None  # what a folder gives for a file it cannot decode


def test_a_wholly_unreadable_share_is_empty_not_an_error():
    f, y = extract_share(Unreadable(), 2, Ctx(0, 1), backbone(), None)
    assert f.shape == (0, 0) and y.shape == (0,)


class Streamed(IterableDataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        return ((image, i % 3) for i, image in enumerate(self.images))


def test_a_streamed_split_is_extracted_whole_on_rank0_and_nowhere_else():
    model, images = backbone(), torch.randn(7, 3, 32, 32)
    f0, y0 = extract_share(Streamed(images), 4, Ctx(0, 2), model, None)
    f1, y1 = extract_share(Streamed(images), 4, Ctx(1, 2), model, None)
    expected = torch.nn.functional.normalize(model.eval()(images), dim=1)
    assert torch.allclose(f0, expected, atol=1e-6) and y0.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert f1.numel() == 0 and y1.numel() == 0


def test_all_gather_rows_on_one_rank_returns_the_rows():
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(all_gather_rows(x, 1, torch.device("cpu")), x)
