"""Turn what users pass to ``predict`` into model-sized batches, and maps back into image sizes.

Accepted inputs: a tensor [B, 3, H, W] (or [3, H, W]), a list of ``PIL.Image``, a list of file
paths, or a list mixing those (sizes may differ within a list). Tensors are

- floating point (any float dtype, converted to float32) with values in [0, 1] (up to
  :func:`range_tolerance`): other ranges are rejected with the fix, since a 0..255 or -1..1
  image would otherwise give meaningless scores without any error;
- or ``uint8`` pixel values 0..255, divided by 255.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InvalidTypeError, InvalidValueError

ImageInput = torch.Tensor | Image.Image | str | os.PathLike


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 in [0, 1]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def range_tolerance(dtype: torch.dtype) -> float:
    """How far outside [0, 1] a float image of ``dtype`` may stray and still count as a [0, 1] image.

    Arithmetic on [0, 1] data (un-normalising ``x * std + mean``, colour conversions) lands a few
    rounding steps outside the range: 1e-3 covers float32/float64 with a wide margin, and two ulps
    at 1.0 cover float16 (~2e-3) and bfloat16 (~0.016). A 0..255 or -1..1 image strays by far more.
    """
    return max(1e-3, 2 * torch.finfo(dtype).eps)


def _range_fix(lo: float, hi: float, tol: float) -> str:
    """What to do about a float image whose values span [lo, hi] (not within [0, 1])."""
    slight = lo >= -0.1 and hi <= 1.1  # bicubic resizing of a [0, 1] image overshoots by a few percent
    if lo >= -1.0 - tol and hi <= 1.0 + tol:
        if slight:
            return ("if it is a [0, 1] image pushed slightly out (e.g. by bicubic resizing) pass x.clamp(0, 1); "
                    "if it is a [-1, 1] image pass (x + 1) / 2")
        return "it looks like a [-1, 1] image: pass (x + 1) / 2"
    if slight:
        return "it is slightly outside [0, 1] (e.g. bicubic resizing overshoots): pass x.clamp(0, 1)"
    if lo >= -tol and hi <= 255.0 + tol:
        return "it looks like 0..255 pixel values: pass x / 255 (or the uint8 tensor itself)"
    if lo >= -3.0 and hi <= 3.0:
        return ("it looks mean/std-normalised: pass the image before normalisation (clipad normalises "
                "with the backbone's own mean and std)")
    return "rescale it to [0, 1]"


def _as_unit_float(t: torch.Tensor, what: str) -> torch.Tensor:
    """A uint8 or float image tensor -> float32 in [0, 1]; anything else is an error.

    One ``aminmax`` (a single device sync) checks both finiteness (NaN and inf propagate into it)
    and the range.
    """
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if not t.is_floating_point():
        raise InvalidTypeError(
            f"{what} has dtype {t.dtype}; pass a float tensor in [0, 1] or a uint8 tensor of 0..255 pixel "
            "values (e.g. x.float() / 255 for integer pixel values)"
        )
    tol = range_tolerance(t.dtype)
    # One dtype downstream: CPU kernels (bicubic resizing among them) do not all exist for half
    # types, and the model's precision is the detector's (autocast), not the input's
    t = t.float()
    lo, hi = (float(v) for v in torch.stack(torch.aminmax(t)).tolist())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InvalidValueError(f"{what} contains NaN or infinite values; replace them (e.g. torch.nan_to_num) or drop the image")
    if lo < -tol or hi > 1.0 + tol:
        raise InvalidValueError(
            f"{what} has values in [{lo:.4g}, {hi:.4g}], but images must be in [0, 1] (tolerance {tol:.3g}): "
            f"{_range_fix(lo, hi, tol)}"
        )
    return t


def as_image_list(images: torch.Tensor | Sequence[ImageInput] | ImageInput) -> list[torch.Tensor]:
    """Normalise any accepted input into a list of [3, H, W] float32 tensors in [0, 1].

    Tensors: [B, 3, H, W] or [3, H, W], float in [0, 1] (any float dtype; converted to float32)
    or uint8 in 0..255 (divided by 255); see the module docstring.

    Raises:
        ImageReadError: a path that cannot be read as an image.
        InvalidValueError: a tensor out of [0, 1] (the message says how to rescale it), with NaN or
            infinite values, of the wrong shape, or no images at all.
        InvalidTypeError: a tensor of another dtype, or an unsupported element type.
    """
    from .images import load_image

    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidValueError(f"images tensor must be [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise InvalidValueError("no images given (the images tensor has batch size 0)")
        if images.shape[-2] == 0 or images.shape[-1] == 0:
            raise InvalidValueError(f"images tensor has an empty image size; got shape {tuple(images.shape)}")
        return list(_as_unit_float(images, "images tensor").unbind(0))
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    out: list[torch.Tensor] = []
    for i, item in enumerate(images):
        if isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] != 3 or 0 in item.shape:
                raise InvalidValueError(f"images[{i}] must be a [3, H, W] tensor in [0, 1]; got shape {tuple(item.shape)}")
            out.append(_as_unit_float(item, f"images[{i}]"))
        elif isinstance(item, Image.Image):
            out.append(pil_to_tensor(item))
        elif isinstance(item, (str, os.PathLike, Path)):
            out.append(pil_to_tensor(load_image(item)))
        else:
            raise InvalidTypeError(f"images[{i}] has unsupported type {type(item).__name__}; pass a tensor, PIL image or path")
    if not out:
        raise InvalidValueError("no images given")
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
