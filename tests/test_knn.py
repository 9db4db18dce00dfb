"""k-NN against a brute-force implementation written here."""

import pytest
import torch

from dino_core import knn_classify


def brute_force_knn(train, train_y, test, test_y, k, t, c):
    train = train / train.norm(dim=1, keepdim=True)
    test = test / test.norm(dim=1, keepdim=True)
    top1 = top5 = 0
    for x, y in zip(test, test_y):
        sims = [(float(x @ f), int(lab)) for f, lab in zip(train, train_y)]
        sims.sort(key=lambda s: -s[0])
        scores = [0.0] * c
        for s, label in sims[: min(k, len(sims))]:
            scores[label] += float(torch.exp(torch.tensor(s / t)))
        order = sorted(range(c), key=lambda i: -scores[i])
        top1 += order[0] == int(y)
        top5 += int(y) in order[:5]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


@pytest.mark.parametrize("n_test", [1, 7, 300])
@pytest.mark.parametrize("chunks", [(256, 65536), (3, 5)])
def test_knn_matches_brute_force(n_test, chunks):
    g = torch.Generator().manual_seed(n_test)
    c = 7
    centers = torch.randn(c, 16, generator=g)
    train_y = torch.randint(0, c, (250,), generator=g)
    test_y = torch.randint(0, c, (n_test,), generator=g)
    train = centers[train_y] + 1.5 * torch.randn(250, 16, generator=g)
    test = centers[test_y] + 1.5 * torch.randn(n_test, 16, generator=g)
    res = knn_classify(
        train,
        train_y,
        test,
        test_y,
        ks=(10, 20, 100, 200),
        num_classes=c,
        test_chunk=chunks[0],
        train_chunk=chunks[1],
    )
    for k in (10, 20, 100, 200):
        top1, top5 = brute_force_knn(train, train_y, test, test_y, k, 0.07, c)
        assert res[k]["top1"] == top1 and res[k]["top5"] == top5, k


def test_knn_k_larger_than_train_set():
    res = knn_classify(
        torch.eye(3), torch.tensor([0, 1, 2]), torch.eye(3)[:1], torch.tensor([0]), ks=(20,)
    )
    assert res[20]["top1"] == 100.0
