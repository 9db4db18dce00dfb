"""Weighted k-NN classification on l2-normalised features (Wu et al. 2018, as used by DINO)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    test_chunk: int = 256,
    train_chunk: int = 65536,
) -> dict[int, dict[str, float]]:
    """Weighted vote of the k nearest training features: class score
    ``sum_{i in top-k} exp(sim_i / T) [y_i = c]`` (cosine similarity).

    Memory stays at ``test_chunk x (train_chunk + k)`` similarities: each test chunk keeps a
    running top-k over train chunks, so 1.3M x 50k features never form one matrix.

    Args:
        train_features: ``(N, D)`` (normalised here).
        train_labels: ``(N,)`` int64.
        test_features: ``(M, D)``; M may be 1.
        test_labels: ``(M,)``.
        ks: neighbourhood sizes; each is capped at N.
        temperature: T (0.07).
        num_classes: defaults to ``max(label) + 1``.

    Returns:
        ``{k: {"top1": %, "top5": %}}``.
    """
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.long()
    test_labels = test_labels.long()
    n_train = train_features.shape[0]
    if n_train == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one training and one test feature")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k_max = min(max(ks), n_train)
    correct = {k: [0, 0] for k in ks}
    for start in range(0, test_features.shape[0], test_chunk):
        feats = test_features[start : start + test_chunk]
        labels = test_labels[start : start + test_chunk]
        sims, idx = _topk_over_chunks(feats, train_features, k_max, train_chunk)
        neighbour_labels = train_labels[idx]
        for k in ks:
            kk = min(k, n_train)
            weights = (sims[:, :kk] / temperature).exp()
            votes = torch.zeros(feats.shape[0], num_classes, device=feats.device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights)
            # stable sort: ties (e.g. classes without votes) go to the lower class index
            preds = votes.sort(dim=1, descending=True, stable=True).indices[:, :5]
            hits = preds == labels[:, None]
            correct[k][0] += int(hits[:, 0].sum())
            correct[k][1] += int(hits.any(dim=1).sum())
    m = test_features.shape[0]
    return {k: {"top1": 100.0 * c1 / m, "top5": 100.0 * c5 / m} for k, (c1, c5) in correct.items()}


def _topk_over_chunks(
    queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    best_sims = queries.new_empty(queries.shape[0], 0)
    best_idx = torch.empty(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, keys.shape[0], chunk):
        sims = queries @ keys[start : start + chunk].T
        kk = min(k, sims.shape[1])
        s, i = sims.topk(kk, dim=1)
        best_sims = torch.cat((best_sims, s), dim=1)
        best_idx = torch.cat((best_idx, i + start), dim=1)
        if best_sims.shape[1] > k:
            best_sims, keep = best_sims.topk(k, dim=1)
            best_idx = best_idx.gather(1, keep)
    return best_sims, best_idx
