"""Turn what users pass to ``predict`` into model-sized batches, and maps back into image sizes.

Accepted inputs: a float tensor [B, 3, H, W] (or [3, H, W]) in [0, 1], a list of ``PIL.Image``,
a list of file paths, or a list mixing those (sizes may differ within a list).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ClipadError

ImageInput = torch.Tensor | Image.Image | str | os.PathLike


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 in [0, 1]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def as_image_list(images: torch.Tensor | Sequence[ImageInput] | ImageInput) -> list[torch.Tensor]:
    """Normalise any accepted input into a list of [3, H, W] float tensors in [0, 1].

    Raises:
        ImageReadError: a path that cannot be read as an image.
        ClipadError: a tensor of the wrong shape or an unsupported element type.
    """
    from .images import load_image

    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ClipadError(f"images tensor must be [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ClipadError(f"images tensor must be float in [0, 1]; got dtype {images.dtype}")
        if images.shape[0] == 0:
            raise ClipadError("no images given (the images tensor has batch size 0)")
        if images.shape[-2] == 0 or images.shape[-1] == 0:
            raise ClipadError(f"images tensor has an empty image size; got shape {tuple(images.shape)}")
        if not bool(torch.isfinite(images).all()):
            raise ClipadError("images tensor contains NaN or infinite values")
        return list(images.unbind(0))
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    out: list[torch.Tensor] = []
    for i, item in enumerate(images):
        if isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] != 3 or not item.is_floating_point() or 0 in item.shape:
                raise ClipadError(f"images[{i}] must be a float [3, H, W] tensor; got {tuple(item.shape)} {item.dtype}")
            out.append(item)
        elif isinstance(item, Image.Image):
            out.append(pil_to_tensor(item))
        elif isinstance(item, (str, os.PathLike, Path)):
            out.append(pil_to_tensor(load_image(item)))
        else:
            raise ClipadError(f"images[{i}] has unsupported type {type(item).__name__}; pass a tensor, PIL image or path")
    if not out:
        raise ClipadError("no images given")
    for i, t in enumerate(out):
        if not bool(torch.isfinite(t).all()):
            raise ClipadError(f"images[{i}] contains NaN or infinite values")
    return out


def resize_batch(images: list[torch.Tensor], size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """List of [3, H, W] -> [B, 3, h, w] on ``device``: bicubic with antialiasing, as torchvision's
    ``Resize(..., antialias=True)`` on tensors; images already at ``size`` are left untouched.
    Images of one shape are copied and resized as one batch (one kernel, not one per image)."""
    size = tuple(size)
    if len({tuple(t.shape) for t in images}) == 1:
        x = torch.stack(images).to(device, non_blocking=True)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        return x
    out = []
    for img in images:
        img = img.to(device, non_blocking=True)
        if tuple(img.shape[-2:]) != size:
            img = F.interpolate(img.unsqueeze(0), size=size, mode="bicubic", antialias=True, align_corners=False)[0]
        out.append(img)
    return torch.stack(out)


def resize_map(amap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., h, w] maps -> [..., H, W] float by bilinear interpolation (identity when sizes agree)."""
    if tuple(amap.shape[-2:]) == tuple(size):
        return amap
    flat = amap.reshape(-1, 1, *amap.shape[-2:]).float()
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*amap.shape[:-2], *size)


def equal_runs(keys: Sequence) -> list[tuple[int, int]]:
    """Maximal runs of equal consecutive keys as (start, stop) pairs, in order: images of one input
    size are batched together without reordering (order-dependent modes see input order)."""
    runs, i = [], 0
    while i < len(keys):
        j = i + 1
        while j < len(keys) and keys[j] == keys[i]:
            j += 1
        runs.append((i, j))
        i = j
    return runs
