"""``StepContext``: what one transformer forward is about, shared by the hooks and the stack runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastcache_core.state import RowState, SampleState


@dataclass
class StepContext:
    """What one transformer forward is about: its rows, their samples and times."""

    rows: list[RowState]
    samples: list[SampleState]
    sample_rows: list[list[int]]
    """Batch row indices of each sample, in sample order."""
    times: torch.Tensor | None
    """Normalized time of each row, (B,) float32 on the batch's device."""
    bypass: bool = False
    running: bool = False
    """True while the stack runner executes blocks: pass-through hooks then call through."""
    output: Any = None
    """The stack's output once it ran; later blocks hand it on."""
