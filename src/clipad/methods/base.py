"""What every method shares: its options, input handling, batching, precision, references,
save, and the training contract of learned methods.

A method is a :class:`Detector` subclass with its own frozen :class:`Options` dataclass
(``methods/<name>/options.py``, declared as the class attribute ``Options``) and implements

- ``score_batch(x, class_name, reference) -> (image_scores [B], anomaly_maps [B, S, S])`` on
  normalised model-sized images, and, for few-shot methods,
- ``encode_reference(x) -> dict[str, Tensor]``: the per-class memory built from normal images.

A method with learned tensors subclasses :class:`LearnedDetector` instead, which declares what
:mod:`clipad.train` and checkpoints use (``trainable_parameters``, ``training_loss``,
``reset_parameters``, ``learned_state`` / ``load_learned_state``, ``training_defaults``...).

Everything else (accepted input types, resizing to the model size and back, chunking into
batches, autocast, caching, references per class, checkpoints) lives here once.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import types
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import torch
from torch import nn

from ..backbones.clip import Backbone
from ..checkpoint import MAX_IMAGE_SIZE, write_checkpoint
from ..data.transforms import ImageInput, as_image_list, equal_runs, resize_batch, resize_map
from ..errors import ClipadError, InvalidTypeError, InvalidValueError, UnknownNameError, shorten

DEFAULT_CLASS = "object"


@dataclass
class Prediction:
    """Output of :meth:`Detector.predict`.

    image_scores: [B] float32, higher = more anomalous; min-max normalised to [0, 1] where the
        class's calibrated :class:`Thresholds` hold a range (``clipad calibrate --normalize``).
    anomaly_maps: [B, H, W] float32 when all inputs share one size, else a list of [H_i, W_i]
        maps, each at its input's own size; normalised likewise.
    labels: [B] bool, True = anomalous (``image_scores >= image_threshold``) when an image
        threshold applies (calibrated, or given to ``predict``), else None.
    masks: [B, H, W] bool (a list where the maps are), True = anomalous pixel
        (``anomaly_maps >= pixel_threshold``) when a pixel threshold applies, else None.
    image_threshold / pixel_threshold: the thresholds applied, in the units of the scores and
        maps above (0.5 where normalised), or None.
    """

    image_scores: torch.Tensor
    anomaly_maps: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor | None = None
    masks: torch.Tensor | list[torch.Tensor] | None = None
    image_threshold: float | None = None
    pixel_threshold: float | None = None

    def __len__(self) -> int:
        return int(self.image_scores.shape[0])


# --------------------------------------------------------------------------- decisions

#: The largest float32 below 0.5: a normalised value below its threshold stays below 0.5.
_BELOW_HALF = float(torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)))


def normalize_min_max(x: torch.Tensor, threshold: float, lo: float, hi: float) -> torch.Tensor:
    """anomalib's min-max normalisation: ``clip((x - threshold) / (hi - lo) + 0.5, 0, 1)``.

    x: [...] float32 scores or maps -> same shape in [0, 1], the threshold at 0.5. Each value
    keeps its side of the threshold exactly (``x >= threshold`` <=> result ``>= 0.5``): float
    rounding may not lift a value just below the threshold to 0.5. ``hi == lo``: divided by 1.
    """
    span = hi - lo if hi > lo else 1.0
    y = ((x - threshold) / span + 0.5).clamp(0.0, 1.0)
    return torch.where(x >= threshold, y.clamp(min=0.5), y.clamp(max=_BELOW_HALF))


def _threshold_value(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{name} must be a number or None; got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidValueError(f"{name} must be a finite number; got {value}")
    return float(value)


@dataclass(frozen=True)
class Thresholds:
    """Calibrated pass/fail thresholds of one class, made by :func:`clipad.deploy.calibrate`.

    image: an image is anomalous when its raw score ``>= image``; None = no image decision.
    pixel: a pixel is anomalous when its raw map value ``>= pixel``; None = no masks.
    image_range / pixel_range: (min, max) of the calibration scores / map values when
        predictions are min-max normalised (anomalib's convention, :func:`normalize_min_max`,
        the threshold at 0.5), else None. A range needs its threshold.
    provenance: how they were made (JSON scalars: strategy, targets, image counts, class,
        clipad version, date...), kept in the saved detector.
    """

    image: float | None = None
    pixel: float | None = None
    image_range: tuple[float, float] | None = None
    pixel_range: tuple[float, float] | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for level in ("image", "pixel"):
            thr = _threshold_value(f"Thresholds.{level}", getattr(self, level))
            object.__setattr__(self, level, thr)
            rng = getattr(self, f"{level}_range")
            if rng is None:
                continue
            lo, hi = (_threshold_value(f"Thresholds.{level}_range", v) for v in rng) if len(rng) == 2 else (None, None)
            if lo is None or hi is None or lo > hi:
                raise InvalidValueError(f"Thresholds.{level}_range must be (min, max) with min <= max; got {rng!r}")
            if thr is None:
                raise InvalidValueError(f"Thresholds.{level}_range is given without a {level} threshold to centre it on")
            object.__setattr__(self, f"{level}_range", (lo, hi))
        object.__setattr__(self, "provenance", dict(self.provenance))

    def output_threshold(self, level: Literal["image", "pixel"]) -> float | None:
        """The threshold in the units predictions are given in: 0.5 where normalised."""
        thr = getattr(self, level)
        return 0.5 if thr is not None and getattr(self, f"{level}_range") is not None else thr

    def to_json(self) -> dict[str, Any]:
        """JSON-able form, as the checkpoint header's ``thresholds`` entry holds it per class."""
        return {"image": self.image, "pixel": self.pixel,
                "image_range": None if self.image_range is None else list(self.image_range),
                "pixel_range": None if self.pixel_range is None else list(self.pixel_range),
                "provenance": dict(self.provenance)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Thresholds:
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise UnknownNameError(f"unknown threshold key(s) {unknown}; valid: {', '.join(f.name for f in fields(cls))}")
        return cls(**{k: tuple(v) if k.endswith("_range") and v is not None else v for k, v in value.items()})



# --------------------------------------------------------------------------- options

_KINDS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
          float: ("a finite number", "finite numbers"), str: ("a string", "strings")}


def _describe(tp: Any) -> str:
    """A field annotation in words: ``tuple[int, ...] | None`` -> "a list of integers or None"."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {_KINDS[args[0]][1]}"
    return _KINDS[tp][0]


class _Mismatch(Exception):
    """A value that does not fit an annotation (internal to :func:`_coerce`)."""


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` and normalised (JSON lists -> tuples, ints
    -> floats where a float is declared); :class:`_Mismatch` when it does not fit. Supported:
    bool, int, float (finite), str, ``Literal[...]`` of strings, ``tuple[X, ...]``, ``X | None``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option)
            except _Mismatch:
                pass
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if isinstance(value, str) and value in args:
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, args[0]) for v in value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise InvalidTypeError(f"option annotation {tp!r} is not supported by clipad.methods.base._coerce")
    raise _Mismatch


def _flat_types(tp: Any) -> list[Any]:
    return [t for a in get_args(tp) for t in _flat_types(a)] if get_origin(tp) in (Union, types.UnionType) else [tp]


def _bad_value(name: str, value: Any, tp: Any, default: Any) -> ClipadError:
    """The error for ``value`` not fitting ``tp``: an unknown choice, a non-finite number or a wrong type."""
    kinds = _flat_types(tp)
    message = f"option {name} must be {_describe(tp)}; got {value!r}"
    if default is not None or type(None) in kinds:
        message += f" (default: {json.dumps(_jsonable(default))})"
    if isinstance(value, str) and any(get_origin(k) is Literal for k in kinds):
        return UnknownNameError(message)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float in kinds:
        return InvalidValueError(message)  # nan or inf where a finite number is needed
    return InvalidTypeError(message)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Options:
    """Options every method takes. A method extends it in ``methods/<name>/options.py``.

    Construction type-checks every field against its annotation and normalises it (JSON lists
    -> tuples, integers -> floats where a float is declared; floats must be finite); a
    subclass's ``__post_init__`` calls ``super().__post_init__()`` and then checks its values.
    Field metadata ``{"cli": "--flag", "help": "..."}`` makes the shared command line offer the
    option as a flag of its own (``clipad.cli.common.add_model_args``).
    """

    image_size: int | None = None
    """Model input size in pixels; None = the method's default (:meth:`Detector.default_input_size`).
    Must be a multiple of the backbone's patch size."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """"auto": bf16 autocast on CUDA, fp32 elsewhere; "fp32"; or "bf16" (also on CPU)."""

    def __post_init__(self) -> None:
        hints = _field_types(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                value = _coerce(value, hints[f.name])
            except _Mismatch:
                raise _bad_value(f.name, value, hints[f.name], f.default) from None
            object.__setattr__(self, f.name, value)  # frozen: normalise in place once
        if self.image_size is not None and not 0 < self.image_size <= MAX_IMAGE_SIZE:
            raise InvalidValueError(f"option image_size must be a positive multiple of the patch size, at most "
                                    f"{MAX_IMAGE_SIZE}; got {self.image_size}")


@dataclass(frozen=True)
class LearnedOptions(Options):
    """Options of every :class:`LearnedDetector`."""

    checkpoint: str | None = field(default=None, metadata={
        "cli": "--checkpoint", "metavar": "FILE",
        "help": "learned weights of a trained method (.safetensors from `clipad train` or `clipad convert`)",
    })
    """A clipad ``.safetensors`` holding this method's learned weights (a saved detector, a
    ``clipad train`` result or a ``clipad convert`` output), loaded by :func:`clipad.create_detector`
    after construction; None = freshly initialised weights. Saved detectors record None: the
    weights are in the saved file itself."""

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint, os.PathLike):
            object.__setattr__(self, "checkpoint", os.fspath(self.checkpoint))
        super().__post_init__()


def make_options(cls: type[Detector], values: Mapping[str, Any]) -> Options:
    """``cls.Options`` built from keyword ``values`` (as ``create_detector`` and saved files give
    them): unknown names raise :class:`UnknownNameError` listing the valid ones; bad values raise
    the :class:`ClipadError` of the option, prefixed with the method's name."""
    valid = [f.name for f in fields(cls.Options)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise UnknownNameError(f"unknown option(s) {unknown} for method '{cls.name}'. Valid options: {', '.join(valid)}")
    try:
        return cls.Options(**values)
    except ClipadError as exc:
        exc.args = (f"method '{cls.name}': {exc}",)
        raise


def options_dict(opts: Options) -> dict[str, Any]:
    """All fields of ``opts`` as JSON-able values (tuples as lists): what checkpoints record."""
    return _jsonable(asdict(opts))


# --------------------------------------------------------------------------- detectors


class Detector(nn.Module):
    """Base class of all methods. Create instances with :func:`clipad.create_detector`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options  # each method declares its own dataclass
    default_backbone: ClassVar[str] = "ViT-B-16-plus-240"
    default_pretrained: ClassVar[str | None] = None
    few_shot: ClassVar[bool] = False
    #: backbone families the method runs on (:func:`clipad.backbones.backbone_family`); the first
    #: one's tiny model is what ``backbone="tiny"`` builds
    backbone_families: ClassVar[tuple[str, ...]] = ("clip",)
    #: True: few-shot only (AnomalyDINO): predicting a class without references is an error
    needs_reference: ClassVar[bool] = False
    #: True: the method scores a set of images of one class against each other (MuSc), so
    #: :meth:`predict` and ``clipad eval`` give :meth:`score_set` the whole set in one call
    transductive: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, options: Options | None = None, **kwargs: Any) -> None:
        """``options``: an instance of the class's :attr:`Options`, or the same as keywords
        (``WinCLIP(backbone, scales=(2,))``). :func:`clipad.create_detector` also applies the
        ``checkpoint`` option of learned methods and places the detector on its device."""
        super().__init__()
        if options is None:
            options = make_options(type(self), kwargs)
        elif kwargs:
            raise InvalidValueError(f"{type(self).__name__}: pass options as one {type(self).Options.__name__} or as "
                                    f"keywords, not both (got keywords {sorted(kwargs)})")
        elif type(options) is not type(self).Options:
            raise InvalidTypeError(f"{type(self).__name__} takes {type(self).Options.__name__}; got {type(options).__name__}")
        patch = backbone.patch_size[0]
        size = options.image_size if options.image_size is not None else self.default_input_size(backbone)
        if size % patch:
            raise InvalidValueError(
                f"image_size={size} must be a positive multiple of the patch size {patch} of backbone '{backbone.name}'"
            )
        self.opts = options
        self.backbone = backbone
        self.image_size = int(size)
        self.seed = 0
        self._references: dict[str, dict[str, torch.Tensor]] = {}
        self._text_cache: dict[str, torch.Tensor] = {}
        self._thresholds: dict[str, Thresholds] = {}

    @classmethod
    def default_input_size(cls, backbone: Backbone) -> int:
        """Model input size when the ``image_size`` option is None (240, WinCLIP's and AnoCLIP's)."""
        return 240

    @classmethod
    def backbone_options(cls, options: Options, backbone: str | None = None) -> dict[str, Any]:
        """Keyword arguments :func:`clipad.create_detector` adds to the backbone factory for
        these options (and the ``backbone`` architecture name, where given): where a method's
        official code builds its backbone unusually (e.g. ``{"config_activation": True}``: GELU
        MLPs for OpenAI weights, as MuSc and AdaCLIP run them). Empty by default."""
        return {}

    def export_refusal(self) -> str | None:
        """Why this detector cannot be exported as one fixed ONNX graph (one line with the fix),
        or None when it can (:mod:`clipad.deploy.export`)."""
        return None

    @property
    def options(self) -> dict[str, Any]:
        """Every option, JSON-able (tuples as lists): what :meth:`save` records and
        ``create_detector(method, **det.options)`` rebuilds."""
        return options_dict(self.opts)

    @property
    def precision(self) -> str:
        return self.opts.precision

    @precision.setter
    def precision(self, value: str) -> None:
        self.opts = replace(self.opts, precision=value)  # validated; saved with the detector

    # -- to implement --------------------------------------------------------------------------
    def score_batch(
        self, x: torch.Tensor, class_name: str, reference: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images [B, 3, S, S] -> (scores [B], maps [B, S, S])."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_batch(x, class_name, reference)")

    def score_set(
        self, batches: list[torch.Tensor], class_name: str, reference: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transductive methods: the whole set as normalised batches [b_i, 3, S, S] (each at most
        ``predict``'s ``batch_size``, so the backbone can run batch by batch) -> (scores [N],
        maps [N, S, S]) in the order of the batches. Default: :meth:`score_batch` of them all."""
        return self.score_batch(torch.cat(batches), class_name, reference)

    @property
    def min_set_size(self) -> int:
        """Fewest images a transductive method scores together (1 for the others)."""
        return 1

    def encode_reference(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised normal images [K, 3, S, S] -> the method's reference memory."""
        raise ClipadError(f"method '{self.name}' has no few-shot mode; it takes no reference images")

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Learned tensors that a checkpoint must hold (none for training-free methods)."""
        return {}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ClipadError(f"method '{self.name}' has no learned tensors, but the checkpoint holds {sorted(state)[:5]}")

    def copy_learned(self, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], hint: str) -> None:
        """Check ``state`` against the detector's own learned tensors ``own`` (same names, same
        shapes; ``hint`` names the options that shape them) and copy it in."""
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ClipadError(
                f"{self.name} learned weights do not fit this detector: missing {shorten(missing[:6], 150)}, "
                f"unexpected {shorten(unexpected[:6], 150)} ({hint})"
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

    # torch.compiler.disable imports torch._dynamo (seconds) at decoration, i.e. at `import clipad.methods`
    # (`clipad predict --help`); torch's own lazy form imports it at the first call.
    @torch._disable_dynamo  # a dict lookup, once per class a text-tower run: nothing to compile
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
    def score_normalized(
        self, x: torch.Tensor, class_name: str | None = None, *, finish: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised [B, 3, H, W] (H, W from :meth:`input_size`) -> (scores [B], maps [B, H, W]) as float32.
        ``finish=False``: the maps as :meth:`score_batch` gives them (before :meth:`finish_maps`)."""
        name = class_name or DEFAULT_CLASS
        reference = self.reference_for(name)
        with self.autocast():
            scores, maps = self.score_batch(x, name, reference)
        maps = maps.float()
        return scores.float(), self.finish_maps(maps, tuple(x.shape[-2:])) if finish else maps

    def finish_maps(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Maps [B, h, w] of :meth:`score_batch` -> [B, H, W] at ``size`` (each input's original
        size in :meth:`predict`, the model input size in :meth:`score_normalized`). Default: bilinear
        resizing (the identity at the model size); a method whose official code post-processes
        at the output size (AnomalyDINO: Gaussian blur at the original image size) overrides it."""
        return resize_map(maps, size)

    @torch.no_grad()
    def score_normalized_set(
        self, batches: list[torch.Tensor], class_name: str | None = None, *, finish: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`score_normalized` for a transductive method: the whole set as normalised
        batches (all of one size) -> (scores [N], maps [N, H, W]) as float32; ``finish`` as there.

        Raises:
            InvalidValueError: fewer images than :attr:`min_set_size`."""
        n = sum(int(x.shape[0]) for x in batches)
        if n < self.min_set_size:
            raise InvalidValueError(
                f"method '{self.name}' scores a set of images of one class against each other and needs at least "
                f"{self.min_set_size} images in one call; got {n}. Pass the whole set (e.g. all test images of a class) at once"
            )
        name = class_name or DEFAULT_CLASS
        with self.autocast():
            scores, maps = self.score_set(list(batches), name, self.reference_for(name))
        maps = maps.float()
        return scores.float(), self.finish_maps(maps, tuple(batches[0].shape[-2:])) if finish else maps

    def predict(
        self,
        images: torch.Tensor | Sequence[ImageInput] | ImageInput,
        class_name: str | None = None,
        batch_size: int = 16,
        *,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        calibrated: bool = True,
    ) -> Prediction:
        """Score images: see :class:`Prediction`. ``class_name`` (default "object") names the
        product in text prompts and selects the references and thresholds set for that class.

        Decisions (``labels``, ``masks``) come from the class's calibrated :class:`Thresholds`
        (:attr:`thresholds`); ``threshold`` / ``pixel_threshold`` override them for this call,
        in the units of the returned scores / maps. ``calibrated=False``: raw scores and maps,
        no stored threshold or normalisation (the overrides still apply).

        A :attr:`transductive` method scores all ``images`` together, as one set (of one class):
        the backbone still runs ``batch_size`` images at a time."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        tensors = as_image_list(images)
        scores, maps = [], []
        pending: list[tuple[torch.Tensor, list[tuple[int, int]]]] = []  # transductive: scored together below

        def keep(s: torch.Tensor, m: torch.Tensor, originals: list[tuple[int, int]]) -> None:
            scores.append(s.to("cpu", non_blocking=True))
            for a, b in equal_runs(originals):
                maps.extend(self.finish_maps(m[a:b], originals[a]).to("cpu", non_blocking=True).unbind(0))

        # results are copied to the host without waiting (non_blocking) and the device is
        # synchronised once at the end, so the loop never stalls the GPU's queue
        for start in range(0, len(tensors), batch_size):
            chunk = tensors[start : start + batch_size]
            sizes = [self.input_size(tuple(t.shape[-2:])) for t in chunk]
            for i, j in equal_runs(sizes):
                part = chunk[i:j]
                x = self.backbone.normalize(resize_batch(part, sizes[i], self.device).float())
                originals = [tuple(img.shape[-2:]) for img in part]
                if self.transductive:
                    pending.append((x, originals))
                else:
                    keep(*self.score_normalized(x, class_name, finish=False), originals)
        if pending:
            s, m = self.score_normalized_set([x for x, _ in pending], class_name, finish=False)
            start = 0
            for x, originals in pending:
                keep(s[start : start + len(x)], m[start : start + len(x)], originals)
                start += len(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        image_scores = torch.cat(scores)
        same = len({tuple(m.shape) for m in maps}) == 1
        return self.decide(Prediction(image_scores=image_scores, anomaly_maps=torch.stack(maps) if same else maps),
                           class_name, threshold=threshold, pixel_threshold=pixel_threshold, calibrated=calibrated)

    # -- decisions -----------------------------------------------------------------------------
    def decide(
        self,
        pred: Prediction,
        class_name: str | None = None,
        *,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        calibrated: bool = True,
    ) -> Prediction:
        """``pred`` (raw scores and maps of ``class_name``) with decisions: normalised where the
        class's thresholds hold a range, ``labels`` / ``masks`` where a threshold applies; the
        arguments as for :meth:`predict`."""
        threshold = _threshold_value("threshold", threshold)
        pixel_threshold = _threshold_value("pixel_threshold", pixel_threshold)
        th = self.thresholds_for(class_name) if calibrated else None
        scores, maps = pred.image_scores, pred.anomaly_maps
        if th is not None and th.image_range is not None:
            scores = normalize_min_max(scores, th.image, *th.image_range)
        if th is not None and th.pixel_range is not None:
            norm = functools.partial(normalize_min_max, threshold=th.pixel, lo=th.pixel_range[0], hi=th.pixel_range[1])
            maps = norm(maps) if isinstance(maps, torch.Tensor) else [norm(m) for m in maps]
        img_thr = threshold if threshold is not None else th.output_threshold("image") if th else None
        pix_thr = pixel_threshold if pixel_threshold is not None else th.output_threshold("pixel") if th else None
        masks = None
        if pix_thr is not None:
            masks = maps >= pix_thr if isinstance(maps, torch.Tensor) else [m >= pix_thr for m in maps]
        return Prediction(image_scores=scores, anomaly_maps=maps, labels=None if img_thr is None else scores >= img_thr,
                          masks=masks, image_threshold=img_thr, pixel_threshold=pix_thr)

    @property
    def thresholds(self) -> Mapping[str, Thresholds]:
        """Read-only view of the calibrated thresholds by class ("" = every class without its own)."""
        return types.MappingProxyType(self._thresholds)

    def set_thresholds(self, thresholds: Thresholds | None, class_name: str | None = None) -> None:
        """Keep ``thresholds`` for ``class_name`` (None: "", every class without its own; as
        references) or, with None, drop them; :meth:`save` stores them. Made by
        :func:`clipad.deploy.calibrate`."""
        if thresholds is None:
            self._thresholds.pop(class_name or "", None)
        elif not isinstance(thresholds, Thresholds):
            raise InvalidTypeError(f"set_thresholds takes a Thresholds or None; got {type(thresholds).__name__}")
        else:
            self._thresholds[class_name or ""] = thresholds

    def load_thresholds(self, thresholds: Mapping[str, Thresholds | Mapping[str, Any]]) -> None:
        """Replace all thresholds: ``{class: Thresholds}`` or their JSON form (a checkpoint's header)."""
        self._thresholds = {c: t if isinstance(t, Thresholds) else Thresholds.from_json(t) for c, t in thresholds.items()}

    def thresholds_for(self, class_name: str | None) -> Thresholds | None:
        """The thresholds :meth:`predict` applies for ``class_name``: the class's own, else the
        default set (""), else None (found as :meth:`reference_for` finds references)."""
        return self._thresholds.get(class_name or DEFAULT_CLASS, self._thresholds.get(""))

    def set_reference(self, images: torch.Tensor | Sequence[ImageInput] | ImageInput, class_name: str | None = None) -> None:
        """Set k normal reference images (k-shot). With ``class_name`` they serve that class only;
        without, every class that has no references of its own."""
        if not self.few_shot:
            raise ClipadError(f"method '{self.name}' has no few-shot mode; it takes no reference images")
        x, _ = self.prepare(images)
        with torch.no_grad(), self.autocast():
            memory = self.encode_reference(x)
        self._references[class_name or ""] = {k: v.float() for k, v in memory.items()}

    @property
    def references(self) -> Mapping[str, Mapping[str, torch.Tensor]]:
        """Read-only view of the reference memories by class ("" = the default set)."""
        return types.MappingProxyType({c: types.MappingProxyType(m) for c, m in self._references.items()})

    def load_references(self, references: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Replace all reference memories (e.g. read from a checkpoint): ``{class: {name: tensor}}``,
        moved to the detector's device."""
        if references and not self.few_shot:
            raise ClipadError(f"method '{self.name}' has no few-shot mode, but references for {sorted(references)} were given")
        self._references = {c: {k: v.to(self.device) for k, v in m.items()} for c, m in references.items()}

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
        """Write learned tensors, references, calibrated thresholds and the configuration to one
        ``.safetensors`` file.

        A ``checkpoint`` option is recorded as None: the learned tensors are in the saved file
        itself, so the file they first came from need not exist at load time. The backbone's
        activation (``quick_gelu``) is recorded so that loading rebuilds it as it ran.

        Raises:
            InvalidValueError: learned or reference tensors hold NaN or infinite values."""
        options = self.options
        if options.get("checkpoint") is not None:
            options["checkpoint"] = None
        extra: dict[str, Any] = {"quick_gelu": self.backbone.quick_gelu}
        if self._thresholds:  # files without them stay as before
            extra["thresholds"] = {c: t.to_json() for c, t in self._thresholds.items()}
        return write_checkpoint(
            path, method=self.name, backbone=self.backbone.name, pretrained=self.backbone.pretrained, seed=self.seed,
            image_size=self.image_size, precision=self.precision, options=options, learned=self.learned_state(),
            references=self._references, extra=extra,
        )


class LearnedDetector(Detector):
    """A method with learned tensors, trained by :mod:`clipad.train` and saved in checkpoints.

    Subclasses implement the methods below that raise NotImplementedError and may set the class
    attributes. :func:`clipad.create_detector` loads the ``checkpoint`` option's weights after
    construction (constructing the class directly with a ``checkpoint`` is an error).
    """

    Options: ClassVar[type[Options]] = LearnedOptions
    opts: LearnedOptions
    #: the method's official recipe, read by ``TrainConfig.for_method``: any of ``epochs``,
    #: ``batch_size``, ``lr``, ``betas``, ``seed`` (what is missing takes TrainConfig's default)
    training_defaults: ClassVar[dict[str, Any]] = {}
    #: normal reference images per training query; > 0 makes the loop pass ``references``
    training_references: ClassVar[int] = 0
    #: smaller batches are skipped while training (BatchNorm in training mode needs 2)
    min_train_batch: ClassVar[int] = 1

    def __init__(self, backbone: Backbone, options: Options | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, options, **kwargs)
        if self.opts.checkpoint is not None:
            # the weights are loaded once the subclass has built its modules, by create_detector
            raise InvalidValueError(
                f"{type(self).__name__}(backbone, checkpoint=...) does not load weights: use "
                f"clipad.create_detector('{self.name}', checkpoint=...), or build it without and call "
                "det.load_learned_state(clipad.checkpoint.read_learned_weights(path, det.name))"
            )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The tensors the optimiser updates (the backbone stays frozen)."""
        raise NotImplementedError(f"{type(self).__name__} must implement trainable_parameters()")

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups at base learning rate ``lr``; override when parts train at
        different rates. Default: one group of :meth:`trainable_parameters`."""
        return [{"params": list(self.trainable_parameters())}]

    def training_loss(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        *,
        class_names: Sequence[str] | None = None,
        references: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One batch's loss.

        Args:
            images: [B, 3, S, S] CLIP-normalised images at ``image_size``.
            masks: [B, S, S] float {0, 1} anomaly masks.
            labels: [B] 0 normal / 1 anomalous.
            class_names: the B class names (methods that use class words).
            references: [B, R, 3, S, S] CLIP-normalised normal images of each query's class,
                R = :attr:`training_references` (None when that is 0).
        Returns:
            (loss, parts): the scalar to minimise and detached scalars for the logs.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement training_loss(images, masks, labels, ...)")

    def reset_parameters(self, seed: int) -> None:
        """Fresh initialisation of every learned tensor, drawn from ``seed`` (a new training run)."""
        raise NotImplementedError(f"{type(self).__name__} must implement reset_parameters(seed)")

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Detached learned tensors by name: what checkpoints hold."""
        raise NotImplementedError(f"{type(self).__name__} must implement learned_state()")

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (as :meth:`learned_state` names it) in; usually via :meth:`copy_learned`."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_learned_state(state)")
