"""Run an exported model with onnxruntime, numpy and Pillow only: no torch.

>>> from clipad.deploy import OnnxDetector                          # doctest: +SKIP
>>> det = OnnxDetector("bottle.onnx")
>>> pred = det.predict(["a.png", "b.png"])
>>> pred.image_scores, pred.anomaly_maps[0].shape, pred.labels      # labels: with thresholds

:meth:`OnnxDetector.predict` takes what ``Detector.predict`` takes, in numpy's layout: file paths,
``PIL.Image`` s, and arrays ``[H, W, 3]`` (or a batch ``[B, H, W, 3]``), uint8 0..255 or float
in [0, 1]. Files are read by :func:`clipad.data.images.load_image` (the torch path's reader: the
same orientation, modes and errors). Images are brought to the model size as ``predict`` brings
them:

- already at the model size: passed as they are, and the outputs are the torch detector's to
  float rounding (``clipad export --verify`` measures it);
- other sizes: resized with antialiased bicubic interpolation in float (Pillow's ``"F"`` mode,
  the kernel of torch's ``interpolate(..., antialias=True)``, equal to ~1e-5), the maps back to
  each image's size bilinearly (torch's ``align_corners=False``) and the masks thresholded at
  that size: a float-input model gives the torch path's numbers (1e-6 measured); for a uint8
  model the resized image is rounded to 8 bits first, which moved scores by up to ~1e-3 and map
  values by up to ~1e-2 on noise images.

Float images for a uint8 model are rounded to 8 bits likewise. Nothing here imports torch,
directly or through clipad's packages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ClipadError, InvalidTypeError, InvalidValueError, MissingFileError
from . import manifest as mf

__all__ = ["OnnxDetector", "OnnxPrediction", "resize_image", "resize_maps"]

#: how far outside [0, 1] a float32 image may stray (as the torch path's range check)
_RANGE_TOLERANCE = 1e-3


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ClipadError("running an exported model needs onnxruntime: pip install 'clipad[onnx]' "
                          "(or pip install onnxruntime)") from None
    return onnxruntime


# --------------------------------------------------------------------------- image arithmetic


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 ``[H, W, 3]`` -> ``[h, w, 3]`` = ``size``: antialiased bicubic per channel (Pillow
    ``"F"`` images, the kernel torch's ``interpolate(mode="bicubic", antialias=True)`` uses)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize((w, h), Image.BICUBIC))
                     for c in range(image.shape[-1])], axis=-1)


def _bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 of each output index: torch's bilinear with
    ``align_corners=False`` (half-pixel centres, clamped at 0, no antialiasing)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0).astype(np.float32)
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 maps ``[..., h, w]`` -> ``[..., H, W]``, bilinear as ``torch.nn.functional.interpolate``
    (``align_corners=False``); unchanged when the size is already ``size``."""
    h, w = size
    if maps.shape[-2:] == (h, w):
        return maps
    y0, y1, wy = _bilinear_weights(maps.shape[-2], h)
    x0, x1, wx = _bilinear_weights(maps.shape[-1], w)
    rows = maps[..., y0, :] * (1 - wy)[:, None] + maps[..., y1, :] * wy[:, None]
    return (rows[..., x0] * (1 - wx) + rows[..., x1] * wx).astype(np.float32)


def _as_array(item: Any, what: str) -> np.ndarray:
    """One image -> ``[H, W, 3]`` uint8 (files, PIL images, uint8 arrays) or float32 in [0, 1]."""
    if isinstance(item, (str, os.PathLike)):
        from ..data.images import load_image

        item = load_image(item)
    if isinstance(item, Image.Image):
        return np.asarray(item if item.mode == "RGB" else item.convert("RGB"), dtype=np.uint8)
    if not isinstance(item, np.ndarray):
        raise InvalidTypeError(f"{what} has unsupported type {type(item).__name__}; pass a file path, a PIL image or "
                               "a numpy array [H, W, 3]")
    if item.ndim != 3 or item.shape[-1] != 3 or 0 in item.shape:
        raise InvalidValueError(f"{what} must be an RGB array [H, W, 3] (numpy's layout); got shape {tuple(item.shape)}")
    if item.dtype == np.uint8:
        return item
    if not np.issubdtype(item.dtype, np.floating):
        raise InvalidTypeError(f"{what} has dtype {item.dtype}; pass a float array in [0, 1] or a uint8 array of "
                               "0..255 pixel values (e.g. x.astype(np.float32) / 255 for integer pixel values)")
    arr = item.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InvalidValueError(f"{what} contains NaN or infinite values; replace them (e.g. np.nan_to_num) or drop the image")
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        fix = "it looks like 0..255 pixel values: pass x / 255 (or the uint8 array)" if hi <= 255.0 + _RANGE_TOLERANCE and lo >= 0 \
            else "rescale it to [0, 1]"
        raise InvalidValueError(f"{what} has values in [{lo:.4g}, {hi:.4g}], but images must be in [0, 1] "
                                f"(tolerance {_RANGE_TOLERANCE:g}): {fix}")
    return arr


def _image_list(images: Any) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[0] == 0:
            raise InvalidValueError("no images given (the images array has batch size 0)")
        return [_as_array(img, f"images[{i}]") for i, img in enumerate(images)]
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        return [_as_array(images, "images")]
    if not isinstance(images, Sequence):
        raise InvalidTypeError(f"images has unsupported type {type(images).__name__}; pass a path, a PIL image, a numpy "
                               "array [H, W, 3] or [B, H, W, 3], or a list of those")
    out = [_as_array(item, f"images[{i}]") for i, item in enumerate(images)]
    if not out:
        raise InvalidValueError("no images given")
    return out


# --------------------------------------------------------------------------- the detector


@dataclass(frozen=True)
class ModelThresholds:
    """The calibrated thresholds an exported model carries (its manifest's ``thresholds``):
    ``image`` / ``pixel`` in raw score units as calibrated (None: that level has none),
    ``image_threshold`` / ``pixel_threshold`` in the units of the model's outputs (0.5 where
    normalised), ``provenance`` as calibrated."""

    image: float | None
    pixel: float | None
    image_threshold: float | None
    pixel_threshold: float | None
    provenance: dict[str, Any]


@dataclass
class OnnxPrediction:
    """What :meth:`OnnxDetector.predict` returns: :class:`clipad.methods.Prediction`'s fields as
    numpy arrays.

    image_scores: [B] float32. anomaly_maps: [B, H, W] float32 (a list of [H_i, W_i] when sizes
    differ), each at its input's size. labels: [B] bool or None; masks: [B, H, W] bool (a list
    where the maps are) or None: present when the model carries calibrated thresholds.
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray | list[np.ndarray]
    labels: np.ndarray | None = None
    masks: np.ndarray | list[np.ndarray] | None = None
    image_threshold: float | None = None
    pixel_threshold: float | None = None

    def __len__(self) -> int:
        return int(self.image_scores.shape[0])


class OnnxDetector:
    """An exported clipad model (``clipad export``) run by onnxruntime.

    Args:
        path: the ``.onnx`` file; its manifest is read from the model's metadata (or, if a tool
            stripped it, from the sidecar ``<path>.json``).
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads (default: onnxruntime's choice).

    Raises:
        MissingFileError: no such file.
        InvalidValueError: not an ONNX model, or not one clipad exported (no manifest).
        ClipadError: onnxruntime is not installed.
    """

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"model '{self.path}' does not exist" if not self.path.is_dir()
                                   else f"model '{self.path}' is a directory; give the .onnx file")
        ort = _ort()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors reach the caller as exceptions, not log lines
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own, unrelated classes
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidValueError(f"model '{self.path}' is not a readable ONNX model: {first[:300]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if mf.METADATA_KEY in meta:
            self.manifest = mf.parse_manifest(meta[mf.METADATA_KEY], f"model '{self.path}'")
        else:
            self.manifest = mf.read_sidecar(self.path)
        self._check_graph()

    def _check_graph(self) -> None:
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        expected = "tensor(uint8)" if self.input_format == "uint8" else "tensor(float)"
        if len(inputs) != 1 or inputs[0].name != mf.INPUT_NAME or inputs[0].type != expected:
            got = ", ".join(f"{i.name} {i.type}" for i in inputs)
            raise InvalidValueError(f"model '{self.path}' takes {got}, but its manifest declares {mf.INPUT_NAME} {expected}; "
                                    "export it again")
        if outputs != self.manifest.outputs:
            raise InvalidValueError(f"model '{self.path}' has outputs {outputs}, but its manifest declares "
                                    f"{self.manifest.outputs}; export it again")

    # -- facts ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The exported method's name (as ``Detector.name``)."""
        return self.manifest.method

    @property
    def class_name(self) -> str:
        return self.manifest.class_name

    @property
    def model_size(self) -> tuple[int, int]:
        """(H, W) the graph takes."""
        return self.manifest.size

    @property
    def input_format(self) -> str:
        """"uint8" (``[B, H, W, 3]``) or "float" (``[B, 3, H, W]`` in [0, 1])."""
        return self.manifest.input_format

    @property
    def thresholds(self) -> dict[str, ModelThresholds]:
        """``{class_name: thresholds}`` of the model's one class, or {} (as ``Detector.thresholds``)."""
        th = self.manifest.data.get("thresholds")
        if not th:
            return {}
        return {self.class_name: ModelThresholds(
            image=th.get("image"), pixel=th.get("pixel"), image_threshold=th.get("image_threshold"),
            pixel_threshold=th.get("pixel_threshold"), provenance=dict(th.get("provenance") or {}))}

    def thresholds_for(self, class_name: str | None) -> ModelThresholds | None:
        """The thresholds that apply to ``class_name`` (None: the model's class), or None."""
        return self.thresholds.get(class_name or self.class_name)

    def check_class(self, class_name: str | None) -> None:
        """Raise unless ``class_name`` is None or the class the model was exported for."""
        if class_name is not None and class_name != self.class_name:
            raise InvalidValueError(
                f"model '{self.path}' was exported for class '{self.class_name}' (its text embeddings and references "
                f"are constants of the graph); for class '{class_name}' export again with --class-name {class_name}"
            )

    def __repr__(self) -> str:
        return (f"OnnxDetector('{self.path}', method={self.name!r}, class_name={self.class_name!r}, "
                f"size={self.model_size}, input={self.input_format})")

    # -- the graph -----------------------------------------------------------------------------
    def model_input(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Images ``[H, W, 3]`` (uint8, or float32 in [0, 1]) -> the graph's input batch at the
        model size (see the module docstring for resizing and rounding)."""
        h, w = self.model_size
        batch = []
        for img in images:
            if img.shape[:2] != (h, w):
                unit = img.astype(np.float32) / np.float32(255.0) if img.dtype == np.uint8 else img
                img = resize_image(unit, (h, w))
            batch.append(img)
        if self.input_format == "uint8":
            arr = np.stack([b if b.dtype == np.uint8 else np.clip(np.rint(b * 255.0), 0, 255).astype(np.uint8) for b in batch])
            return np.ascontiguousarray(arr)
        # the torch path's uint8 conversion: float32 x / 255
        arr = np.stack([b.astype(np.float32) / np.float32(255.0) if b.dtype == np.uint8 else b.astype(np.float32) for b in batch])
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The graph on one input batch in its own contract (:attr:`input_format`, model size)
        -> ``{output name: array}``.

        Raises:
            InvalidValueError / InvalidTypeError: a batch of another shape or dtype."""
        h, w = self.model_size
        if self.input_format == "uint8":
            shape, dtype = (h, w, 3), np.uint8
            layout = f"uint8 [B, {h}, {w}, 3]"
        else:
            shape, dtype = (3, h, w), np.float32
            layout = f"float32 [B, 3, {h}, {w}] in [0, 1]"
        if not isinstance(batch, np.ndarray):
            raise InvalidTypeError(f"run takes a numpy array {layout}; got {type(batch).__name__}")
        if batch.dtype != dtype:
            raise InvalidTypeError(f"model '{self.path}' takes {layout}; got dtype {batch.dtype} (predict() converts images)")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != shape or batch.shape[0] == 0:
            raise InvalidValueError(f"model '{self.path}' takes {layout}; got shape {tuple(batch.shape)} "
                                    "(predict() resizes images)")
        values = self.session.run(None, {mf.INPUT_NAME: batch})
        return dict(zip(self.manifest.outputs, values))

    def predict(
        self,
        images: Any,
        class_name: str | None = None,
        batch_size: int = 16,
        *,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
    ) -> OnnxPrediction:
        """Score images: see :class:`OnnxPrediction` and the module docstring.

        ``class_name``: None, or the class the model was exported for (:meth:`check_class`).
        ``threshold`` / ``pixel_threshold``: decide with these instead of the model's calibrated
        thresholds, in the units of its outputs (as ``Detector.predict``'s)."""
        self.check_class(class_name)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        for name, value in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value)):
                raise InvalidValueError(f"{name} must be a finite number or None; got {value!r}")
        img_thr = threshold if threshold is not None else self.manifest.image_threshold
        pix_thr = pixel_threshold if pixel_threshold is not None else self.manifest.pixel_threshold
        arrays = _image_list(images)
        scores, maps = [], []
        for start in range(0, len(arrays), batch_size):
            chunk = arrays[start : start + batch_size]
            out = self.run(self.model_input(chunk))
            scores.append(out[mf.SCORE].astype(np.float32))
            maps += [resize_maps(out[mf.MAP][i].astype(np.float32), img.shape[:2]) for i, img in enumerate(chunk)]
        image_scores = np.concatenate(scores)
        same = len({m.shape for m in maps}) == 1
        # the decisions as the graph (and Detector.decide) make them, on the maps at each image's size
        labels = None if img_thr is None else image_scores >= np.float32(img_thr)
        masks = None if pix_thr is None else [m >= np.float32(pix_thr) for m in maps]
        return OnnxPrediction(
            image_scores=image_scores,
            anomaly_maps=np.stack(maps) if same else maps,
            labels=labels,
            masks=None if masks is None else np.stack(masks) if same else masks,
            image_threshold=None if img_thr is None else float(img_thr),
            pixel_threshold=None if pix_thr is None else float(pix_thr),
        )
