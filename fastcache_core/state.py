"""Per-sample and per-row cache state, and the pooled tensors that hold cached activations.

A *sample* is one requested image; with classifier-free guidance it owns two *rows* of the batch
(branch 0 and 1) that decide together. Cached activations live in ``RowPool`` tensors indexed by a
row's slot, so gathering the cache of any batch composition is one indexing operation per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch

from fastcache_core.config import CacheParams
from fastcache_core.decisions import RefreshState
from fastcache_core.stats import SampleStats


@dataclass
class SampleState:
    """One sample's settings, progress, refresh bookkeeping and counters."""

    sample_id: Hashable
    params: CacheParams
    num_steps: int | None
    step: int = 0
    refresh: RefreshState = field(default_factory=RefreshState)
    teacache_accumulated: float = 0.0
    stats: SampleStats = field(default_factory=SampleStats)

    @property
    def uses_token_selection(self) -> bool:
        """Whether real computes of this sample run only its moving tokens (or merge tokens)."""
        p = self.params
        return p.method == "fastcache" and (p.motion_threshold > 0.0 or p.motion_fraction < 1.0 or p.merge_ratio > 0.0)

    def is_forced(self, first_steps: int, last_steps: int) -> bool:
        """Whether this step must compute everything (warm-up and final steps)."""
        if self.step < first_steps:
            return True
        return self.num_steps is not None and self.step >= self.num_steps - last_steps


@dataclass
class RowState:
    """One batch row: which sample and guidance branch it belongs to, and its pool slot."""

    sample: SampleState
    branch: int
    slot: int


class RowPool:
    """Named tensors of shape (capacity, ...) holding per-row cached activations.

    Tensors are created on first use with the shape, dtype and device they are asked for, and all
    grow together (capacity doubles) when more rows are live than slots exist.
    """

    def __init__(self) -> None:
        self.capacity = 0
        self.tensors: dict[str, torch.Tensor] = {}
        self._free: list[int] = []
        self._used: set[int] = set()

    def acquire(self) -> int:
        if not self._free:
            self._grow(max(4, 2 * self.capacity))
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot in self._used:
            self._used.remove(slot)
            self._free.append(slot)

    def get(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The pool tensor ``name``, (re)created when its per-row shape, dtype or device changed."""
        tensor = self.tensors.get(name)
        if tensor is None or tensor.shape[1:] != row_shape or tensor.dtype != dtype or tensor.device != device:
            tensor = torch.zeros((self.capacity, *row_shape), dtype=dtype, device=device)
            self.tensors[name] = tensor
        return tensor

    def clear(self) -> None:
        self.tensors.clear()

    def zero_rows(self, slots: torch.Tensor) -> None:
        """Zero every tensor at ``slots``: a row that takes a slot over inherits nothing from its last owner."""
        for tensor in self.tensors.values():
            tensor.index_fill_(0, slots.to(tensor.device), 0)

    def reset(self) -> None:
        """Drop every tensor and slot (only when no row is live): the memory goes back to the allocator."""
        if self._used:
            raise RuntimeError("RowPool.reset() with live rows")
        self.tensors.clear()
        self._free.clear()
        self.capacity = 0

    def _grow(self, capacity: int) -> None:
        for name, tensor in self.tensors.items():
            grown = tensor.new_zeros((capacity, *tensor.shape[1:]))
            grown[: self.capacity] = tensor
            self.tensors[name] = grown
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.capacity = capacity


def gather_rows(pool: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Cached rows at ``slots`` (and token ``positions`` per row, (rows, k)), as a new tensor."""
    if positions is None:
        return pool.index_select(0, slots)
    return pool[slots[:, None], positions]


def write_rows(pool: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor | None, values: torch.Tensor) -> None:
    """Store ``values`` into the pool rows ``slots`` (at token ``positions`` per row when given)."""
    if positions is None:
        pool.index_copy_(0, slots, values.to(pool.dtype))
    else:
        pool[slots[:, None], positions] = values.to(pool.dtype)
