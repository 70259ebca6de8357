"""Canvas images: one scikit-learn digit, resized and placed at random on a larger dark canvas.

Digits come from the fixed split of :func:`models.digits_dit.data.load_digits_split` at their native
8x8 resolution: training draws from the TRAIN split only, judging from the TEST split only. Each canvas
picks a digit, a side length between ``MIN_SIDE`` and ``MAX_SIDE`` pixels (35-60% of the canvas side),
and a position where the whole digit fits; the digit is upsampled bicubically from 8x8 to that side, as
the digits model upsamples to 32x32. Everything is drawn from a ``torch.Generator``, so a seed fixes the
canvases. Images are (n, 1, CANVAS_SIZE, CANVAS_SIZE) in [-1, 1], background -1.

``CanvasClassifier`` is the digit classifier for whole canvases: the digits classifier's layout with
two more conv/pool stages (a receptive field that covers the largest digit) and global pooling (the
digit can be anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.digits_dit.data import LABEL_NAMES, DigitClassifier, load_digits_split

CANVAS_SIZE = 64
MIN_SIDE = 22  # 35% of the canvas side
MAX_SIDE = 38  # 60% of the canvas side
SOURCE_SIZE = 8  # scikit-learn's digits are 8x8

__all__ = [
    "CANVAS_SIZE",
    "LABEL_NAMES",
    "MAX_SIDE",
    "MIN_SIDE",
    "CanvasClassifier",
    "CanvasSource",
    "load_canvas_source",
]


@dataclass
class CanvasSource:
    """The 8x8 digits (in [0, 1]) and labels of one split, from which canvases are drawn."""

    digits: torch.Tensor  # (n, 1, 8, 8)
    labels: torch.Tensor  # (n,)

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random canvases and their labels; the same generator state gives the same canvases."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.render(idx, generator), self.labels[idx]

    def render(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Canvases of the digits ``idx``, each at a random side length and position."""
        n = len(idx)
        sides = torch.randint(MIN_SIDE, MAX_SIDE + 1, (n,), generator=generator)
        # a uniform position among those where the whole digit fits
        fx = torch.rand(n, generator=generator)
        fy = torch.rand(n, generator=generator)
        canvas = torch.zeros(n, 1, CANVAS_SIZE, CANVAS_SIZE)
        for i in range(n):
            side = int(sides[i])
            room = CANVAS_SIZE - side + 1
            x, y = int(fx[i] * room), int(fy[i] * room)
            digit = F.interpolate(
                self.digits[idx[i]][None], size=(side, side), mode="bicubic", align_corners=False
            ).clamp(0.0, 1.0)
            canvas[i, :, y : y + side, x : x + side] = digit[0]
        return canvas * 2.0 - 1.0

    def fixed_set(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A reproducible set of ``n`` canvases: every digit of the split in turn, random place and size."""
        idx = torch.arange(n) % len(self)
        return self.render(idx, torch.Generator().manual_seed(seed)), self.labels[idx]


def load_canvas_source(split: str) -> CanvasSource:
    """The ``"train"`` or ``"test"`` digits of the fixed digits split, at 8x8, in [0, 1]."""
    data = load_digits_split(image_size=SOURCE_SIZE)
    if split == "train":
        images, labels = data.train_images, data.train_labels
    elif split == "test":
        images, labels = data.test_images, data.test_labels
    else:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return CanvasSource((images + 1.0) / 2.0, labels)


class CanvasClassifier(DigitClassifier):
    """Digit class of a 64x64 canvas in [-1, 1]; ``features`` (penultimate layer) feed "canvas FID".

    Four conv stages with 2x pooling between them give a 38-pixel receptive field (the largest digit);
    global max pooling makes the answer independent of where the digit is. Saving and loading are the
    digits classifier's.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__(width=width, feature_dim=feature_dim)
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 32x32
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveMaxPool2d(1),
        )
        self.fc = nn.Linear(4 * width, feature_dim)
