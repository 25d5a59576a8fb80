"""The official AnomalyCLIP / AdaptCLIP scripts' preprocessing, in PIL: images resized bicubic to
the model size, masks resized bilinear and binarised at 0.5.

Both official ``train.py`` and ``test.py`` build it the same way (``utils.get_transform``):
images ``Resize((S, S), BICUBIC)`` + ``ToTensor`` (+ CLIP normalisation), masks as 0/255 ``L``
images ``Resize((S, S))`` (bilinear, torchvision's default) + ``ToTensor`` then ``> 0.5``. On PIL
images torchvision's ``Resize`` is PIL's ``Image.resize``, which is what this module calls.
Training always reads data this way; ``clipad eval --resize pil`` does too (the default
evaluation resizes with :func:`clipad.data.transforms.resize_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from PIL import Image


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def pil_resize_to_tensor(image: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """PIL image -> [3, h, w] float in [0, 1]: PIL bicubic resize to ``size`` (S or (h, w)), then
    RGB, as the official ``Resize((S, S), BICUBIC)`` + ``ToTensor`` (CLIP normalisation is the
    detector's)."""
    h, w = _hw(size)
    if image.size != (w, h):
        image = image.resize((w, h), Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def official_image_transform(size: int | tuple[int, int]) -> Callable[[Image.Image], torch.Tensor]:
    """:func:`pil_resize_to_tensor` at a fixed ``size``: PIL image -> [3, h, w] float in [0, 1].
    A ``functools.partial``, so DataLoader workers can pickle it under any start method."""
    return partial(pil_resize_to_tensor, size=size)


def official_mask(mask: torch.Tensor | None, size: int | tuple[int, int]) -> torch.Tensor:
    """bool [H, W] mask (or None) -> float [h, w] in {0, 1}: a 0/255 image resized with PIL
    bilinear, then ``> 0.5`` of the range, as the official ``Resize`` + ``ToTensor`` + threshold.
    None (an anomalous image without a mask) gives an all-normal mask, as the official loader."""
    h, w = _hw(size)
    if mask is None or not bool(mask.any()):
        return torch.zeros(h, w)
    img = Image.fromarray(mask.numpy().astype(np.uint8) * 255)  # uint8 [H, W]: mode "L"
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img) > 127).float()
