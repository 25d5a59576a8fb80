"""What every method shares: input handling, batching, precision, references, save.

A method subclasses :class:`Detector` and implements

- ``score_batch(x, class_name, reference) -> (image_scores [B], anomaly_maps [B, S, S])`` on
  normalised model-sized images, and, for few-shot methods,
- ``encode_reference(x) -> dict[str, Tensor]``: the per-class memory built from normal images.

Everything else (accepted input types, resizing to the model size and back, chunking into
batches, autocast, caching, references per class, checkpoints) lives here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..backbones.clip import Backbone
from ..errors import ClipadError
from ..data.transforms import ImageInput, as_image_list, equal_runs, resize_batch, resize_map

DEFAULT_CLASS = "object"


@dataclass
class Prediction:
    """Output of :meth:`Detector.predict`.

    image_scores: [B] float32, higher = more anomalous.
    anomaly_maps: [B, H, W] float32 when all inputs share one size, else a list of [H_i, W_i]
        maps, each at its input's own size.
    """

    image_scores: torch.Tensor
    anomaly_maps: torch.Tensor | list[torch.Tensor]

    def __len__(self) -> int:
        return int(self.image_scores.shape[0])


class Detector(nn.Module):
    """Base class of all methods. Create instances with :func:`clipad.create_detector`."""

    name: ClassVar[str] = ""
    default_backbone: ClassVar[str] = "ViT-B-16-plus-240"
    default_pretrained: ClassVar[str | None] = None
    few_shot: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, *, image_size: int = 240, precision: str = "auto") -> None:
        super().__init__()
        if precision not in ("auto", "fp32", "bf16"):
            raise ClipadError(f"precision must be 'auto', 'fp32' or 'bf16'; got '{precision}'")
        if image_size <= 0 or image_size % backbone.patch_size[0]:
            raise ClipadError(
                f"image_size={image_size} must be a positive multiple of the patch size {backbone.patch_size[0]}"
            )
        self.backbone = backbone
        self.image_size = int(image_size)
        self.precision = precision
        self.options: dict[str, Any] = {}  # set by create_detector: what save() records
        self.seed = 0
        self._references: dict[str, dict[str, torch.Tensor]] = {}
        self._text_cache: dict[str, torch.Tensor] = {}

    # -- to implement --------------------------------------------------------------------------
    def score_batch(
        self, x: torch.Tensor, class_name: str, reference: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images [B, 3, S, S] -> (scores [B], maps [B, S, S])."""
        raise NotImplementedError

    def encode_reference(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised normal images [K, 3, S, S] -> the method's reference memory."""
        raise ClipadError(f"method '{self.name}' has no few-shot mode; it takes no reference images")

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Learned tensors that a checkpoint must hold (none for training-free methods)."""
        return {}

    def copy_learned(self, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], hint: str) -> None:
        """Check ``state`` against the detector's own learned tensors ``own`` (same names, same
        shapes; ``hint`` names the options that shape them) and copy it in."""
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ClipadError(
                f"{self.name} learned weights do not fit this detector: missing {missing[:6]}, "
                f"unexpected {unexpected[:6]} ({hint})"
            )
        for key, target in own.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise ClipadError(
                    f"{self.name} learned weight '{key}' has shape {tuple(state[key].shape)}, this detector "
                    f"needs {tuple(target.shape)} (check {hint})"
                )
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(state[key].to(target.device, target.dtype))
        self._text_cache.clear()

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ClipadError(f"method '{self.name}' has no learned tensors, but the checkpoint holds {sorted(state)[:5]}")

    # -- shared machinery ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> Detector:
        """Training mode for the method's own modules only: the backbone stays frozen in eval
        mode, and cached text embeddings are dropped (learned prompts change while training)."""
        super().train(mode)
        self.backbone.eval()
        self._text_cache.clear()
        return self

    def compile(self, **kwargs: Any) -> Detector:
        """Compile the scoring path with ``torch.compile`` (optional; nothing needs it). Keyword
        arguments go to ``torch.compile`` (``mode="max-autotune"``, ``backend=...``, ``dynamic=...``).
        The first batch of each new shape pays the compilation; results match the eager path to
        float tolerance. Returns the detector."""
        self.score_batch = torch.compile(type(self).score_batch.__get__(self), **kwargs)  # type: ignore[method-assign]
        return self

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def model_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    def autocast(self):
        """bf16 autocast on CUDA ('auto' or 'bf16'); fp32 elsewhere unless 'bf16' is asked for."""
        dev = self.device.type
        use_bf16 = self.precision == "bf16" or (self.precision == "auto" and dev == "cuda")
        return torch.autocast(device_type=dev, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    @torch.compiler.disable  # a dict lookup, once per class a text-tower run: nothing to compile
    def cached_text(self, key: str, compute) -> torch.Tensor:
        """Text embeddings are computed once per class (and prompt set) and kept; fp32, no autocast."""
        if key not in self._text_cache:
            with torch.no_grad():
                self._text_cache[key] = compute().float()
        return self._text_cache[key]

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Model input size (H, W) for an image of ``size`` (H, W). Default: the square model size;
        methods that keep the aspect ratio (AnoCLIP's tiling) override it."""
        return self.model_size

    def prepare(self, images: torch.Tensor | Sequence[ImageInput] | ImageInput) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Any accepted input -> (normalised [B, 3, S, S] on the device, original (H, W) sizes)."""
        tensors = as_image_list(images)
        sizes = [tuple(t.shape[-2:]) for t in tensors]
        x = resize_batch(tensors, self.model_size, self.device)
        return self.backbone.normalize(x.float()), sizes

    @torch.no_grad()
    def score_normalized(self, x: torch.Tensor, class_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised [B, 3, H, W] (H, W from :meth:`input_size`) -> (scores [B], maps [B, H, W]) as float32."""
        name = class_name or DEFAULT_CLASS
        reference = self.reference_for(name)
        with self.autocast():
            scores, maps = self.score_batch(x, name, reference)
        return scores.float(), maps.float()

    def predict(
        self,
        images: torch.Tensor | Sequence[ImageInput] | ImageInput,
        class_name: str | None = None,
        batch_size: int = 16,
    ) -> Prediction:
        """Score images: see :class:`Prediction`. ``class_name`` (default "object") names the
        product in text prompts and selects references set for that class."""
        tensors = as_image_list(images)
        scores, maps = [], []
        # results are copied to the host without waiting (non_blocking) and the device is
        # synchronised once at the end, so the loop never stalls the GPU's queue
        for start in range(0, len(tensors), batch_size):
            chunk = tensors[start : start + batch_size]
            sizes = [self.input_size(tuple(t.shape[-2:])) for t in chunk]
            for i, j in equal_runs(sizes):
                part = chunk[i:j]
                x = self.backbone.normalize(resize_batch(part, sizes[i], self.device).float())
                s, m = self.score_normalized(x, class_name)
                scores.append(s.to("cpu", non_blocking=True))
                originals = [tuple(img.shape[-2:]) for img in part]
                for a, b in equal_runs(originals):
                    maps += list(resize_map(m[a:b], originals[a]).to("cpu", non_blocking=True).unbind(0))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        image_scores = torch.cat(scores)
        same = len({tuple(m.shape) for m in maps}) == 1
        return Prediction(image_scores=image_scores, anomaly_maps=torch.stack(maps) if same else maps)

    def set_reference(self, images: torch.Tensor | Sequence[ImageInput] | ImageInput, class_name: str | None = None) -> None:
        """Set k normal reference images (k-shot). With ``class_name`` they serve that class only;
        without, every class that has no references of its own."""
        if not self.few_shot:
            raise ClipadError(f"method '{self.name}' has no few-shot mode; it takes no reference images")
        x, _ = self.prepare(images)
        with torch.no_grad(), self.autocast():
            memory = self.encode_reference(x)
        self._references[class_name or ""] = {k: v.float() for k, v in memory.items()}

    def clear_reference(self, class_name: str | None = None) -> None:
        self._references.pop(class_name or "", None)

    def reference_for(self, class_name: str) -> dict[str, torch.Tensor] | None:
        return self._references.get(class_name, self._references.get(""))

    @property
    def shots(self) -> int:
        """Number of reference images of the default (class-less) reference set, 0 if none."""
        ref = self._references.get("")
        return int(ref["shots"].item()) if ref and "shots" in ref else 0

    def save(self, path: str | Path) -> Path:
        """Write learned tensors, references and the configuration to one ``.safetensors`` file.

        A ``checkpoint`` option is recorded as None: the learned tensors are in the saved file
        itself, so the file they first came from need not exist at load time."""
        from ..checkpoint import save_detector

        recorded = self.options
        if recorded.get("checkpoint") is not None:
            self.options = {**recorded, "checkpoint": None}
        try:
            return save_detector(self, path)
        finally:
            self.options = recorded
