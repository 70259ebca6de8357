"""Per-sample cache methods as plug-ins: one module per method, a registry by name.

Imports no torch: request validation and the API read the registry.
"""

from fastcache_core.methods.base import (
    COMPUTE,
    FIRST_BLOCK,
    FORECAST,
    INPUT_CHANGE,
    MODES,
    REFRESH,
    REUSE,
    CacheMethod,
    MethodContext,
    TokenPlan,
)
from fastcache_core.methods.registry import get_method, method_names, register_method, unregister_method

__all__ = [
    "COMPUTE",
    "FIRST_BLOCK",
    "FORECAST",
    "INPUT_CHANGE",
    "MODES",
    "REFRESH",
    "REUSE",
    "CacheMethod",
    "MethodContext",
    "TokenPlan",
    "get_method",
    "method_names",
    "register_method",
    "unregister_method",
]
