"""Head math shared by the methods: two-class cosine probabilities, patch probability maps,
fusion means and default input sizes. Pure tensor functions; no method's name in the code.

Contracts: text rows are states in the order (normal, abnormal); token inputs are patch tokens
**without** the CLS row (callers slice ``tokens[:, 1:]``), row-major on the patch grid.

Each official implementation computes these heads in its own order (normalising the text or
not, dividing by a temperature or not); the parameters below reproduce each order exactly
rather than one "equivalent" formula, because the fidelity fixtures compare at 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..backbones.precision import float32_head

PAPER_IMAGE_SIZE = 518  # AnomalyCLIP, AdaptCLIP and TokenCLIP test at 518 px on ViT-L/14-336


def default_image_size(patch: int, target: int = PAPER_IMAGE_SIZE) -> int:
    """The paper's 518 px where the patch size divides it, else the nearest multiple of the patch."""
    return target if target % patch == 0 else max(patch, round(target / patch) * patch)


@float32_head
def cosine_logits(
    features: torch.Tensor, text: torch.Tensor, temperature: float = 1.0, *, normalize_text: bool = True
) -> torch.Tensor:
    """[..., D] features, [S, D] state text (S = 2: normal, abnormal) -> [..., S] ``cos / temperature``.

    Computed in float32 with autocast off, as ``normalize(features) @ text.T / temperature``.

    Args:
        temperature: divisor of the cosines; 1.0 = raw cosines (``x / 1.0`` is exact).
        normalize_text: normalise the text rows first; False when they are already unit
            vectors and the reference code does not renormalise them (bit-for-bit).
    """
    t = F.normalize(text.float(), dim=-1) if normalize_text else text.float()
    return F.normalize(features.float(), dim=-1) @ t.T / temperature


@float32_head
def state_probabilities(
    features: torch.Tensor, text: torch.Tensor, temperature: float = 1.0, *, normalize_text: bool = True
) -> torch.Tensor:
    """[..., D] features, [2, D] (normal, abnormal) text -> [..., 2] ``softmax(cos / temperature)``.

    ``[..., 1]`` is the abnormal probability. Arguments as :func:`cosine_logits`.
    """
    return cosine_logits(features, text, temperature, normalize_text=normalize_text).softmax(dim=-1)


def token_maps(values: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Per-token values [B, N, C] on a row-major (gh, gw) grid, N = gh * gw -> [B, C, H, W]
    upsampled bilinearly (align_corners=False) to ``size`` = (H, W).

    One value per token ([B, N]): pass ``values[..., None]`` and take ``[:, 0]``.
    """
    b, _, c = values.shape
    maps = values.transpose(1, 2).reshape(b, c, *grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def patch_probability_maps(
    tokens: torch.Tensor,
    text: torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    temperature: float,
    *,
    normalize_text: bool = True,
) -> torch.Tensor:
    """Patch tokens [B, N, D] (no CLS), [2, D] (normal, abnormal) text -> [B, 2, H, W]
    :func:`state_probabilities` on the patch grid, upsampled by :func:`token_maps` to ``size``."""
    return token_maps(state_probabilities(tokens, text, temperature, normalize_text=normalize_text), grid, size)


def anomaly_map(probs: torch.Tensor) -> torch.Tensor:
    """[B, 2, H, W] (normal, abnormal) probabilities -> [B, H, W] ``(p_abnormal + 1 - p_normal) / 2``."""
    return (probs[:, 1] + 1.0 - probs[:, 0]) / 2.0


def harmonic_mean(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """n same-shaped tensors -> their elementwise harmonic mean ``n / sum(1 / x)``, same shape.

    A zero entry gives 0 (1 / 0 = inf in the sum), as the reference implementations; NaN or inf
    cleanup, where a method needs it, is the caller's.
    """
    stacked = torch.stack(list(values))
    return stacked.shape[0] / (1.0 / stacked).sum(dim=0)
