"""Generated anomaly-detection data: for checks and benchmarks that need no download.

Normal images are a smooth periodic texture over a per-image base colour with mild noise;
anomalous ones carry one square of uniform noise covering 1/9 to 1/4 of the image, with its
mask. :func:`synthetic_set` returns tensors; :func:`write_mvtec_tree` writes the same kind of
images as an MVTec AD tree (PNG), readable by :func:`clipad.data.mvtec_dataset` and ``clipad eval``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipad.errors import ClipadError


@dataclass
class SyntheticSet:
    """images: [N, 3, S, S] float32 in [0, 1]; labels: [N] int64 (1 = anomalous); masks: [N, S, S] bool."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


def synthetic_set(n: int, size: int, *, seed: int = 0, anomalous_fraction: float = 0.5) -> SyntheticSet:
    """``n`` generated images of ``size`` x ``size``; the first ``round(n * (1 - anomalous_fraction))``
    are normal, the rest anomalous. Deterministic in ``seed``."""
    if n < 1 or size < 8:
        raise ClipadError(f"synthetic_set needs n >= 1 and size >= 8; got n={n}, size={size}")
    if not 0.0 <= anomalous_fraction <= 1.0:
        raise ClipadError(f"anomalous_fraction must be in [0, 1]; got {anomalous_fraction}")
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    n_normal = round(n * (1.0 - anomalous_fraction))
    images = torch.empty(n, 3, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        base = torch.rand(3, 1, 1, generator=g) * 0.3 + 0.35
        phase = float(torch.rand((), generator=g)) * 2 * math.pi
        texture = 0.1 * torch.sin(2 * math.pi * (3 * xx + 2 * yy) + phase)
        img = base + texture[None] + 0.03 * torch.randn(3, size, size, generator=g)
        if i >= n_normal:
            side = size // 3 + int(torch.randint(0, max(1, size // 6), (1,), generator=g))
            y, x = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
            img[:, y : y + side, x : x + side] = torch.rand(3, side, side, generator=g)
            masks[i, y : y + side, x : x + side] = True
        images[i] = img.clamp(0, 1)
    labels = (torch.arange(n) >= n_normal).long()
    return SyntheticSet(images, labels, masks)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8."""
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_mvtec_tree(
    root: str | Path,
    classes: int | list[str] = 15,
    *,
    n_train: int = 8,
    n_good: int = 40,
    n_bad: int = 75,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write an MVTec AD tree of generated images under ``root`` and return ``root``.

    Per class: ``train/good`` (``n_train``), ``test/good`` (``n_good``), ``test/defect``
    (``n_bad``) with ``ground_truth/defect/<stem>_mask.png``. The defaults (15 classes, 115 test
    images each) give MVTec AD's size (1,725 test images) at 256 px.
    """
    names = [f"synth{i:02d}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    root = Path(root)
    for c, name in enumerate(names):
        train = synthetic_set(n_train, size, seed=seed * 1000 + 2 * c, anomalous_fraction=0.0) if n_train else None
        test = synthetic_set(n_good + n_bad, size, seed=seed * 1000 + 2 * c + 1, anomalous_fraction=n_bad / max(1, n_good + n_bad))
        for i in range(n_train if train is not None else 0):
            _save_png(_to_uint8(train.images[i]), root / name / "train" / "good" / f"{i:03d}.png")
        for i in range(len(test.labels)):
            if int(test.labels[i]) == 0:
                _save_png(_to_uint8(test.images[i]), root / name / "test" / "good" / f"{i:03d}.png")
            else:
                _save_png(_to_uint8(test.images[i]), root / name / "test" / "defect" / f"{i:03d}.png")
                _save_png(test.masks[i].numpy().astype(np.uint8) * 255, root / name / "ground_truth" / "defect" / f"{i:03d}_mask.png")
    return root
