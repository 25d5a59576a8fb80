"""Training losses of the learned methods (AnomalyCLIP, AdaptCLIP), as pure functions.

The definitions follow the official AnomalyCLIP code (zqhang/AnomalyCLIP @ 45ed4dd, ``loss.py``),
which AdaptCLIP reuses:

- :func:`focal_loss` takes *probabilities* (the maps are softmax outputs already), not logits.
  With its defaults (gamma 2, no class weights, label smoothing 1e-5) each pixel costs
  ``-(1 - p_t)^2 log(p_t)`` with ``p_t = (1 - s) q_t + s q_other + s``, ``s = 1e-5``, where
  ``q`` are the two class probabilities and ``t`` the target class; the loss is the mean over
  all pixels of the batch. The ``+ s`` keeps ``log`` finite; it can make ``p_t`` exceed 1 by
  1e-5, so a perfect pixel costs a hair below 0, as in the reference.
- :func:`dice_loss` is the "soft" Dice with smoothing 1:
  ``1 - mean_b (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``.
- :func:`image_cross_entropy` is plain cross-entropy on the image logits (cosine / temperature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidValueError


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss of class-probability maps.

    Args:
        probs: [B, C, H, W] class probabilities (e.g. softmax over {normal, abnormal}).
        target: [B, H, W] class indices as a float or integer tensor ({0, 1} masks).
        gamma: focusing exponent (2).
        smooth: label smoothing; the one-hot target is clamped to [smooth / (C - 1), 1 - smooth]
            and ``smooth`` is added to ``p_t`` (1e-5).
    Returns:
        scalar: mean over the B * H * W pixels.
    """
    c = probs.shape[1]
    if c < 2:
        raise InvalidValueError(f"focal_loss needs at least 2 classes (probs [B, C, H, W] with C >= 2); got probs of shape {tuple(probs.shape)}")
    flat = probs.movedim(1, -1).reshape(-1, c)
    idx = target.reshape(-1).long()
    one_hot = F.one_hot(idx, c).to(flat.dtype)
    if smooth:
        one_hot = one_hot.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(dim=1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss.

    Args:
        probs: [B, H, W] probabilities of one class.
        target: [B, H, W] {0, 1} mask of that class.
        smooth: added to numerator and denominator (1).
    Returns:
        scalar: ``1 - mean over the batch of (2 |p t| + smooth) / (|p| + |t| + smooth)``.
    """
    b = target.shape[0]
    p = probs.reshape(b, -1)
    t = target.reshape(b, -1).to(p.dtype)
    dice = (2.0 * (p * t).sum(dim=1) + smooth) / (p.sum(dim=1) + t.sum(dim=1) + smooth)
    return 1.0 - dice.sum() / b


def image_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of image logits [B, C] (cosine / temperature) against labels [B] -> scalar mean."""
    return F.cross_entropy(logits, labels.long())


def segmentation_loss(probs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-map loss of AnomalyCLIP / AdaptCLIP: focal on both classes, Dice on each.

    Args:
        probs: [B, 2, H, W] (normal, abnormal) probabilities.
        mask: [B, H, W] {0, 1} anomaly mask.
    Returns:
        (focal, dice(abnormal, mask), dice(normal, 1 - mask)), each a scalar.
    """
    return focal_loss(probs, mask), dice_loss(probs[:, 1], mask), dice_loss(probs[:, 0], 1.0 - mask)
