"""``none``: every step computes every block (the uncached reference)."""

from __future__ import annotations

from fastcache_core.methods.base import CacheMethod
from fastcache_core.methods.registry import register_method


class NoCache(CacheMethod):
    """Computes everything; the mode is always ``COMPUTE``."""

    name = "none"
    summary = "no cache: every step runs every block"


NONE = register_method(NoCache())
