"""The handwritten-digits data set and the small digit classifier used to judge generated samples.

The data set is scikit-learn's ``load_digits`` (1,797 greyscale 8x8 images, 10 classes), which ships
inside the scikit-learn wheel: nothing is downloaded. Images are upsampled to ``IMAGE_SIZE`` and
scaled to [-1, 1], the range the bundled VAE and DiT were trained on.

The classifier is a tiny CNN. It gives class accuracy of generated digits and, through its
penultimate layer, the features for a Fréchet distance against held-out real digits ("digits FID").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 32
LABEL_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass
class DigitsSplit:
    """Images in [-1, 1] with shape (n, 1, IMAGE_SIZE, IMAGE_SIZE) and integer labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits_split(image_size: int = IMAGE_SIZE) -> DigitsSplit:
    """Load scikit-learn's digits, upsample them and split off a fixed, stratified test set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(image_size, image_size), mode="bicubic", align_corners=False)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    labels = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=data.target
    )
    return DigitsSplit(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


class DigitClassifier(nn.Module):
    """A small CNN for 32x32 greyscale digits in [-1, 1]; ``features`` is its penultimate layer."""

    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(2),  # 2x2
        )
        self.fc = nn.Linear(8 * width, feature_dim)
        self.head = nn.Linear(feature_dim, len(LABEL_NAMES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features, shape (n, feature_dim)."""
        return F.gelu(self.fc(self.conv(images).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def save(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> DigitClassifier:
        """Load a classifier written by :meth:`save`, in eval mode."""
        from safetensors.torch import load_file

        directory = Path(directory)
        model = cls(**json.loads((directory / "config.json").read_text()))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()
