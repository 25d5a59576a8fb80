"""AdaptCLIP's options (defaults: the official scripts, gaobb/AdaptCLIP @ 354d9e3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...errors import InvalidValueError
from ..anomalyclip.options import check_context, check_positive, check_taps
from ..base import LearnedOptions


@dataclass(frozen=True)
class AdaptCLIPOptions(LearnedOptions):
    """Options of :class:`~clipad.methods.adaptclip.AdaptCLIP` (``image_size`` None = 518 px, or
    the nearest multiple of the patch size where the patch does not divide 518, e.g. 512 on
    ``tiny`` and ViT-B-16+)."""

    taps: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    """V-V layers as fractions of the depth (6/12/18/24 of 24); the textual and visual adapters
    use the last one, the prompt-query adapter all."""
    dpam_layer: float | None = 20 / 24
    """The official ``DPAM_layer`` as a fraction of the depth (20/24: the last round(f x depth) - 1
    blocks are dual-path); None = no dual path (vanilla tokens)."""
    n_ctx: int = 12
    """Context vectors per learned prompt."""
    va_reduction: int = 4
    """Hidden width divisor of the visual adapter's MLPs."""
    pq_mid_dim: int = 128
    """First hidden width of the prompt-query heads."""
    pq_context: bool = True
    """Joint feature ``q + |q - aligned|`` (the scripts' ``--pq_context``); False: ``|q - aligned|``."""
    temperature: float = 0.07
    """Softmax temperature."""
    sigma: float = 4.0
    """Gaussian smoothing of the map in pixels (0 = none)."""
    global_ln_post: bool = False
    """Apply ``ln_post`` to the global CLS token (False, official)."""
    exact_taps: bool = False
    """Read a tap before the first dual-path block after its own block, not the official alias of
    the final V-V state (see the model's module docstring)."""
    schedule: Literal["released", "alternate"] = "released"
    """"released": the official joint step; "alternate": visual and textual adapters updated on
    alternate steps (clipad's extension)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_taps(self.taps)
        if self.dpam_layer is not None and not 0.0 < self.dpam_layer <= 1.0:
            raise InvalidValueError(f"option dpam_layer must be a fraction of the depth in (0, 1] or None; got {self.dpam_layer}")
        check_context("n_ctx", self.n_ctx, 1)
        if self.va_reduction < 1:
            raise InvalidValueError(f"option va_reduction must be >= 1; got {self.va_reduction}")
        if not 2 <= self.pq_mid_dim <= 4096:  # sizes the heads' weights: bounded before they are allocated
            raise InvalidValueError(f"option pq_mid_dim must be in [2, 4096] (official: 128); got {self.pq_mid_dim}")
        check_positive("temperature", self.temperature)
        if self.sigma < 0:
            raise InvalidValueError(f"option sigma must be >= 0 (0 = no smoothing); got {self.sigma}")
