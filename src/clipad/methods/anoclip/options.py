"""AnoCLIP's options (defaults: the official MVTec AD script, hq-deng/AnoVL @ 3a70bfd)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...errors import InvalidValueError
from ..base import Options


@dataclass(frozen=True)
class AnoCLIPOptions(Options):
    """Options of :class:`~clipad.methods.anoclip.AnoCLIP`."""

    image_size: int | None = 240
    """Model input (and tile) size in pixels (240); None = 240."""
    dual_path_blocks: int = 12
    """Number of last blocks run as the V-V dual path (clipped to the depth; 0 = none)."""
    domain: Literal["auto", "object", "texture", "medical"] = field(default="auto", metadata={
        "cli": "--domain", "help": "prompt domain: auto (from the class name), object, texture or medical"})
    """Prompt domain: "auto" (texture for carpet/leather/grid/tile/wood, else object), "object",
    "texture", or "medical" (clipad's extension)."""
    domain_phrases: tuple[str, ...] | None = None
    """Replace the domain's phrases (e.g. ``["x-ray image"]``); None = the domain's own."""
    class_name_spaces: bool = False
    """Write ``_`` in class names as spaces (the official code keeps them)."""
    augment_views: bool = True
    """Image score averaged over the 22 views (the official MVTec AD setting)."""
    tile_non_square: bool = True
    """Non-square inputs as overlapping square tiles (the VisA setting); False squashes them to
    a square as other methods do."""
    tta: bool = field(default=False, metadata={"cli": "--tta", "help": "test-time adaptation of the adapter (AnoCLIP+)"})
    """Test-time adaptation of the adapter (AnoCLIP+)."""
    adapter: Literal["text", "linear"] = "text"
    """"text" (prompt-embedding adapter with tanh; official MVTec AD) or "linear" (official VisA)."""
    tta_steps: int = 5
    """AdamW steps per image."""
    tta_lr: float = 1e-3
    """AdamW learning rate."""
    tta_weight_decay: float = 0.01
    """AdamW weight decay."""
    noise_std: float = 0.055
    """Gaussian noise on the un-normalised tokens."""
    entropy_weight: float = 1.0
    """Weight of the entropy term of the TTA loss."""
    label_weight: float = 0.5
    """Weight of the pseudo-label terms of the TTA loss."""
    tta_seed: int = 0
    """Seed of the TTA random stream (adapter init and noise)."""
    official_compat: bool = False
    """Reproduce the official order-dependent TTA (AdamW state kept per class, one random stream
    across images); see the model's module docstring."""
    view_chunk: int = 128
    """Images per tower call for the 22 views; bounds memory, not results."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dual_path_blocks < 0:
            raise InvalidValueError(f"option dual_path_blocks must be an integer >= 0; got {self.dual_path_blocks}")
        if self.domain_phrases is not None and (not self.domain_phrases or not all(p.strip() for p in self.domain_phrases)):
            raise InvalidValueError(
                f"option domain_phrases must be a non-empty list of non-empty strings; got {list(self.domain_phrases)}"
            )
        if self.tta_steps < 0:
            raise InvalidValueError(f"option tta_steps must be an integer >= 0; got {self.tta_steps}")
        for name in ("tta_lr", "tta_weight_decay", "noise_std"):
            if getattr(self, name) < 0:
                raise InvalidValueError(f"option {name} must be a number >= 0; got {getattr(self, name)}")
        if self.view_chunk < 1:
            raise InvalidValueError(f"option view_chunk must be >= 1; got {self.view_chunk}")
