"""Image-fidelity metrics: PSNR, SSIM and Fréchet distance (calibration tunes defaults with PSNR).

All functions take image batches as float tensors of shape (n, c, h, w) with values in [0, 1]
(what a diffusers pipeline returns with ``output_type="pt"``).

* ``psnr`` / ``ssim``: against a reference batch of the same shape (e.g. the uncached image of the
  same seed). ``ssim`` is the Gaussian-window SSIM of Wang et al. (2004), window 11, sigma 1.5.
* ``frechet_distance``: between two feature sets (Gaussian fit); the FID formula.
"""

from __future__ import annotations

import math

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

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

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


def mean_finite(values: torch.Tensor, cap: float = 100.0) -> float:
    """Mean of per-image values with ``inf`` (identical images) capped, so tables stay finite."""
    return float(torch.clamp(values.double(), max=cap).mean().item()) if len(values) else math.nan
