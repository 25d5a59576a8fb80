"""AnomalyCLIP's options (defaults: the official ``test.sh`` / ``train.sh``, zqhang/AnomalyCLIP @ 45ed4dd)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidValueError
from ..base import LearnedOptions

#: Most learned context vectors per prompt: CLIP's text context is 77 tokens, start and end
#: tokens included (the prompt's words need room too; the text encoder checks the exact fit).
MAX_CONTEXT = 75


def check_context(name: str, value: int, low: int) -> None:
    """``value`` (a count of prompt tokens) within [low, MAX_CONTEXT]: bounded before anything is allocated."""
    if not low <= value <= MAX_CONTEXT:
        raise InvalidValueError(f"option {name} must be in [{low}, {MAX_CONTEXT}] (CLIP's text context is 77 tokens); "
                                f"got {value}")


def check_taps(taps: tuple[float, ...]) -> None:
    """Taps are fractions of the depth in (0, 1]."""
    if not taps or any(not 0.0 < t <= 1.0 for t in taps):
        raise InvalidValueError(f"option taps must be fractions of the depth in (0, 1], e.g. [0.25, 0.5, 0.75, 1.0]; "
                                f"got {list(taps)}")


def check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise InvalidValueError(f"option {name} must be > 0; got {value}")


@dataclass(frozen=True)
class AnomalyCLIPOptions(LearnedOptions):
    """Options of :class:`~clipad.methods.anomalyclip.AnomalyCLIP` (``image_size`` None = 518 px,
    or the nearest multiple of the patch size where the patch does not divide 518, e.g. 512 on
    ``tiny``)."""

    n_ctx: int = 12
    """Learned context vectors per prompt."""
    deep_depth: int = 9
    """Deep text prompts in text layers 2..deep_depth; 0 disables them."""
    deep_length: int = 4
    """Vectors per deep text prompt (<= n_ctx)."""
    taps: tuple[float, ...] = (1.0,)
    """V-V layers of the map as fractions of the depth ((1.0,) = block 24 of 24, what the released
    checkpoints use; (0.25, 0.5, 0.75, 1.0) = blocks 6/12/18/24)."""
    dpam_start: float | None = 0.25
    """First dual-path block as a fraction of the depth (0.25 = block 6 of 24, the official
    ``DPAM_layer=20``); None = no dual path (vanilla tokens)."""
    temperature: float = 0.07
    """Softmax temperature."""
    sigma: float = 4.0
    """Gaussian smoothing of the map in pixels (0 = none)."""
    local_loss_weight: float = 4.0
    """Weight of the map losses in training (the official ``lam``)."""
    global_ln_post: bool = False
    """Apply ``ln_post`` to the global CLS token (False, official)."""
    deep_fp16: bool = True
    """Round deep prompts to float16 as the official code does."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_context("n_ctx", self.n_ctx, 1)
        if self.deep_depth < 0:
            raise InvalidValueError(f"option deep_depth must be >= 0 (0 = no deep prompts); got {self.deep_depth}")
        check_context("deep_length", self.deep_length, 0)
        if self.deep_depth >= 2 and self.deep_length > self.n_ctx:
            raise InvalidValueError(f"option deep_length={self.deep_length} exceeds n_ctx={self.n_ctx}: deep prompts "
                                    "replace context slots")
        check_taps(self.taps)
        if self.dpam_start is not None and not 0.0 < self.dpam_start <= 1.0:
            raise InvalidValueError(f"option dpam_start must be a fraction of the depth in (0, 1] or None; got {self.dpam_start}")
        check_positive("temperature", self.temperature)
        if self.sigma < 0:
            raise InvalidValueError(f"option sigma must be >= 0 (0 = no smoothing); got {self.sigma}")
