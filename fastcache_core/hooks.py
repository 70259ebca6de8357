"""How FastCache attaches to a transformer: diffusers ``HookRegistry`` hooks, as diffusers' own caches do.

* ``FastCacheStepHook`` on the transformer: before each forward it tells the cache which rows the
  batch holds and at which timesteps (the step context); after it, every sample advances a step.
* ``FastCacheStackHook`` on the first block: runs the whole block stack for the step, computing some
  samples and forecasting the others, and returns the stack's output.
* ``FastCachePassThroughHook`` on every other block: once the stack ran, hands its output on without
  computing; while the stack runner executes the block (or outside a cached step) it calls through.

Because they are registry hooks, they compose with diffusers' other hooks on the same modules (group
offloading, layerwise casting), and ``FastCache.remove()`` removes them with ``remove_hook``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

from fastcache_core.step import StepContext


class CacheHandle(Protocol):
    """What the hooks need of the cache they serve (``FastCache``)."""

    transformer: torch.nn.Module
    blocks: list[torch.nn.Module]

    @property
    def current_step(self) -> StepContext | None: ...

    def begin_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None: ...

    def end_step(self) -> None: ...

    def run_stack(self, first_block: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...


STEP_HOOK = "fastcache_step"
STACK_HOOK = "fastcache_stack"
BLOCK_HOOK = "fastcache_pass_through"


class FastCacheStepHook(ModelHook):
    """Opens and closes the step context around every transformer forward."""

    def __init__(self, cache: CacheHandle) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # diffusers' ModelHook is untyped
        self.cache = cache

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.cache.begin_step(args, kwargs)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.cache.end_step()
        return output


class FastCacheStackHook(ModelHook):
    """Runs the block stack of a cached step in place of the first block."""

    def __init__(self, cache: CacheHandle) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # diffusers' ModelHook is untyped
        self.cache = cache

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        step = self.cache.current_step
        if step is None or step.bypass or step.running:
            return _original_forward(self)(*args, **kwargs)
        return self.cache.run_stack(_original_forward(self), args, kwargs)


class FastCachePassThroughHook(ModelHook):
    """Hands the stack's output on (the stack already ran) or calls the block through."""

    def __init__(self, cache: CacheHandle) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # diffusers' ModelHook is untyped
        self.cache = cache

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        step = self.cache.current_step
        if step is None or step.bypass or step.running or step.output is None:
            return _original_forward(self)(*args, **kwargs)
        return step.output


def attach(cache: CacheHandle) -> None:
    """Register the three kinds of hooks for ``cache`` on its transformer and blocks."""
    for module in (cache.transformer, *cache.blocks):
        for name in (STEP_HOOK, STACK_HOOK, BLOCK_HOOK):
            if HookRegistry.check_if_exists_or_initialize(module).get_hook(name) is not None:
                raise RuntimeError("FastCache is already applied to this transformer; call .remove() first")
    HookRegistry.check_if_exists_or_initialize(cache.transformer).register_hook(FastCacheStepHook(cache), STEP_HOOK)
    HookRegistry.check_if_exists_or_initialize(cache.blocks[0]).register_hook(FastCacheStackHook(cache), STACK_HOOK)
    for block in cache.blocks[1:]:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(FastCachePassThroughHook(cache), BLOCK_HOOK)
    HookRegistry.check_if_exists_or_initialize(cache.transformer).invalidate_child_registries_cache()


def detach(cache: CacheHandle) -> None:
    """Remove every FastCache hook (diffusers' ``remove_hook``); other hooks stay as they were."""
    registry = HookRegistry.check_if_exists_or_initialize(cache.transformer)
    registry.remove_hook(STEP_HOOK, recurse=False)
    for block in cache.blocks:
        block_registry = HookRegistry.check_if_exists_or_initialize(block)
        block_registry.remove_hook(STACK_HOOK, recurse=False)
        block_registry.remove_hook(BLOCK_HOOK, recurse=False)
    registry.invalidate_child_registries_cache()


def block_callables(blocks: list[torch.nn.Module]) -> list[Any]:
    """What the stack runner calls to really compute each block: the first block's forward below the
    stack hook (it would re-enter the runner), the other blocks themselves (through their hooks)."""
    head = HookRegistry.check_if_exists_or_initialize(blocks[0]).get_hook(STACK_HOOK)
    if head is None:
        raise RuntimeError("FastCache's stack hook is not attached")
    return [_original_forward(head), *blocks[1:]]


def _original_forward(hook: ModelHook) -> Callable[..., Any]:
    """The forward a hook with ``new_forward`` wraps (set by the registry when the hook registers)."""
    return cast(Callable[..., Any], hook.fn_ref.original_forward)
