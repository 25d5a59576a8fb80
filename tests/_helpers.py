"""Small helpers shared by the method test files (imported as ``from _helpers import ...``)."""

from __future__ import annotations

import warnings

import torch

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
