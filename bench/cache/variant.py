"""``Variant``: one row of ``bench.cache``, a method at one setting and how to attach it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Variant:
    """One row: a method at one setting, and how to attach it to a transformer."""

    method: str
    label: str
    params: dict[str, Any]
    attach: Callable[[torch.nn.Module], Any] | None  # None: the uncached reference
    is_fastcache: bool = False  # a FastCache handle (needs set_run)
    key: tuple | None = None  # rows with equal keys compute the same thing: measured once
