"""Batch-row bookkeeping of one step: cached index tensors and the parts a step's output is assembled from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_MAX_CACHED_INDICES = 512


@dataclass
class StackPart:
    """Stack outputs for some batch rows: ``rows`` (ascending batch indices), image and text streams."""

    rows: list[int]
    image: torch.Tensor
    text: torch.Tensor | None
    text_known: bool = True  # False when the blocks returned no text stream (SD3's last block)


class IndexCache:
    """Index tensors cached by their values: steady batch compositions build no tensors from lists."""

    def __init__(self) -> None:
        self._indices: dict[tuple[Any, ...], torch.Tensor] = {}

    def tensor(self, values: tuple[Any, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A cached tensor holding ``values``."""
        key = (values, device, dtype)
        tensor = self._indices.get(key)
        if tensor is None:
            if len(self._indices) >= _MAX_CACHED_INDICES:
                self._indices.clear()
            tensor = torch.tensor(values, device=device, dtype=dtype)
            self._indices[key] = tensor
        return tensor

    def index(self, positions: list[int], device: torch.device) -> torch.Tensor:
        """A cached long tensor of ``positions``."""
        return self.tensor(tuple(positions), device, torch.long)

    def subset(self, positions: list[int], size: int, device: torch.device) -> torch.Tensor | None:
        """Index of ``positions`` among ``size`` rows, or ``None`` when they are all of them in order."""
        if len(positions) == size and positions == list(range(size)):
            return None
        return self.index(positions, device)

    def rows(self, rows: list[int], like: torch.Tensor) -> torch.Tensor | None:
        """Index of ``rows`` in the batch ``like``, or ``None`` when they are the whole batch in order."""
        return self.subset(rows, like.shape[0], like.device)


def take(tensor: Any, index: torch.Tensor | None) -> Any:
    """``tensor`` at rows ``index`` (``None``: all rows; a ``None`` tensor stays ``None``)."""
    if tensor is None or index is None:
        return tensor
    return tensor.index_select(0, index)


def relative_changes(
    sample_rows: list[list[int]], members: list[int], rows: list[int], current: torch.Tensor, previous: torch.Tensor
) -> dict[int, float]:
    """Per sample ``k`` in ``members``, the relative L1 change ``sum |current - previous| / sum |previous|``
    over its rows (``sample_rows[k]``; ``rows`` are the batch rows of ``current``), with one
    device-to-host read for the whole batch."""
    sums = (
        torch.stack([(current - previous).abs().flatten(1).sum(1), previous.abs().flatten(1).sum(1)]).float().tolist()
    )
    local = {r: i for i, r in enumerate(rows)}
    changes = {}
    for k in members:
        mine = [local[r] for r in sample_rows[k]]
        changes[k] = sum(sums[0][i] for i in mine) / max(sum(sums[1][i] for i in mine), 1e-12)
    return changes
