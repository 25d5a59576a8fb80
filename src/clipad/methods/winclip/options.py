"""WinCLIP's options (defaults: the paper's and anomalib's)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidValueError
from ..base import Options


@dataclass(frozen=True)
class WinCLIPOptions(Options):
    """Options of :class:`~clipad.methods.winclip.WinCLIP`."""

    image_size: int | None = 240
    """Model input size in pixels (240, the paper's); None = 240."""
    scales: tuple[int, ...] = (2, 3)
    """Window sizes in patches; each k x k window of patch tokens is encoded on its own."""
    temperature: float = 0.07
    """Softmax temperature of the text scores."""
    window_chunk: int = 8192
    """Window sequences per tower call; bounds memory, not results."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.scales or any(k < 1 for k in self.scales):
            raise InvalidValueError(f"option scales must be a non-empty list of window sizes >= 1 (patches); got {list(self.scales)}")
        if self.temperature <= 0:
            raise InvalidValueError(f"option temperature must be > 0; got {self.temperature}")
        if self.window_chunk < 1:
            raise InvalidValueError(f"option window_chunk must be >= 1; got {self.window_chunk}")
