"""The registry of per-sample cache methods, by name.

Adding a method: write a module with a ``CacheMethod`` subclass and register an instance, here for a
built-in one (``_BUILTINS``) or from your own code with :func:`register_method`.
"""

from __future__ import annotations

import importlib

from fastcache_core.methods.base import CacheMethod

_BUILTINS = (
    "fastcache_core.methods.none",
    "fastcache_core.methods.fastcache",
    "fastcache_core.methods.taylorseer",
    "fastcache_core.methods.teacache",
    "fastcache_core.methods.fbcache",
)
_METHODS: dict[str, CacheMethod] = {}
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTINS:
            importlib.import_module(module)


def register_method(method: CacheMethod, replace: bool = False) -> CacheMethod:
    """Make ``method`` available by its ``name`` to requests, the API and the CLI; returns it."""
    if not method.name:
        raise ValueError("a cache method needs a name")
    if method.name in _METHODS and not replace and _METHODS[method.name] is not method:
        raise ValueError(f"a cache method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Forget a method registered with :func:`register_method` (tests; built-ins stay)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> CacheMethod:
    """The method registered as ``name``; ``KeyError`` naming the known ones when there is none."""
    _load_builtins()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown cache method {name!r}; known: {', '.join(method_names())}") from None


def method_names() -> tuple[str, ...]:
    """Names of every registered method, built-ins first."""
    _load_builtins()
    return tuple(_METHODS)
