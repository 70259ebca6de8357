"""Per-sample and per-row cache state, and the pooled tensors that hold cached activations.

A *sample* is one requested image; with classifier-free guidance it owns two *rows* of the batch
(branch 0 and 1) that decide together. Cached activations live in ``RowPool`` tensors indexed by a
row's slot, so gathering the cache of any batch composition is one indexing operation per tensor.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastcache_core.config import ResolvedCacheParams
from fastcache_core.methods import CacheMethod, TokenPlan, get_method
from fastcache_core.stats import SampleStats


@dataclass
class SampleState:
    """One sample's settings, progress and counters, and its method's own params and state.

    ``computes`` and ``last_compute`` count real computes of the whole stack for every method; what a
    method keeps besides lives in ``method_state`` (``fastcache_core.methods``).
    """

    sample_id: Hashable
    params: ResolvedCacheParams
    method: CacheMethod
    method_params: Any
    method_state: Any
    num_steps: int | None
    guidance_scale: float | None = None
    """The sample's classifier-free guidance scale, when its runner said (``None``: unknown)."""
    cond_branch: int = 0
    """Which guidance branch of the sample's rows is the conditional one."""
    step: int = 0
    computes: int = 0
    """Real computes of the whole stack so far."""
    last_compute: int = -1
    """Step index of the last real compute (-1 before the first)."""
    phase: int = 0
    """Schedule phase of the current step (set by the cache before each step)."""
    time: float = 1.0
    """Normalized time of the current step, 1 at pure noise (set by the cache before each step)."""
    stats: SampleStats = field(default_factory=SampleStats)

    @classmethod
    def create(
        cls,
        sample_id: Hashable,
        params: ResolvedCacheParams,
        num_steps: int | None,
        guidance_scale: float | None = None,
    ) -> SampleState:
        """A new sample running ``params.method`` (from the registry) with its fresh state."""
        method = get_method(params.method)
        method_params = method.params(params)
        state = method.new_state(method_params)
        return cls(sample_id, params, method, method_params, state, num_steps, guidance_scale)

    @property
    def token_plan(self) -> TokenPlan | None:
        """How this sample's real computes select or merge tokens (``None``: all tokens)."""
        return self.method.token_plan(self)

    @property
    def refresh_fraction(self) -> float:
        """Share of image tokens this sample's token refreshes compute (``0``: it never refreshes tokens)."""
        return self.method.refresh_fraction(self)

    @property
    def selects_tokens(self) -> bool:
        """Whether this sample's next real compute selects or merges tokens: it has a token plan and has
        computed once (the first compute has no earlier input to measure motion against)."""
        return self.computes > 0 and self.token_plan is not None

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
    grow together (capacity doubles) when more rows are live than slots exist. A name asked for with
    another per-row shape (a batch of another resolution interleaved with this one) gets its own
    tensor; the one of the previous shape is set aside, not dropped, so rows of both resolutions keep
    their cache. :meth:`shrink` gives all of it back once no row is live.
    """

    def __init__(self) -> None:
        self.capacity = 0
        self.tensors: dict[str, torch.Tensor] = {}
        self._aside: dict[PoolKey, torch.Tensor] = {}  # tensors of another per-row shape, not in use now
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
        """The pool tensor ``name`` for rows of ``row_shape``, ``dtype`` and ``device`` (created on first use)."""
        tensor = self.tensors.get(name)
        if tensor is None or tensor.shape[1:] != row_shape or tensor.dtype != dtype or tensor.device != device:
            if tensor is not None:
                self._aside[_signature(name, tensor)] = tensor
            tensor = self._aside.pop((name, tuple(row_shape), dtype, torch.device(device)), None)
            if tensor is None:
                tensor = torch.zeros((self.capacity, *row_shape), dtype=dtype, device=device)
            self.tensors[name] = tensor
        return tensor

    def clear(self) -> None:
        self.tensors.clear()
        self._aside.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool's tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.tensors.values(), *self._aside.values()))

    def shrink(self) -> int:
        """Free every tensor and slot when no row is live (after a burst); returns the bytes released.

        Does nothing while any slot is in use: live rows keep their cache.
        """
        if self._used:
            return 0
        released = self.nbytes
        self.clear()
        self._free.clear()
        self.capacity = 0
        return released

    def zero_rows(self, slots: torch.Tensor) -> None:
        """Zero every tensor at ``slots``: a row that takes a slot over inherits nothing from its last owner."""
        for tensor in (*self.tensors.values(), *self._aside.values()):
            tensor.index_fill_(0, slots.to(tensor.device), 0)

    def _grow(self, capacity: int) -> None:
        def grown(tensor: torch.Tensor) -> torch.Tensor:
            bigger = tensor.new_zeros((capacity, *tensor.shape[1:]))
            bigger[: self.capacity] = tensor
            return bigger

        self.tensors = {name: grown(tensor) for name, tensor in self.tensors.items()}
        self._aside = {key: grown(tensor) for key, tensor in self._aside.items()}
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.capacity = capacity


PoolKey = tuple[str, tuple[int, ...], torch.dtype, torch.device]
"""A pool tensor's name, per-row shape, dtype and device."""


def _signature(name: str, tensor: torch.Tensor) -> PoolKey:
    return name, tuple(tensor.shape[1:]), tensor.dtype, tensor.device


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
