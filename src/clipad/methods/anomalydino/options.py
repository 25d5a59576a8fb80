"""AnomalyDINO's options (defaults: the official ``run_anomalydino.py``'s, dammsi/AnomalyDINO @ b3435f0)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...errors import InvalidValueError
from ..base import Options


@dataclass(frozen=True)
class AnomalyDINOOptions(Options):
    """Options of :class:`~clipad.methods.anomalydino.AnomalyDINO`."""

    image_size: int | None = 448
    """Model input size: the *smaller edge* of every image is resized to it, the longer edge keeps
    the aspect ratio, and the result is cropped top-left to a multiple of the patch size (the
    official ``--resolution``, 448); None = 448."""
    resize: Literal["aspect", "square"] = "aspect"
    """"aspect": the official preprocessing above; "square": resize every image to
    ``image_size`` x ``image_size`` (clipad's usual input, e.g. for batches of mixed shapes)."""
    preprocess: Literal["agnostic", "informed", "masking_only", "agnostic_no_mask", "informed_no_mask"] = "agnostic"
    """The official ``--preprocess`` table that decides ``masking`` / ``rotation`` per category
    when they are None (MVTec AD and VisA category names; module docstring of :mod:`.model`)."""
    masking: bool | None = None
    """PCA foreground masking of test images; None = the ``preprocess`` table for the class."""
    rotation: bool | None = None
    """Reference augmentation by 8 rotations (0, 45, ..., 315 degrees); None = the
    ``preprocess`` table for the class given to ``set_reference``."""
    k_neighbors: int = 1
    """Nearest references per test patch; the patch distance is the mean of their distances."""
    top_percent: float = 0.01
    """Image score = mean of the ``int(top_percent * N)`` largest of the N patch distances
    (masked patches count, as 0); the maximum when that count is 0."""
    smoothing_sigma: float = 4.0
    """Gaussian sigma (pixels) of the full-resolution map, applied at the output size; 0 = none."""
    mask_threshold: float = 10.0
    """Foreground: first-principal-component score above this (absolute, in feature units)."""
    mask_morphology: Literal["raster", "grid"] = "raster"
    """"raster": the official 3x3 dilation then closing applied to the (N, 1) column of patches,
    i.e. 1-D along raster order (wrapping across rows); "grid": the same on the 2-D patch grid."""
    memory_chunk: int = 1 << 25
    """Most distance-matrix entries computed at once (query patches x reference patches); bounds
    memory, not results."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k_neighbors < 1:
            raise InvalidValueError(f"option k_neighbors must be >= 1; got {self.k_neighbors}")
        if not 0.0 < self.top_percent <= 1.0:
            raise InvalidValueError(f"option top_percent must be in (0, 1]; got {self.top_percent}")
        if self.smoothing_sigma < 0:
            raise InvalidValueError(f"option smoothing_sigma must be >= 0 (0 = no smoothing); got {self.smoothing_sigma}")
        if self.memory_chunk < 1:
            raise InvalidValueError(f"option memory_chunk must be >= 1; got {self.memory_chunk}")
