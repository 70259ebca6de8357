"""diffusers' cache hooks as comparison peers: they act, reset between runs, and detach cleanly."""

import pytest
import torch

from bench.peers import apply_peer

PEERS = {
    "fbcache": {"threshold": 0.5},
    "taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2},
    "pab": {"block_skip_range": 2, "timestep_skip_range": (100, 900)},
}


def generate(pipe):
    return pipe([1, 2], guidance_scale=2.0, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


@pytest.mark.parametrize("method", sorted(PEERS))
def test_peer_changes_the_output_is_repeatable_and_detaches(tiny_dit, method):
    reference = generate(tiny_dit)
    handle = apply_peer(tiny_dit.transformer, method, **PEERS[method])
    try:
        first = generate(tiny_dit)
        second = generate(tiny_dit)  # state from the first run must not leak into the second
    finally:
        handle.remove()
    assert not torch.allclose(first, reference), f"{method} did nothing: its hooks never engaged"
    torch.testing.assert_close(first, second)
    assert handle.forwards == 20
    torch.testing.assert_close(generate(tiny_dit), reference)


def test_unknown_peer_is_refused(tiny_dit):
    with pytest.raises(ValueError, match="unknown peer"):
        apply_peer(tiny_dit.transformer, "magic")
