"""clipad.components.scoring against independent references: float64 numpy loops for the
two-class softmax, a hand-written bilinear interpolation for the maps, scipy for the harmonic
mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import hmean

from clipad.components.scoring import (
    anomaly_map,
    cosine_logits,
    default_image_size,
    harmonic_mean,
    patch_probability_maps,
    state_probabilities,
    token_maps,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_probabilities(features: np.ndarray, text: np.ndarray, temperature: float, normalize_text: bool):
    """[M, D], [2, D] -> [M, 2], one feature at a time, in float64."""
    out = np.empty((features.shape[0], 2))
    t = text / np.linalg.norm(text, axis=1, keepdims=True) if normalize_text else text
    for i, f in enumerate(features):
        f = f / np.sqrt(np.sum(f * f))
        logits = [float(np.dot(f, t[s])) / temperature for s in range(2)]
        top = max(logits)
        e = [np.exp(v - top) for v in logits]
        out[i] = [e[0] / (e[0] + e[1]), e[1] / (e[0] + e[1])]
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.07])
@pytest.mark.parametrize("normalize_text", [True, False])
def test_state_probabilities_match_a_float64_loop(temperature, normalize_text):
    features = torch.randn(3, 5, 16, generator=_gen(0)) * 3.0  # leading dims [3, 5]
    text = torch.randn(2, 16, generator=_gen(1)) * 2.0  # not unit: normalize_text matters
    probs = state_probabilities(features, text, temperature, normalize_text=normalize_text)
    assert probs.shape == (3, 5, 2) and probs.dtype == torch.float32
    ref = _reference_probabilities(features.reshape(-1, 16).double().numpy(), text.double().numpy(), temperature, normalize_text)
    # float32 against float64 probabilities: temperature 0.07 scales the cosines' rounding by
    # 1 / (2 x 0.07) = 7 (2.5e-7 seen with other CPU kernels): the suite's 1e-5 for probabilities
    np.testing.assert_allclose(probs.reshape(-1, 2).numpy(), ref, rtol=0, atol=1e-5)
    logits = cosine_logits(features, text, temperature, normalize_text=normalize_text)
    torch.testing.assert_close(logits.softmax(-1), probs, rtol=0, atol=0)


def test_normalize_text_changes_only_non_unit_text():
    features = torch.randn(4, 8, generator=_gen(2))
    text = torch.randn(2, 8, generator=_gen(3))
    assert not torch.allclose(cosine_logits(features, text), cosine_logits(features, text, normalize_text=False))
    unit = F.normalize(text, dim=-1)
    torch.testing.assert_close(cosine_logits(features, unit), cosine_logits(features, unit, normalize_text=False))


def test_heads_compute_in_float32_under_autocast():
    features = torch.randn(2, 6, 32, generator=_gen(4)).bfloat16()
    text = torch.randn(2, 32, generator=_gen(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = state_probabilities(features, text, 0.07)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, state_probabilities(features.float(), text, 0.07), rtol=0, atol=0)


def _bilinear_reference(grid_values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[gh, gw] -> [H, W] bilinear with align_corners=False (half-pixel centres, edge clamp)."""
    gh, gw = grid_values.shape
    out = np.empty(size)

    def source(dst: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        s = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    for y in range(size[0]):
        y0, y1, ly = source(y, gh, size[0])
        for x in range(size[1]):
            x0, x1, lx = source(x, gw, size[1])
            top = (1 - lx) * grid_values[y0, x0] + lx * grid_values[y0, x1]
            bottom = (1 - lx) * grid_values[y1, x0] + lx * grid_values[y1, x1]
            out[y, x] = (1 - ly) * top + ly * bottom
    return out


def test_token_maps_layout_and_bilinear_upsampling():
    grid, size = (3, 4), (12, 20)
    values = torch.rand(2, 12, 2, generator=_gen(6))  # [B, N, C], N = 3 * 4 row-major
    maps = token_maps(values, grid, size)
    assert maps.shape == (2, 2, 12, 20)
    # at the grid's own size the map is the tokens laid out row-major: token r * gw + c at [r, c]
    same = token_maps(values, grid, grid)
    for n in range(12):
        torch.testing.assert_close(same[:, :, n // 4, n % 4], values[:, n, :], rtol=0, atol=1e-7)
    for b in range(2):
        for c in range(2):
            ref = _bilinear_reference(values[b, :, c].double().numpy().reshape(grid), size)
            np.testing.assert_allclose(maps[b, c].numpy(), ref, rtol=0, atol=1e-6)
    # and what torch.nn.functional does on the [B, C, gh, gw] grid built by hand
    by_hand = values.permute(0, 2, 1).reshape(2, 2, *grid)
    expected = F.interpolate(by_hand, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps, expected, rtol=0, atol=0)


def test_patch_probability_maps_is_probabilities_on_the_grid():
    tokens = torch.randn(2, 6, 8, generator=_gen(7))
    text = torch.randn(2, 8, generator=_gen(8))
    maps = patch_probability_maps(tokens, text, (2, 3), (4, 6), 0.07)
    assert maps.shape == (2, 2, 4, 6)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 4, 6))
    torch.testing.assert_close(maps, token_maps(state_probabilities(tokens, text, 0.07), (2, 3), (4, 6)), rtol=0, atol=0)


def test_anomaly_map_averages_abnormal_and_not_normal():
    probs = torch.tensor([[[[0.2]], [[0.6]]]])  # [1, 2, 1, 1]: p_normal 0.2, p_abnormal 0.6
    torch.testing.assert_close(anomaly_map(probs), torch.tensor([[[0.7]]]))


def test_harmonic_mean_matches_scipy():
    values = [torch.rand(3, 4, generator=_gen(s)) + 0.05 for s in range(3)]
    ours = harmonic_mean(values)
    ref = hmean(np.stack([v.double().numpy() for v in values]), axis=0)
    assert ours.shape == (3, 4)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=0)


def test_harmonic_mean_of_a_zero_is_zero():
    out = harmonic_mean([torch.tensor([0.0, 0.5]), torch.tensor([0.8, 0.5])])
    assert out[0] == 0.0 and out[1] == pytest.approx(0.5)


@pytest.mark.parametrize("patch, size", [(14, 518), (16, 512), (32, 512)])
def test_default_image_size(patch, size):
    assert default_image_size(patch) == size
    assert size % patch == 0
