"""The representation check's classifiers on cached features (mimlab.evaluation.representation)."""

from __future__ import annotations

import torch

from mimlab.evaluation.representation import LabelledFeatures, knn_accuracy, linear_probe_accuracy


def features(n: int, seed: int) -> LabelledFeatures:
    """Three noisy clusters in 8-d."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    centres = torch.eye(8)[:3] * 3
    return LabelledFeatures(centres[labels] + torch.randn(n, 8, generator=g), labels)


def test_knn_in_query_chunks_equals_one_block_and_the_vote_reference():
    train, val = features(60, 0), features(25, 1)
    one_block = knn_accuracy(train, val, k=5, temperature=0.1, chunk=10_000)
    assert knn_accuracy(train, val, k=5, temperature=0.1, chunk=4) == one_block
    t = torch.nn.functional.normalize(train.features, dim=1)
    q = torch.nn.functional.normalize(val.features, dim=1)
    sim, idx = (q @ t.T).topk(5, dim=1)
    votes = torch.zeros(25, 3).index_add_(
        0,
        torch.arange(25).repeat_interleave(5),
        torch.nn.functional.one_hot(train.labels[idx].flatten(), 3).float() * (sim.flatten() / 0.1).exp().unsqueeze(1),
    )
    assert one_block == 100.0 * int((votes.argmax(1) == val.labels).sum()) / 25
    assert 0 < one_block <= 100


def test_linear_probe_separates_clusters_and_is_seeded():
    train, val = features(120, 0), features(40, 1)
    first = linear_probe_accuracy(train, val, epochs=20, batch_size=16, lr=1e-2, seed=3)
    assert first >= 90 and first == linear_probe_accuracy(train, val, epochs=20, batch_size=16, lr=1e-2, seed=3)
