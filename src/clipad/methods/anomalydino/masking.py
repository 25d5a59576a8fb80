"""The official foreground mask of test images (``src/backbones.py:compute_background_mask``), batched.

For each image's patch features f [N, D]:

1. the centred scores on the first principal component, ``PCA(n_components=1).fit_transform(f)``;
   sklearn >= 1.5 orients the component so that its largest-magnitude *loading* is positive.
   The official code uses the randomized solver, unseeded (NumPy's global RNG); this module
   computes the exact component (float64 eigendecomposition of the D x D scatter matrix), which
   differs from randomized runs by ~1e-5, far below the threshold margins (quirks 4 and 9);
2. ``mask = score > threshold`` (absolute threshold, 10 in feature units);
3. if the centre box (rows ``int(0.2 gh)`` .. ``int(0.8 gh)``, columns likewise) keeps at most
   35 % of its patches, the sign is flipped: ``mask = -score > threshold`` (nothing checks whether
   the flipped mask is better);
4. 3 x 3 dilation, then 3 x 3 closing, applied by the official code to the (N, 1) *column* of
   patches: 1-D along raster order, wrapping across grid rows and ignoring vertical neighbours
   (quirk 3). Borders as cv2's: outside counts as unset for dilation and as set for erosion.
   ``morphology="grid"`` applies the same operations to the 2-D grid instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backbones.precision import float32_head

CENTRE_BORDER = 0.2
CENTRE_KEEP = 0.35


@float32_head
def first_component_scores(features: torch.Tensor) -> torch.Tensor:
    """[B, N, D] features -> [B, N] float64 centred scores on each image's first principal
    component, signed as sklearn >= 1.5 signs it (largest-|loading| entry positive)."""
    x = features.double()
    xc = x - x.mean(dim=1, keepdim=True)
    _, vecs = torch.linalg.eigh(xc.transpose(1, 2) @ xc)
    v = vecs[..., -1]  # [B, D], eigenvalues ascend
    lead = v.gather(1, v.abs().argmax(dim=1, keepdim=True))
    v = v * torch.where(lead < 0, -1.0, 1.0)
    return (xc @ v[..., None])[..., 0]


def _shift(m: torch.Tensor, step: int, fill: bool) -> torch.Tensor:
    """[B, N] bool shifted along N: out[i] = m[i - step], ``fill`` where i - step is outside."""
    pad = torch.full_like(m[:, :1], fill).expand(-1, abs(step))
    return torch.cat([pad, m[:, :-step]], 1) if step > 0 else torch.cat([m[:, -step:], pad], 1)


def raster_close(mask: torch.Tensor) -> torch.Tensor:
    """[B, N] bool -> dilation then closing with a 3-wide window along N (the official (N, 1) column)."""
    dilated = mask | _shift(mask, 1, False) | _shift(mask, -1, False)
    dilated2 = dilated | _shift(dilated, 1, False) | _shift(dilated, -1, False)
    return dilated2 & _shift(dilated2, 1, True) & _shift(dilated2, -1, True)


def grid_close(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N] bool -> 3 x 3 dilation then closing on the (gh, gw) grid (outside: unset for
    dilation, set for erosion, as cv2)."""
    m = mask.view(-1, 1, *grid).float()
    dil = F.max_pool2d(m, 3, stride=1, padding=1)  # zero padding never wins a max of {0, 1}
    dil = F.max_pool2d(dil, 3, stride=1, padding=1)
    ero = -F.max_pool2d(F.pad(-dil, (1, 1, 1, 1), value=-1.0), 3, stride=1)
    return (ero > 0.5).view(mask.shape)


def foreground_mask(
    features: torch.Tensor, grid: tuple[int, int], threshold: float = 10.0, morphology: str = "raster"
) -> torch.Tensor:
    """[B, N, D] patch features of a (gh, gw) grid -> [B, N] bool foreground mask (module docstring)."""
    scores = first_component_scores(features)
    mask = scores > threshold
    gh, gw = grid
    r0, r1 = int(gh * CENTRE_BORDER), int(gh * (1 - CENTRE_BORDER))
    c0, c1 = int(gw * CENTRE_BORDER), int(gw * (1 - CENTRE_BORDER))
    box = mask.view(-1, gh, gw)[:, r0:r1, c0:c1]
    flip = box.sum(dim=(1, 2)) <= box[0].numel() * CENTRE_KEEP
    mask = torch.where(flip[:, None], -scores > threshold, mask)
    return raster_close(mask) if morphology == "raster" else grid_close(mask, grid)
