"""Image-fidelity metrics: PSNR, SSIM, class accuracy and Fréchet distance.

All functions take image batches as float tensors of shape (n, c, h, w) with values in [0, 1]
(what a diffusers pipeline returns with ``output_type="pt"``).

* ``psnr`` / ``ssim``: against a reference batch of the same shape (e.g. the uncached image of the
  same seed). ``ssim`` is the Gaussian-window SSIM of Wang et al. (2004), window 11, sigma 1.5.
* ``frechet_distance``: between two feature sets (Gaussian fit); the FID formula.
* ``DigitsJudge``: class accuracy and "digits FID" for the bundled digits model, using its
  classifier's penultimate features against held-out real digits.
* ``inception_fid``: standard Inception FID, only when the user has ``torchvision`` and the
  Inception weights locally (``FASTCACHE_INCEPTION_WEIGHTS``); it never downloads anything.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, shape (n,); ``inf`` where an image equals its reference."""
    mse = ((images.double() - reference.double()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (mean over pixels and channels), shape (n,); 1 where an image equals its reference."""
    x, y = images.double(), reference.double()
    channels = x.shape[1]
    size = min(11, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size).to(x.device).expand(channels, 1, size, size)
    filt = lambda t: F.conv2d(t, window, groups=channels)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets of shape (n, d)."""
    from scipy import linalg

    a = features_a.double().cpu().numpy()
    b = features_b.double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise as the reference FID code does
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
    return max(value, 0.0)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class equals the label."""
    return (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()


class DigitsJudge:
    """Class accuracy and digits FID for images of the bundled digits model.

    ``images`` are (n, 1, 32, 32) in [0, 1]. Features are the bundled classifier's penultimate layer;
    the real reference set is the held-out test split of the digits data.
    """

    def __init__(self, classifier: torch.nn.Module) -> None:
        from fastcache_core.digits import load_digits_split

        self.classifier = classifier.eval()
        self.data = load_digits_split()
        self._real_test_features = self.features((self.data.test_images + 1) / 2)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "DigitsJudge":
        """Load the classifier shipped in ``<model_dir>/classifier``."""
        from fastcache_core.digits import DigitClassifier

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


def mean_finite(values: torch.Tensor, cap: float = 100.0) -> float:
    """Mean of per-image values with ``inf`` (identical images) capped, so tables stay finite."""
    return float(torch.clamp(values.double(), max=cap).mean().item()) if len(values) else math.nan
