"""Gaussian smoothing on the device against scipy.ndimage.gaussian_filter (the official per-image
CPU filter of AnomalyCLIP / AdaptCLIP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from clipad.components.smoothing import gaussian_blur, gaussian_kernel1d, reflect_indices


@pytest.mark.parametrize(
    "shape, sigma",
    [((3, 98, 98), 4.0), ((2, 37, 50), 4.0), ((1, 5, 7), 4.0), ((2, 30, 17), 2.5), ((1, 64, 64), 1.0), ((4, 9, 9), 0.7)],
)
def test_matches_scipy_per_map(shape, sigma):
    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 4
    ours = gaussian_blur(maps, sigma)
    ref = np.stack([gaussian_filter(m, sigma=sigma) for m in maps.numpy()])  # reflect, truncate 4
    assert ours.dtype == torch.float32 and ours.shape == maps.shape
    assert np.abs(ours.numpy() - ref).max() < 1e-5


def test_float64_and_leading_dims():
    maps = torch.rand(2, 3, 20, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = gaussian_blur(maps, 4.0)
    ref = np.stack([[gaussian_filter(m, sigma=4.0) for m in row] for row in maps.numpy()])
    assert ours.dtype == torch.float64 and np.abs(ours.numpy() - ref).max() < 1e-12


def test_truncate_and_kernel():
    maps = torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(2))
    ref = gaussian_filter(maps[0].numpy(), sigma=3.0, truncate=2.0)
    assert np.abs(gaussian_blur(maps, 3.0, truncate=2.0)[0].numpy() - ref).max() < 1e-5
    k = gaussian_kernel1d(4.0)
    assert k.numel() == 33 and abs(k.sum().item() - 1) < 1e-12  # radius int(4 * 4 + 0.5) = 16


def test_reflect_indices_are_half_sample_symmetric():
    for n, r in ((4, 3), (4, 5), (3, 16), (10, 2)):  # radius beyond the length repeats the reflection
        assert np.array_equal(np.pad(np.arange(n), r, mode="symmetric"), reflect_indices(n, r).numpy()), (n, r)


def test_sigma_zero_is_identity_and_half_precision_kept():
    maps = torch.rand(2, 16, 16)
    assert gaussian_blur(maps, 0.0) is maps
    const = torch.full((1, 12, 12), 0.25)
    assert torch.allclose(gaussian_blur(const, 4.0), const, atol=1e-7)  # weights sum to 1, borders reflect
    half = gaussian_blur(maps.half(), 2.0)
    assert half.dtype == torch.float16


def test_blur_matrix_is_the_reflected_correlation():
    """Row i of the matrix holds the kernel taps at their reflected source columns (slow loop)."""
    from clipad.components.smoothing import blur_matrix

    w = gaussian_kernel1d(2.0)
    r = (w.numel() - 1) // 2
    for n in (3, 11, 40):
        m = blur_matrix(n, w, dtype=torch.float64)
        ref = torch.zeros(n, n, dtype=torch.float64)
        ext = reflect_indices(n, r)
        for i in range(n):
            for k in range(w.numel()):
                ref[i, ext[i + k]] += w[k]
        assert torch.allclose(m, ref, atol=1e-15)
        assert torch.allclose(m.sum(1), torch.ones(n, dtype=torch.float64))
