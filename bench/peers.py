"""Reference methods for comparison, behind one interface: ``apply_peer(transformer, method, **params)``.

* ``none`` - nothing attached (the uncached reference).
* ``fbcache``, ``taylorseer``, ``pab`` - diffusers' own hooks (First-Block-Cache, TaylorSeer, Pyramid
  Attention Broadcast). ``DiTPipeline`` neither opens a cache context nor resets hook state between
  runs, so without help the hooks silently do nothing or carry state from one image into the next.
  The handle does both: it opens a ``"cond"`` context around every transformer forward, resets the
  hooks' state when a new run starts (the timestep goes up again) and tells PAB the current timestep.
  These peers decide per batch, not per sample.
* ``teacache`` and per-sample ``fbcache`` also exist inside FastCache itself (``CacheParams(method=...)``),
  where they decide per sample; use :func:`fastcache_core.apply_fastcache` for those.

Every handle has ``remove()`` and ``forwards`` (transformer calls seen), like ``FastCache``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DIFFUSERS_PEERS = ("fbcache", "taylorseer", "pab")


class PeerHandle:
    """A peer method attached to a transformer."""

    def __init__(self, transformer: nn.Module, method: str, params: dict[str, Any]) -> None:
        self.transformer = transformer
        self.method = method
        self.params = dict(params)
        self.forwards = 0
        self._hooks: list[Any] = []
        self._hook_names: list[str] = []
        self._timestep: float = 1000.0
        self._last_timestep: float | None = None
        self._context_open = False
        if method == "none":
            return
        if method not in DIFFUSERS_PEERS:
            raise ValueError(f"unknown peer {method!r}; peers: none, {', '.join(DIFFUSERS_PEERS)}")
        self._attach_diffusers_hook(method, params)
        self._hooks.append(transformer.register_forward_pre_hook(self._before, with_kwargs=True))
        self._hooks.append(transformer.register_forward_hook(self._after))

    def _attach_diffusers_hook(self, method: str, params: dict[str, Any]) -> None:
        from diffusers.hooks import (
            FirstBlockCacheConfig,
            PyramidAttentionBroadcastConfig,
            TaylorSeerCacheConfig,
            apply_first_block_cache,
            apply_pyramid_attention_broadcast,
            apply_taylorseer_cache,
        )
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        if method == "fbcache":
            apply_first_block_cache(self.transformer, FirstBlockCacheConfig(threshold=params.get("threshold", 0.05)))
            self._hook_names = [_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK]
        elif method == "taylorseer":
            config = TaylorSeerCacheConfig(
                cache_interval=params.get("cache_interval", 3),
                disable_cache_before_step=params.get("disable_cache_before_step", 3),
                max_order=params.get("max_order", 1),
                taylor_factors_dtype=params.get("taylor_factors_dtype", torch.float32),
                # diffusers' default patterns ("...attn") miss DiT/PixArt's "attn1"; predict whole blocks
                cache_identifiers=params.get("cache_identifiers", [r"^(transformer_blocks|single_transformer_blocks)\.\d+$"]),
            )
            apply_taylorseer_cache(self.transformer, config)
            self._hook_names = [_TAYLORSEER_CACHE_HOOK]
        else:  # pab
            skip_range = tuple(params.get("timestep_skip_range", (100, 800)))
            config = PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=params.get("block_skip_range", 2),
                spatial_attention_timestep_skip_range=skip_range,
                spatial_attention_block_identifiers=("transformer_blocks", "single_transformer_blocks"),
                current_timestep_callback=lambda: self._timestep,
            )
            apply_pyramid_attention_broadcast(self.transformer, config)
            self._hook_names = [_PYRAMID_ATTENTION_BROADCAST_HOOK]

    def _registry(self) -> Any:
        from diffusers.hooks import HookRegistry

        return HookRegistry.check_if_exists_or_initialize(self.transformer)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep or 0.0)
        if self._last_timestep is None or t >= self._last_timestep:
            self._registry().reset_stateful_hooks(recurse=True)  # a new denoising run
        self._last_timestep = t
        self._timestep = t
        self.forwards += 1
        _set_cache_context(self.transformer, CacheContext("cond", timestep=t))
        self._context_open = True

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        from diffusers.hooks.hooks import _set_cache_context

        _set_cache_context(self.transformer, None)
        self._context_open = False

    def reset(self) -> None:
        """Forget hook state (the next forward also resets it when the timestep goes up)."""
        if self._hook_names:
            self._registry().reset_stateful_hooks(recurse=True)
        self._last_timestep = None

    def remove(self) -> None:
        """Detach the diffusers hooks and this handle's own hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._hook_names:
            registry = self._registry()
            for name in self._hook_names:
                registry.remove_hook(name, recurse=True)
            registry.invalidate_child_registries_cache()
            self._hook_names = []


def apply_peer(transformer: nn.Module, method: str, **params: Any) -> PeerHandle:
    """Attach a reference method to ``transformer``; ``handle.remove()`` restores it.

    ``fbcache``: ``threshold``. ``taylorseer``: ``cache_interval``, ``disable_cache_before_step``,
    ``max_order``. ``pab``: ``block_skip_range``, ``timestep_skip_range`` (timesteps where attention is
    broadcast).
    """
    return PeerHandle(transformer, method, params)
