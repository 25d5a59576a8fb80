"""Small helpers shared by the method test files (imported as ``from _helpers import ...``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clipad


def tiny_detector(method: str, **options) -> clipad.Detector:
    """``method`` on the random ``tiny`` backbone, on CPU, without the random-weights warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return clipad.create_detector(method, backbone="tiny", pretrained=None, device="cpu", **options)


def random_images(n: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    """[n, 3, h, w] uniform images in [0, 1] from a seeded generator."""
    return torch.rand(n, 3, h, h if w is None else w, generator=torch.Generator().manual_seed(seed))


def report_max_diff(method: str, name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Max |ours - theirs| after checking shapes; printed so `pytest -s` shows the fidelity figures."""
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    diff = (ours.float() - theirs.float()).abs().max().item()
    print(f"{method} fidelity: {name}: max |diff| {diff:.2e}")
    return diff


def write_folder_dataset(root: Path, n_normal: int = 6, n_abnormal: int = 6, size: int = 48, seed: int = 0) -> None:
    """A folder-layout dataset (good/, bad/, masks/) of smooth noise images; anomalous ones carry
    a bright square, with its mask."""
    rng = np.random.default_rng(seed)
    for d in ("good", "bad", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n_normal + n_abnormal):
        img = (rng.random((size // 8, size // 8, 3)) * 120 + 60).astype(np.uint8)
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)).copy()
        if i < n_normal:
            Image.fromarray(img).save(root / "good" / f"{i:02d}.png")
            continue
        y, x = rng.integers(4, size - 20, size=2)
        img[y : y + 16, x : x + 16] = 255
        mask = np.zeros((size, size), np.uint8)
        mask[y : y + 16, x : x + 16] = 255
        Image.fromarray(img).save(root / "bad" / f"{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:02d}.png")
