"""Token refresh: a share of the tokens runs the stack between real computes, over the others' kept keys and values."""

import pytest
import torch

from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache
from fastcache_core.kv_context import ContextAttention, KVContext
from fastcache_core.state import RowPool
from tests.dit_loop import DiTSample, denoise

STEPS = 10


def _block_call(pipe, x):
    """One DiT block's keyword arguments for the rows of ``x`` at timestep 500, class 3."""
    rows = x.shape[0]
    return {
        "hidden_states": x,
        "timestep": torch.full((rows,), 500, dtype=torch.long),
        "class_labels": torch.full((rows,), 3, dtype=torch.long),
    }


def test_refreshed_tokens_attend_over_the_kept_keys_and_values_of_the_others(tiny_dit):
    block = tiny_dit.transformer.transformer_blocks[0]
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        plain = block(**_block_call(tiny_dit, x))
    pool = RowPool()
    slots = torch.tensor([pool.acquire(), pool.acquire()])
    context = KVContext(pool)
    context.install([block.attn1])
    try:
        with torch.no_grad():
            with context.recording(slots):
                recorded = block(**_block_call(tiny_dit, x))
            positions = torch.tensor([[1, 4, 9, 15], [0, 2, 3, 8]])
            selected = x.gather(1, positions[..., None].expand(-1, -1, 32))
            with context.refreshing(slots, positions, 16):
                refreshed = block(**_block_call(tiny_dit, selected))
    finally:
        context.uninstall()
    assert torch.equal(recorded, plain)
    torch.testing.assert_close(refreshed, plain.gather(1, positions[..., None].expand(-1, -1, 32)))
    # without the kept context the same tokens give another output: the context is what is tested
    with torch.no_grad():
        alone = block(**_block_call(tiny_dit, selected))
    assert not torch.allclose(alone, refreshed, atol=1e-4)


def test_refreshing_every_token_equals_the_uncached_model(tiny_dit):
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig())
    try:
        sample = DiTSample(label=3, seed=5, params=CacheParams(tolerance=0.6, refresh_fraction=1.0))
        uncached = DiTSample(label=3, seed=5, params=CacheParams(tolerance=0.0))
        (refreshed,), (stats,) = denoise(tiny_dit, cache, [sample], STEPS)
        (reference,), _ = denoise(tiny_dit, cache, [uncached], STEPS)
    finally:
        cache.remove()
    assert stats.blocks_approximated > 0  # it did refresh instead of computing
    assert stats.tokens_computed == stats.tokens_total
    torch.testing.assert_close(refreshed, reference, rtol=1e-4, atol=1e-5)


def test_partial_refresh_moves_the_image_towards_the_uncached_one(tiny_dit):
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig())
    try:
        runs = {}
        for fraction in (0.0, 0.5):
            params = CacheParams(tolerance=0.6, refresh_fraction=fraction)
            (runs[fraction],), _ = denoise(tiny_dit, cache, [DiTSample(label=3, seed=5, params=params)], STEPS)
        (reference,), _ = denoise(tiny_dit, cache, [DiTSample(3, 5, CacheParams(tolerance=0.0))], STEPS)
    finally:
        cache.remove()
    assert (runs[0.5] - reference).norm() < (runs[0.0] - reference).norm()


@pytest.mark.parametrize("score", ["forecast_error", "input_change", "slope"])
def test_each_refresh_score_computes_the_fraction_asked(tiny_dit, score):
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(refresh_score=score))
    try:
        params = CacheParams(tolerance=0.6, refresh_fraction=0.25)
        _, (stats,) = denoise(tiny_dit, cache, [DiTSample(label=3, seed=5, params=params)], STEPS)
    finally:
        cache.remove()
    refreshes = stats.blocks_approximated // len(tiny_dit.transformer.transformer_blocks)
    computes = STEPS - refreshes
    assert refreshes > 0
    assert stats.tokens_computed == computes * 16 + refreshes * 4


def test_removing_the_cache_restores_the_attention_processors(tiny_dit):
    before = [b.attn1.processor for b in tiny_dit.transformer.transformer_blocks]
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig())
    params = CacheParams(tolerance=0.6, refresh_fraction=0.5)
    denoise(tiny_dit, cache, [DiTSample(label=3, seed=5, params=params)], 4)
    assert all(isinstance(b.attn1.processor, ContextAttention) for b in tiny_dit.transformer.transformer_blocks)
    cache.remove()
    assert [b.attn1.processor for b in tiny_dit.transformer.transformer_blocks] == before


def test_static_bipartite_merge_of_duplicate_tokens_with_proportional_attention_is_exact(tiny_dit):
    from fastcache_core.tokens import knn_unmerge, static_bipartite_merge

    block = tiny_dit.transformer.transformer_blocks[0]
    torch.manual_seed(1)
    half = torch.randn(2, 8, 32)
    x = torch.cat([half, half], dim=1)  # tokens 8..15 repeat tokens 0..7
    saliency = torch.full((2, 16), 5.0)
    saliency[:, [0, 8, 1, 9, 2, 10, 3, 11]] = torch.arange(8.0)  # A = 0..3, B = 8..11: duplicates pair up
    merged, merge = static_bipartite_merge(x, saliency, 2)
    assert merged.shape[1] == 14 and bool((merge.sizes.sum(1) == 16).all())
    assert merge.sizes.max() == 2  # only duplicates merged: a token with a different partner would differ
    context = KVContext(RowPool())
    context.install([block.attn1])
    try:
        with torch.no_grad():
            plain = block(**_block_call(tiny_dit, x))
            with context.proportional(merge.sizes):
                out = block(**_block_call(tiny_dit, merged))
    finally:
        context.uninstall()
    torch.testing.assert_close(knn_unmerge(out, merged, x, merge), plain, rtol=1e-5, atol=1e-5)


def test_static_bipartite_merge_never_merges_a_moving_token():
    from fastcache_core.tokens import static_bipartite_merge

    torch.manual_seed(2)
    x = torch.randn(1, 32, 8)
    saliency = torch.rand(1, 32)
    saliency[0, :8] += 10.0  # the moving tokens
    _, merge = static_bipartite_merge(x, saliency, 4)
    own_slot = merge.slot[0, :8]
    kept_rank = torch.searchsorted(merge.kept[0], torch.arange(8))
    assert torch.equal(own_slot, kept_rank)  # each moving token is its own representative
    assert merge.sizes[0, own_slot].eq(1).all()  # and absorbed nothing


def test_a_refresh_with_the_context_kept_costs_its_share_of_the_block_macs():
    from bench.token_cost import measure

    row = measure(tokens=64, width=32, heads=2, fraction=0.25, repeats=1)
    # queries scale, keys stay all N; the per-row timestep embedding is a small fixed cost
    assert row["refresh_mac_fraction"] == pytest.approx(0.25, abs=0.02)
    assert row["selection_mac_fraction"] < row["refresh_mac_fraction"]  # dropping the context is cheaper
    assert 0.0 < row["attention_share"] < 1.0
