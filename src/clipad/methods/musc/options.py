"""MuSc's options (defaults: the official ``configs/musc.yaml`` for MVTec AD)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidValueError
from ..base import Options


@dataclass(frozen=True)
class MuScOptions(Options):
    """Options of :class:`~clipad.methods.musc.MuSc`."""

    image_size: int | None = None
    """Model input size in pixels; None = 518 (the official ``img_resize``), or the nearest
    multiple of a backbone's patch size that does not divide 518."""
    layers: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    """Taps as fractions of the backbone's depth: blocks 6/12/18/24 of ViT-L/14 (the official
    ``feature_layers [5, 11, 17, 23]``, 0-based)."""
    r_list: tuple[int, ...] = (1, 3, 5)
    """Aggregation degrees of LNAMD: each r x r neighbourhood (odd r) of patch tokens is averaged;
    the maps of all degrees are averaged."""
    interval: tuple[float, ...] = (0.0, 0.3)
    """(low, high) fractions of the N - 1 other images: each patch's score is the mean of its
    ``int(low (N-1))``-th to ``int(high (N-1))``-th smallest per-image minimum distances (the
    official ``topmin_min 0`` / ``topmin_max 0.3``). Sets the fewest images a set needs."""
    k_list: tuple[int, ...] = (1, 2, 3)
    """Neighbourhood sizes of RsCIN's re-scoring by class-token similarity: (1, 2, 3) is the
    official choice for MVTec AD and other data, (1, 8, 9) for VisA; () = no re-scoring (image
    score = max of the map, not normalised over the set)."""
    divide_num: int = 1
    """Split the set into this many subsets, each scored by mutual scoring on its own (image i
    goes to subset i mod divide_num); RsCIN still runs over the whole set. 1 = the whole set
    (official default)."""
    chunk_mb: int = 256
    """Upper bound in MiB of one block of patch-to-patch distances in mutual scoring; bounds
    memory, not results."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers or any(not 0.0 < t <= 1.0 for t in self.layers):
            raise InvalidValueError(
                f"option layers must be a non-empty list of depth fractions in (0, 1]; got {list(self.layers)}")
        if not self.r_list or any(r < 1 or r % 2 == 0 for r in self.r_list):
            raise InvalidValueError(
                f"option r_list must be a non-empty list of odd degrees >= 1 (e.g. 1, 3, 5); got {list(self.r_list)}")
        if len(self.interval) != 2 or not 0.0 <= self.interval[0] < self.interval[1] < 1.0:
            raise InvalidValueError(
                f"option interval must be two fractions 0 <= low < high < 1 (default 0 0.3); got {list(self.interval)}")
        if any(k < 1 for k in self.k_list):
            raise InvalidValueError(
                f"option k_list must hold neighbourhood sizes >= 1, or be empty (no re-scoring); got {list(self.k_list)}")
        if self.divide_num < 1:
            raise InvalidValueError(f"option divide_num must be >= 1; got {self.divide_num}")
        if self.chunk_mb < 1:
            raise InvalidValueError(f"option chunk_mb must be >= 1 (MiB); got {self.chunk_mb}")
