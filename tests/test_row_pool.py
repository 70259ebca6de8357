"""The cache's row pool: rows of another shape keep their cache, and memory is given back when idle."""

import torch

from fastcache_core.state import RowPool

CPU = torch.device("cpu")


def test_rows_of_two_shapes_keep_their_values_when_used_in_turn():
    pool = RowPool()
    small, large = pool.acquire(), pool.acquire()
    pool.get("block0.in", (4, 8), torch.float32, CPU)[small] = 1.0
    pool.get("block0.in", (9, 8), torch.float32, CPU)[large] = 2.0  # another resolution's turn
    assert pool.get("block0.in", (4, 8), torch.float32, CPU)[small].eq(1.0).all()
    assert pool.get("block0.in", (9, 8), torch.float32, CPU)[large].eq(2.0).all()


def test_shrink_frees_everything_only_when_no_row_is_live():
    pool = RowPool()
    slots = [pool.acquire() for _ in range(6)]
    pool.get("block0.out", (16, 32), torch.float32, CPU)
    pool.get("block0.out", (4, 32), torch.float32, CPU)
    held = pool.nbytes
    assert held == 8 * 16 * 32 * 4 + 8 * 4 * 32 * 4  # capacity grew 4 -> 8 rows, both shapes kept
    pool.release(slots[0])
    assert pool.shrink() == 0 and pool.nbytes == held, "shrank while rows were live"
    for slot in slots[1:]:
        pool.release(slot)
    assert pool.shrink() == held
    assert pool.nbytes == 0 and pool.capacity == 0
    slot = pool.acquire()
    assert pool.get("block0.out", (16, 32), torch.float32, CPU).shape == (4, 16, 32) and slot in range(4)
