"""FastCache for diffusers Diffusion Transformers: per-sample forecasts from real computes, refreshed by a
calibrated rule, batch-invariant.

    from fastcache_core import FastCacheConfig, CacheParams, apply_fastcache
    cache = apply_fastcache(pipe.transformer, FastCacheConfig())
    images = pipe(...).images
    stats = cache.stats()
    cache.remove()

Names are imported on first use (PEP 562): ``from fastcache_core import CacheParams`` loads no torch,
so request validation (an API replica) stays a small process; ``apply_fastcache`` loads torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastcache_core.cache import FastCache, apply_fastcache
    from fastcache_core.config import DEFAULT_PARAMS, METHODS, CacheParams, FastCacheConfig, ResolvedCacheParams
    from fastcache_core.profile import CacheProfile
    from fastcache_core.stats import SampleStats

_HOMES = {
    "FastCache": "fastcache_core.cache",
    "apply_fastcache": "fastcache_core.cache",
    "DEFAULT_PARAMS": "fastcache_core.config",
    "METHODS": "fastcache_core.config",
    "CacheParams": "fastcache_core.config",
    "FastCacheConfig": "fastcache_core.config",
    "ResolvedCacheParams": "fastcache_core.config",
    "CacheProfile": "fastcache_core.profile",
    "SampleStats": "fastcache_core.stats",
}

__all__ = [
    "DEFAULT_PARAMS",
    "METHODS",
    "CacheParams",
    "CacheProfile",
    "FastCache",
    "FastCacheConfig",
    "ResolvedCacheParams",
    "SampleStats",
    "apply_fastcache",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fastcache_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
