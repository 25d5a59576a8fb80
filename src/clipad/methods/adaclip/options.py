"""AdaCLIP's options (defaults: the official ``test.py`` / ``train.py``, caoyunkang/AdaCLIP @ e27ee32)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidValueError
from ..anomalyclip.options import check_taps
from ..base import LearnedOptions

#: Bounds checked before anything is allocated (the official values are 4, 5 and 20).
MAX_PROMPT_DEPTH = 64
MAX_PROMPT_LENGTH = 32
MAX_CLUSTERS = 1024


@dataclass(frozen=True)
class AdaCLIPOptions(LearnedOptions):
    """Options of :class:`~clipad.methods.adaclip.AdaCLIP` (``image_size`` None = 518 px, or the
    nearest multiple of the patch size where the patch does not divide 518, e.g. 512 on ``tiny``)."""

    prompt_depth: int = 4
    """J: blocks 0..J-1 of the image tower and 1..J-1 of the text tower take prompts (the scripts'
    ``--prompting_depth 4``); also the number of static prompt sets per tower. Absolute, as the
    official code: a shallower tower uses the sets it has blocks for."""
    prompt_length: int = 5
    """M: prompt tokens per layer (``--prompting_length 5``)."""
    taps: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    """Layers of the maps as fractions of the depth (6/12/18/24 of 24: the official ``n // 4 * k``)."""
    hsf: bool = True
    """Hybrid semantic fusion of the top patches into the image score (``--use_hsf True``); False:
    the projected global feature alone."""
    n_clusters: int = 20
    """K of the fusion's k-means (``--k_clusters 20``); it clusters the 5 K most abnormal patches."""
    hsf_alpha: float = 0.2
    """Weight of the fused cluster feature against the global feature (official 0.2)."""
    kmeans_seed: int = 0
    """``random_state`` of the fusion's sklearn KMeans, the same for every image. The official code
    passes None (the numpy global generator: scores depend on the processing order); a fixed seed
    makes a score a function of its image."""
    prompt_fp16: bool = True
    """Round the prompt contexts to float16 before inserting them, as the official ``.half()``
    does even in float32 runs; False keeps them in the stream's precision."""
    sigma: float = 4.0
    """Gaussian smoothing of the map in pixels (0 = none)."""
    dice_rows: bool = True
    """Training: Dice over image rows, as the official code computes it (batch 1: the squeezed
    [H, W] mask makes each row a "sample"); False: Dice per image."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.prompt_depth <= MAX_PROMPT_DEPTH:
            raise InvalidValueError(f"option prompt_depth must be in [1, {MAX_PROMPT_DEPTH}] (official: 4); got {self.prompt_depth}")
        if not 1 <= self.prompt_length <= MAX_PROMPT_LENGTH:
            raise InvalidValueError(f"option prompt_length must be in [1, {MAX_PROMPT_LENGTH}] (official: 5); got {self.prompt_length}")
        check_taps(self.taps)
        if not 1 <= self.n_clusters <= MAX_CLUSTERS:
            raise InvalidValueError(f"option n_clusters must be in [1, {MAX_CLUSTERS}] (official: 20); got {self.n_clusters}")
        if not 0.0 <= self.hsf_alpha <= 1.0:
            raise InvalidValueError(f"option hsf_alpha must be in [0, 1] (official: 0.2); got {self.hsf_alpha}")
        if not 0 <= self.kmeans_seed < 2**32:
            raise InvalidValueError(f"option kmeans_seed must be in [0, 2**32) (a numpy random_state); got {self.kmeans_seed}")
        if self.sigma < 0:
            raise InvalidValueError(f"option sigma must be >= 0 (0 = no smoothing); got {self.sigma}")
