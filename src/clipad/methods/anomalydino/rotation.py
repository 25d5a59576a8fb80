"""The official reference augmentation: rotations of the raw uint8 image (``src/utils.py:rotate_image``).

``cv2.warpAffine(img, cv2.getRotationMatrix2D((W/2, H/2), angle, 1), (W, H), INTER_LINEAR,
BORDER_DEFAULT)`` for each angle of 0, 45, ..., 315 degrees (counter-clockwise), computed here in
torch, batched, on any device:

- the centre is (W/2, H/2), not the centre of the pixel grid ((W-1)/2, (H-1)/2): 90/180/270 are
  ``rot90`` shifted by one pixel, the first row or column filled by reflection (quirk 1);
- bilinear on uint8 values, border ``BORDER_REFLECT_101`` (``gfedcb|abcdefgh|gfedcba``), rounded
  back to uint8 (quirk 2); the output keeps the input's H x W, corners hold reflected content.

OpenCV (>= 4.11, here 5.1) inverts the matrix in float64, then maps and interpolates in float32
with fused multiply-adds (``modules/imgproc/src/warp_kernels.simd.hpp``); this module performs the
same float32 roundings (emulated in float64; the last ``W mod 16`` columns as its scalar loop
rounds them) and rounds half to even, and matches cv2 5.1 (AVX2 dispatch) pixel for pixel on the
images tested (uniform noise of several odd sizes and the fixture images, all 8 angles). Other
builds of cv2 are not bit-identical to each other: with another vector width (AVX-512, SSE) the
scalar columns move, and OpenCV < 4.11 used a fixed-point path (1/32-pixel coordinates); each
differs by one level on about 1 pixel in 2,000 at the diagonal angles.
"""

from __future__ import annotations

import math

import torch

ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)
#: pixels per vector step of cv2's AVX2 kernels (the dispatch x86-64 CPUs take); the remaining
#: columns run a scalar loop that rounds differently
CV_VECTOR_STEP = 16


def _inverse_rotation(h: int, w: int, angle: float) -> list[float]:
    """cv2.getRotationMatrix2D((w/2, h/2), angle, 1) inverted as cv2.warpAffine inverts it (float64):
    dst (x, y) samples src (m0 x + m1 y + m2, m3 x + m4 y + m5)."""
    cx, cy = w / 2, h / 2
    rad = angle * math.pi / 180.0
    alpha, beta = math.cos(rad), math.sin(rad)
    m = [alpha, beta, (1 - alpha) * cx - beta * cy, -beta, alpha, beta * cx + (1 - alpha) * cy]
    det = m[0] * m[4] - m[1] * m[3]
    det = 1.0 / det if det != 0 else 0.0
    a11, a22 = m[4] * det, m[0] * det
    m[0], m[1], m[3], m[4] = a11, -m[1] * det, -m[3] * det, a22
    m[2], m[5] = -m[0] * m[2] - m[1] * m[5], -m[3] * m[2] - m[4] * m[5]
    return m


def _reflect101(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices folded into 0..n-1 by BORDER_REFLECT_101 (the edge pixel is not repeated)."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * n - 2
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).to(torch.float64)


def rotate_uint8(images: torch.Tensor, angle: float) -> torch.Tensor:
    """uint8 images [B, C, H, W] -> the same rotated by ``angle`` degrees (counter-clockwise)
    about (W/2, H/2), as ``cv2.warpAffine`` with ``INTER_LINEAR`` and ``BORDER_REFLECT_101``."""
    b, c, h, w = images.shape
    if angle % 360 == 0:
        return images.clone()
    m = _inverse_rotation(h, w, angle)
    dev = images.device
    ys = torch.arange(h, dtype=torch.float64, device=dev)[:, None]
    xs = torch.arange(w, dtype=torch.float64, device=dev)[None, :]
    # as cv2's kernels: the matrix in float32, the row term float32(float32(y m1) + m2), then one
    # fused multiply-add m0 x + row (the product is exact in float64, so a single rounding)
    m = [float(v) for v in _f32(torch.tensor(m, dtype=torch.float64))]
    sx = _f32(xs * m[0] + _f32(_f32(ys * m[1]) + m[2]))
    sy = _f32(xs * m[3] + _f32(_f32(ys * m[4]) + m[5]))
    # the last W mod 16 columns run cv2's scalar loop, compiled as fma(x, m0, y m1) + m2
    tail = xs >= w - w % CV_VECTOR_STEP
    sx = torch.where(tail, _f32(_f32(xs * m[0] + _f32(ys * m[1])) + m[2]), sx)
    sy = torch.where(tail, _f32(_f32(xs * m[3] + _f32(ys * m[4])) + m[5]), sy)
    x0, y0 = torch.floor(sx), torch.floor(sy)
    ax, ay = _f32(sx - x0), _f32(sy - y0)
    x0, y0 = x0.long(), y0.long()
    xa, xb = _reflect101(x0, w), _reflect101(x0 + 1, w)
    ya, yb = _reflect101(y0, h), _reflect101(y0 + 1, h)
    src = images.to(torch.float64).reshape(b, c, h * w)

    def tap(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return src[:, :, (yy * w + xx).reshape(-1)].reshape(b, c, h, w)

    p00, p01, p10, p11 = tap(ya, xa), tap(ya, xb), tap(yb, xa), tap(yb, xb)
    top = _f32(p00 + ax * (p01 - p00))  # fused multiply-adds: one float32 rounding each
    bottom = _f32(p10 + ax * (p11 - p10))
    out = _f32(top + ay * _f32(bottom - top))
    return torch.round(out).clamp_(0, 255).to(torch.uint8)


def rotations(images: torch.Tensor, angles=ANGLES) -> torch.Tensor:
    """[B, 3, H, W] float images in [0, 1] -> [B * len(angles), 3, H, W]: each image's rotations
    (image-major, angles in order), computed on the uint8 pixels ``round(255 x)`` and returned as
    uint8 / 255, as the official code feeds them to its preprocessing."""
    u8 = torch.round(images.clamp(0, 1) * 255).to(torch.uint8)
    out = torch.stack([rotate_uint8(u8, a) for a in angles], dim=1)
    return out.flatten(0, 1).float().div_(255.0)
