"""Training losses against independent references: explicit per-pixel formulas in float64 NumPy
(the definitions of the official AnomalyCLIP ``loss.py``), scikit-learn's log loss, and limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from clipad.components.losses import dice_loss, focal_loss, image_cross_entropy, segmentation_loss


def _probs(b: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(b, 2, h, w, generator=g).softmax(dim=1)
    target = (torch.rand(b, h, w, generator=g) > 0.7).float()
    return probs, target


def _focal_reference(probs: np.ndarray, target: np.ndarray, gamma: float = 2.0, s: float = 1e-5) -> float:
    total, n = 0.0, 0
    b, c, h, w = probs.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                q = probs[i, :, y, x]
                pt = (1 - s) * q[t] + (s / (c - 1)) * (q.sum() - q[t]) + s
                total += -((1 - pt) ** gamma) * np.log(pt)
                n += 1
    return total / n


def test_focal_matches_per_pixel_formula():
    probs, target = _probs(2, 5, 6, seed=0)
    ref = _focal_reference(probs.double().numpy(), target.numpy())
    assert abs(focal_loss(probs, target).item() - ref) < 1e-6


def test_focal_limits():
    probs, target = _probs(2, 4, 4, seed=1)
    # gamma 0 and no smoothing: plain negative log-likelihood of the target class
    nll = torch.nn.functional.nll_loss(probs.log(), target.long())
    assert abs(focal_loss(probs, target, gamma=0.0, smooth=0.0).item() - nll.item()) < 1e-6
    # a perfect prediction costs (almost) nothing: p_t = 1 - 1e-5 + 1e-5 -> log of ~1
    perfect = torch.stack([1 - target, target], dim=1)
    assert abs(focal_loss(perfect, target).item()) < 1e-9


def test_dice_matches_formula_and_limits():
    probs, target = _probs(3, 7, 5, seed=2)
    p, t = probs[:, 1].double().numpy().reshape(3, -1), target.double().numpy().reshape(3, -1)
    ref = 1 - np.mean((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1))
    assert abs(dice_loss(probs[:, 1], target).item() - ref) < 1e-6
    assert dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-7)
    empty = torch.zeros(2, 4, 4)
    assert dice_loss(empty, empty).item() == pytest.approx(0.0, abs=1e-7)  # smoothing: empty vs empty is perfect


def test_image_cross_entropy_matches_sklearn():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 2, generator=g) * 5
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    ref = log_loss(labels.numpy(), logits.double().softmax(dim=1).numpy(), labels=[0, 1])
    assert abs(image_cross_entropy(logits, labels).item() - ref) < 1e-5


def test_segmentation_loss_terms():
    probs, target = _probs(2, 6, 6, seed=4)
    focal, dice_a, dice_n = segmentation_loss(probs, target)
    assert focal == focal_loss(probs, target)
    assert dice_a == dice_loss(probs[:, 1], target) and dice_n == dice_loss(probs[:, 0], 1 - target)
