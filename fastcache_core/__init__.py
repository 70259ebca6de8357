"""FastCache for diffusers Diffusion Transformers: per-sample forecasts from real computes, refreshed by a
calibrated rule, batch-invariant.

    from fastcache_core import FastCacheConfig, CacheParams, apply_fastcache
    cache = apply_fastcache(pipe.transformer, FastCacheConfig())
    images = pipe(...).images
    stats = cache.stats()
    cache.remove()
"""

from fastcache_core.cache import FastCache, apply_fastcache
from fastcache_core.config import DEFAULT_PARAMS, METHODS, CacheParams, FastCacheConfig, ResolvedCacheParams
from fastcache_core.profile import CacheProfile
from fastcache_core.stats import SampleStats

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
