"""Fidelity metrics have the known answers."""

import math

import torch

from fastcache_core.quality import frechet_distance, mean_finite, psnr, ssim


def images(seed=0, n=4, c=1, size=32):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_identical_images_have_infinite_psnr_and_unit_ssim():
    x = images()
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(4, dtype=torch.float64))


def test_psnr_of_a_known_noise_level_is_analytic():
    x = torch.full((2, 1, 64, 64), 0.5, dtype=torch.float64)
    signs = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    noisy = x + 0.01 * signs.double()  # every pixel off by exactly 0.01: mse = 1e-4
    torch.testing.assert_close(psnr(noisy, x), torch.full((2,), 40.0, dtype=torch.float64))


def test_psnr_of_gaussian_noise_matches_its_variance():
    x = images(n=2, size=512).double()  # 262k pixels: the sample variance is within 0.5% of 0.05^2
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = 10 * math.log10(1 / 0.05**2)
    assert all(abs(v - expected) < 0.1 for v in psnr(noisy, x).tolist())


def test_ssim_drops_with_noise_and_stays_in_range():
    x = images()
    slightly = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    badly = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    s1, s2 = ssim(slightly, x), ssim(badly, x)
    assert (s1 > s2).all() and (s1 <= 1).all() and (s2 > -1).all()


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(5))
    assert frechet_distance(feats, feats) < 1e-6


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=gen, dtype=torch.float64) + torch.tensor([2.0, 0, 0, 0], dtype=torch.float64)
    assert abs(frechet_distance(a, b) - 4.0) < 0.15


def test_mean_finite_caps_infinite_psnr():
    assert mean_finite(torch.tensor([math.inf, 30.0])) == 65.0
