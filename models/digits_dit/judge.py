"""Judging generated digits: class accuracy and "digits FID" with the bundled classifier.

* ``DigitsJudge``: class accuracy and "digits FID" for the bundled digits models, using the
  classifier's penultimate features against held-out real digits.
* ``inception_fid``: standard Inception FID, only when the user has ``torchvision`` and the
  Inception weights locally (``FASTCACHE_INCEPTION_WEIGHTS``); it never downloads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcache_core.quality import frechet_distance


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class equals the label."""
    return (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()


class DigitsJudge:
    """Class accuracy and digits FID for images of the bundled digits model.

    ``images`` are (n, 1, 32, 32) in [0, 1]. Features are the bundled classifier's penultimate layer;
    the real reference set is the held-out test split of the digits data.
    """

    def __init__(self, classifier: torch.nn.Module) -> None:
        from models.digits_dit.data import load_digits_split

        self.classifier = classifier.eval()
        self.data = load_digits_split()
        self._real_test_features = self.features((self.data.test_images + 1) / 2)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> DigitsJudge:
        """Load the classifier shipped in ``<model_dir>/classifier``."""
        from models.digits_dit.data import DigitClassifier

        return cls(DigitClassifier.load(Path(model_dir) / "classifier"))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float().cpu() * 2 - 1)

    @torch.no_grad()
    def class_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return class_accuracy(self.classifier(images.float().cpu() * 2 - 1), labels)

    def fid_to_real(self, images: torch.Tensor) -> float:
        """Digits FID of ``images`` against the held-out real digits."""
        return frechet_distance(self.features(images), self._real_test_features)

    def fid_real_train_vs_test(self) -> float:
        """The floor of the metric: real training digits against real held-out digits."""
        return frechet_distance(self.features((self.data.train_images + 1) / 2), self._real_test_features)


def inception_fid(images_a: torch.Tensor, images_b: torch.Tensor, weights_path: str | None = None) -> float:
    """Inception-v3 FID between two image sets, with locally available weights only.

    ``weights_path`` (or ``FASTCACHE_INCEPTION_WEIGHTS``) must name a torchvision ``inception_v3``
    state dict on disk. Raises ``FileNotFoundError`` otherwise: this function never downloads.
    """
    path = weights_path or os.environ.get("FASTCACHE_INCEPTION_WEIGHTS")
    if not path or not Path(path).is_file():
        raise FileNotFoundError("Inception FID needs local weights: set FASTCACHE_INCEPTION_WEIGHTS to a file")
    from torchvision.models import inception_v3  # optional dependency

    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.load_state_dict(torch.load(path, map_location="cpu"))
    net.fc = torch.nn.Identity()
    net.eval()

    @torch.no_grad()
    def feats(images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return net((x - mean) / std)

    return frechet_distance(feats(images_a), feats(images_b))
