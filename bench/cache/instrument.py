"""``bench.cache``'s instruments: FLOPs of every transformer call, and timers that split a method's
transformer wall-clock into the model's own work and the cache's overhead."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class TransformerFlops:
    """Counts the FLOPs of every call of ``module`` (pre-hooks and forward hooks included).

    ``FlopCounterMode`` is entered before any other pre-hook of the module runs and left after its
    last forward hook (``fastcache_core.stats.flop_counter``: CPU attention counted too).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        from fastcache_core.stats import flop_counter

        self.counter = flop_counter()
        self.total = 0
        self._depth = 0
        self._hooks = [
            module.register_forward_pre_hook(self._enter, prepend=True),
            module.register_forward_hook(self._exit),
        ]

    def _enter(self, *args: Any) -> None:
        self._depth += 1
        if self._depth == 1:
            self.counter.__enter__()

    def _exit(self, *args: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.counter.__exit__(None, None, None)
            self.total += self.counter.get_total_flops()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class TransformerTimer:
    """Wall-clock of every transformer forward, of every block, and of the math inside the blocks.

    Hooks time the transformer (outermost, before any other pre-hook), every block as a whole, and every
    direct child module of every block (attention, feed-forward, norms: the block's own math). Torch's
    module hooks run inside any forward replaced by a cache's registry hook, so a skipped block is simply
    not timed. A block's first child counts the block's executions. On CUDA every hook synchronizes, so
    this runs apart from the timed runs.
    """

    def __init__(self, transformer: torch.nn.Module, device: str) -> None:
        from fastcache_core.adapters import adapter_for

        self.cuda = device.startswith("cuda")
        self.total = self.inside = self.blocks_total = 0.0
        self.forwards = self.block_calls = 0
        self._started: dict[int, float] = {}
        self._hooks = [
            transformer.register_forward_pre_hook(self._enter(-1), prepend=True),
            transformer.register_forward_hook(self._exit(-1, "transformer")),
        ]
        for block in adapter_for(transformer).blocks(transformer):
            self._hooks += [
                block.register_forward_pre_hook(self._enter(id(block))),
                block.register_forward_hook(self._exit(id(block), "block")),
            ]
            for position, child in enumerate(block.children()):
                self._hooks += [
                    child.register_forward_pre_hook(self._enter(id(child))),
                    child.register_forward_hook(self._exit(id(child), "first child" if position == 0 else "child")),
                ]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, key: int) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            self._started[key] = self._now()

        return hook

    def _exit(self, key: int, kind: str) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            elapsed = self._now() - self._started.pop(key)
            if kind == "transformer":
                self.total += elapsed
                self.forwards += 1
            elif kind == "block":
                self.blocks_total += elapsed
            else:
                self.inside += elapsed
                self.block_calls += kind == "first child"

        return hook

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def overhead_fraction(method: TransformerTimer, reference: TransformerTimer) -> float | None:
    """Share of the method's transformer wall-clock spent outside the work an uncached forward does.

    From the uncached run (no cache hooks, so a block's timer holds only the block): the model's own
    non-block time per forward (embeddings, head) and a block's glue per execution (its residual adds and
    gating between its child modules, plus the timers' own cost). The method is charged its measured
    child-module math, that glue per block it executed and the non-block time per forward; the rest of
    its transformer wall-clock is the cache's. The cache's approximation math counts as overhead, so
    this is an upper bound."""
    if method.total <= 0 or reference.forwards == 0 or reference.block_calls == 0:
        return None
    model_own = (reference.total - reference.blocks_total) / reference.forwards
    glue = (reference.blocks_total - reference.inside) / reference.block_calls
    expected = method.inside + glue * method.block_calls + model_own * method.forwards
    return (method.total - expected) / method.total
