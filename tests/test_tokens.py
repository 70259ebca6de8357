"""Token selection and k-NN merging: shapes, per-sample separation, exact round trips."""

import torch

from fastcache_core.tokens import (
    gather_tokens,
    knn_merge,
    knn_unmerge,
    motion_token_count,
    relative_token_change,
    scatter_tokens,
    top_tokens,
)


def two_separated_samples(n=32, d=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, n, d, generator=gen)
    x[0] += 100.0  # sample 0 lives far from sample 1
    x[1] -= 100.0
    return x


def test_merge_and_unmerge_round_trip_shapes():
    x = two_separated_samples()
    merged, merge = knn_merge(x, merge_count=12, neighbors=4)
    assert merged.shape == (2, 20, 8)
    assert merge.kept.shape == (2, 20) and merge.slot.shape == (2, 32)
    restored = knn_unmerge(merged, merged, x, merge)  # identity "blocks"
    assert restored.shape == x.shape
    torch.testing.assert_close(restored, x)


def test_merge_never_mixes_tokens_of_different_samples():
    x = two_separated_samples()
    merged, _ = knn_merge(x, merge_count=16, neighbors=4)
    assert (merged[0] > 50).all() and (merged[1] < -50).all()


def test_merged_token_is_the_mean_of_its_group():
    x = two_separated_samples(n=16)
    merged, merge = knn_merge(x, merge_count=6, neighbors=3)
    for row in range(2):
        for slot in range(merged.shape[1]):
            members = x[row][merge.slot[row] == slot]
            torch.testing.assert_close(merged[row, slot], members.mean(0))


def test_unmerge_adds_each_group_residual_to_each_member():
    x = two_separated_samples(n=16)
    merged, merge = knn_merge(x, merge_count=6, neighbors=3)
    processed = merged + 1.0
    out = knn_unmerge(processed, merged, x, merge)
    torch.testing.assert_close(out, x + 1.0)


def test_saliency_selects_the_tokens_that_moved():
    previous = torch.ones(1, 16, 4)
    current = previous.clone()
    current[0, [3, 9]] += 1.0
    saliency, norm_sq = relative_token_change(current, previous)
    count = motion_token_count(saliency[0], norm_sq[0], threshold=0.1, fraction=1.0, granularity=1)
    assert count == 2
    assert top_tokens(saliency[0], count).tolist() == [3, 9]


def test_kept_fraction_mode_and_granularity():
    saliency = torch.arange(32.0)
    assert motion_token_count(saliency, torch.ones(32), threshold=0.0, fraction=0.25, granularity=1) == 8
    assert motion_token_count(saliency, torch.ones(32), threshold=0.0, fraction=0.2, granularity=4) == 8
    assert motion_token_count(saliency, torch.ones(32), threshold=0.0, fraction=1.0, granularity=4) == 32


def test_gather_then_scatter_is_identity_on_the_gathered_positions():
    x = torch.randn(2, 10, 3)
    positions = torch.tensor([[1, 4, 7], [0, 2, 9]])
    picked = gather_tokens(x, positions)
    torch.testing.assert_close(scatter_tokens(torch.zeros_like(x), positions, picked).sum(), picked.sum())
    torch.testing.assert_close(scatter_tokens(x, positions, picked), x)
