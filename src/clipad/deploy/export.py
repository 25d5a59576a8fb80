"""Export a detector to ONNX, with a parity check against the eager detector.

What the graph is: ``Detector.predict`` on images at the model size, for one class.

- **Input** (chosen at export, :func:`clipad.deploy.manifest.input_contract`): uint8 RGB
  ``[B, H, W, 3]`` (default) or float32 ``[B, 3, H, W]`` in [0, 1]; H x W is the detector's
  model size exactly (the graph resizes nothing: :class:`~clipad.deploy.runtime.OnnxDetector`
  resizes other sizes first, as ``predict`` does); the batch axis is dynamic. ``/ 255`` and the
  CLIP normalisation are inside the graph.
- **Constants**: the class's text embeddings (the text tower is not in the graph), its
  reference memory (k-shot: the references are folded in), the positional embedding at the
  model's grid and every learned tensor.
- **Outputs**, named as anomalib's: ``pred_score [B]``, ``anomaly_map [B, H, W]`` (float32,
  normalised where the detector's calibrated thresholds hold a range) and, when the class has
  calibrated thresholds, ``pred_label [B]`` / ``pred_mask [B, H, W]`` (bool, ``>= threshold``).
  Output order: pred_score, pred_label, anomaly_map, pred_mask (those present).
- **Precision**: fp32 (a bf16 detector is exported, and verified, in fp32).

The graph is recorded by tracing (``torch.onnx.export(..., dynamo=False)``). A trace keeps what
Python decided while it ran, so every input-dependent Python decision of a method is pinned to
a batch-independent form for the export (:func:`fixed_graph`, which patches the detector and a few
module functions while it runs: export while nothing else uses them):

- WinCLIP's ``window_chunk``, AnoCLIP's ``view_chunk`` and AdaptCLIP's nearest-reference chunk
  are lifted (a chunk loop traced at batch 2 would cut larger batches);
- functions of the input *size* only (the interpolated positional embedding, the Gaussian blur
  matrices, AnoCLIP's view grids) are computed once, eagerly, and enter the graph as constants:
  their antialiased interpolation, unfold and affine_grid have no ONNX form at opset 17;
- TokenCLIP's Sinkhorn stops at tolerance ``ot_tol`` in the eager path (a data-dependent
  ``break``); the graph runs exactly ``ot_iters`` iterations. Iterations past convergence move the
  plan by less than the tolerance, so the eager detector (with its early stop) is the reference
  of :func:`verify` and the figures say how close they are.

AnoCLIP tiles non-square images (``tile_non_square``); the graph takes the square model size, so
the runtime squashes them instead (a :class:`~clipad.errors.ClipadWarning` at export says so).

Methods that cannot be one fixed graph per image are refused (:func:`export_refusal`): AnoCLIP with
``tta=True`` (an adapter trained on every image), AnomalyDINO (a PCA per image), MuSc (scores a set
of images against each other) and AdaCLIP (k-means per image).

:func:`verify` runs the eager detector and onnxruntime on the same images and reports max
|Δscore|, max |Δmap| and the agreement of labels and masks; fp32 tolerance 1e-4 (absolute).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ClipadError, ClipadWarning, InvalidValueError
from ..eval.files import atomic_write
from ..methods.base import DEFAULT_CLASS, Detector, Prediction
from ..version import __version__
from . import manifest as mf

__all__ = ["DEFAULT_OPSET", "TOLERANCE", "ExportResult", "Verification", "export_and_verify", "export_onnx",
           "export_refusal", "fixed_graph", "record_verification", "verification_images", "verify"]

#: ONNX opset of the export unless asked otherwise (onnxruntime >= 1.14 runs it), and the range offered
DEFAULT_OPSET, MIN_OPSET, MAX_OPSET = 17, 17, 20
#: largest |Δ| of scores and maps (absolute, fp32) that :func:`verify` accepts
TOLERANCE = 1e-4
#: the batch size the graph is traced at (any batch size runs; 2 keeps batch-1 shortcuts out)
TRACE_BATCH = 2
_UNCHUNKED = 1 << 40


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ClipadError("exporting to ONNX needs the onnx package (and onnxruntime to verify): "
                          "pip install onnx onnxruntime") from None
    return onnx


# --------------------------------------------------------------------------- what can be exported


def export_refusal(det: Detector) -> str | None:
    """Why ``det`` cannot be one fixed graph (a one-line message with the fix), or None: each
    method says so itself (:meth:`~clipad.methods.base.Detector.export_refusal`)."""
    return det.export_refusal()


#: (module, function) of functions of sizes and constants only, whose results are constants of the
#: graph: their index arithmetic (unfold, affine_grid) has no ONNX form at opset 17 for a traced size
_SIZE_ONLY = (
    ("clipad.components.smoothing", "blur_matrix"),  # Gaussian smoothing of the maps
    ("clipad.methods.anoclip.model", "view_grids"),  # AnoCLIP's affine views
)

#: (attribute, value in the graph, why): Python-side settings a trace would pin to the export batch
_EXPORT_SETTINGS = (
    ("window_chunk", _UNCHUNKED, "window sequences in one tower call"),
    ("view_chunk", _UNCHUNKED, "the 22 views in one tower call"),
)


@contextlib.contextmanager
def fixed_graph(det: Detector) -> Iterator[dict[str, Any]]:
    """Within: ``det`` computes its scores as one batch-independent, input-independent-control-flow
    graph (see the module docstring), in fp32; restored on exit. Yields what differs from the
    eager path, for the manifest (``{"sinkhorn_iterations": 100}``)."""
    notes: dict[str, Any] = {}
    undo: list = []

    def set_attr(obj: Any, name: str, value: Any) -> None:
        undo.append(functools.partial(setattr, obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        set_attr(det, "opts", replace(det.opts, precision="fp32"))
        for attr, value, _ in _EXPORT_SETTINGS:
            if hasattr(det, attr):
                set_attr(det, attr, value)
        if hasattr(det, "ot_tol") and getattr(det, "assignment", "ot") == "ot" and getattr(det, "n_subspaces", 1) > 1:
            set_attr(det, "ot_tol", 0.0)  # no data-dependent early stop: exactly ot_iters iterations
            notes["sinkhorn_iterations"] = int(det.ot_iters)
        pq = getattr(det, "pq_adapter", None)
        if pq is not None:  # AdaptCLIP: its nearest-reference search chunks the batch
            module = importlib.import_module(type(pq).__module__)
            near = getattr(module, "nearest_reference", None)
            if near is not None:
                set_attr(module, "nearest_reference", functools.partial(near, chunk=_UNCHUNKED))
        for module_name, function in _SIZE_ONLY:
            module = importlib.import_module(module_name)
            set_attr(module, function, _memoized(getattr(module, function)))
        bb = det.backbone
        own = bb.positional_embedding
        cache: dict[tuple, torch.Tensor] = {}

        def positional_embedding(grid: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
            # computed once, eagerly (the warm-up pass), then a constant of the trace: antialiased
            # bicubic interpolation has no ONNX operator, and it depends on the grid only
            key = (tuple(int(g) for g in grid), mode)
            if key not in cache:
                cache[key] = own(key[0], mode).detach().clone()
            return cache[key]

        bb.positional_embedding = positional_embedding  # an instance attribute shadows the method
        undo.append(lambda: bb.__dict__.pop("positional_embedding", None))
        yield notes
    finally:
        for step in reversed(undo):
            step()


def _plain(value: Any) -> Any:
    """A size the trace hands over as a 0-d tensor -> int; anything else as is."""
    return int(value) if isinstance(value, torch.Tensor) and value.ndim == 0 else value


def _key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), tuple(value.flatten().tolist()))
    return value if isinstance(value, (int, float, str, bool, type(None), torch.dtype)) else str(value)


def _memoized(function):
    """``function`` (of sizes and constants only: :data:`_SIZE_ONLY`) computed once per argument
    set, eagerly, by the warm-up pass: the trace then takes its result as a constant."""
    cache: dict[tuple, torch.Tensor] = {}

    @functools.wraps(function)
    def memo(*args, **kwargs):
        args = tuple(_plain(a) for a in args)
        kwargs = {k: _plain(v) for k, v in kwargs.items()}
        key = (tuple(_key(a) for a in args), tuple(sorted((k, _key(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = function(*args, **kwargs).detach().clone()
        return cache[key]

    return memo


class _Graph(nn.Module):
    """``det.predict`` on model-sized images of one class: the module that is traced."""

    def __init__(self, det: Detector, class_name: str, input_format: str) -> None:
        super().__init__()
        self.det = det
        self.class_name = class_name
        self.input_format = input_format
        self.reference = det.reference_for(class_name)

    def train(self, mode: bool = True) -> _Graph:
        # torch.onnx.export switches modes; Detector.train would drop the cached text embeddings,
        # which must stay constants of the graph (the detector is in eval mode already)
        return self

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.input_format == "uint8":
            x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # as predict: float().div_(255)
        else:
            x = image.to(torch.float32)
        x = self.det.backbone.normalize(x)
        scores, maps = self.det.score_batch(x, self.class_name, self.reference)
        pred = self.det.decide(Prediction(scores.float(), maps.float()), self.class_name)
        out = [pred.image_scores]
        if pred.labels is not None:
            out.append(pred.labels)
        out.append(pred.anomaly_maps)
        if pred.masks is not None:
            out.append(pred.masks)
        return tuple(out)


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote: the model, its sidecar manifest, and how long it took."""

    path: Path
    sidecar: Path
    manifest: mf.Manifest
    seconds: float
    size_bytes: int


def _thresholds_entry(det: Detector, class_name: str) -> dict[str, Any] | None:
    th = det.thresholds_for(class_name) if hasattr(det, "thresholds_for") else None
    if th is None or (th.image is None and th.pixel is None):
        return None
    return {**th.to_json(), "image_threshold": th.output_threshold("image"),
            "pixel_threshold": th.output_threshold("pixel")}


def _dummy_input(input_format: str, size: tuple[int, int], batch: int = TRACE_BATCH) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if input_format == "uint8":
        return torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8, generator=g)
    return torch.rand(batch, 3, *size, generator=g)


def _check_export_args(det: Detector, input_format: str, opset: int) -> None:
    if not isinstance(det, Detector):
        raise InvalidValueError(f"export_onnx takes a clipad Detector; got {type(det).__name__}")
    if input_format not in mf.INPUT_FORMATS:
        raise InvalidValueError(f"input_format must be one of {', '.join(mf.INPUT_FORMATS)}; got {input_format!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InvalidValueError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}; got {opset!r}")
    refusal = export_refusal(det)
    if refusal:
        raise InvalidValueError(f"cannot export: {refusal}")


def _output_names(outputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Names of ``_Graph``'s outputs: pred_score, [pred_label], anomaly_map, [pred_mask]."""
    names = [mf.SCORE]
    if outputs[1].dtype == torch.bool:
        names.append(mf.LABEL)
    names.append(mf.MAP)
    if len(outputs) > len(names):
        names.append(mf.MASK)
    return names


def export_onnx(
    det: Detector,
    path: str | os.PathLike,
    *,
    class_name: str | None = None,
    input_format: str = "uint8",
    opset: int = DEFAULT_OPSET,
) -> ExportResult:
    """Write ``det`` for ``class_name`` (default "object") as an ONNX model at ``path`` plus its
    sidecar manifest ``<path>.json``; the manifest is also embedded in the model. Both are
    written atomically (a temporary file renamed into place).

    Args:
        det: any exportable detector (:func:`export_refusal`), with its references (k-shot) and
            calibrated thresholds set for ``class_name`` as ``predict`` would use them.
        input_format: "uint8" (RGB ``[B, H, W, 3]``) or "float" (``[B, 3, H, W]`` in [0, 1]).
        opset: ONNX opset, :data:`MIN_OPSET` .. :data:`MAX_OPSET`.

    Raises:
        InvalidValueError: a method that optimises per image, or a bad argument.
        ClipadError: the onnx package is missing.
        OSError: ``path`` cannot be written.
    """
    _check_export_args(det, input_format, opset)
    onnx = _require_onnx()
    if getattr(det, "tile_non_square", False):
        warnings.warn(
            f"{det.name} scores non-square images as overlapping square tiles; the exported graph takes the square "
            f"model size, so OnnxDetector resizes them to {det.image_size}x{det.image_size} instead (as "
            "tile_non_square=false): their scores differ from the torch detector's; square images are unaffected",
            ClipadWarning, stacklevel=2,
        )
    name = class_name or DEFAULT_CLASS
    path = Path(path)
    start = time.perf_counter()
    det.eval()
    graph = _Graph(det, name, input_format)
    dummy = _dummy_input(input_format, det.model_size).to(det.device)
    buffer = io.BytesIO()
    with fixed_graph(det) as notes, torch.no_grad():
        names = _output_names(graph(dummy))  # the eager warm-up: cached text and constants filled in
        with warnings.catch_warnings():
            # the tracer warns about each Python number taken from a tensor: fixed_graph pinned them
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (dummy,), buffer, dynamo=False, opset_version=opset,
                              input_names=[mf.INPUT_NAME], output_names=names,
                              dynamic_axes={n: {0: "batch"} for n in (mf.INPUT_NAME, *names)})
    model = onnx.load_from_string(buffer.getvalue())
    manifest = build_manifest(det, name, input_format, opset, names, notes)
    _write_model(path, model, manifest)
    return ExportResult(path=path, sidecar=mf.sidecar_path(path), manifest=manifest,
                        seconds=time.perf_counter() - start, size_bytes=path.stat().st_size)


def build_manifest(det: Detector, class_name: str, input_format: str, opset: int, outputs: list[str],
                   notes: dict[str, Any]) -> mf.Manifest:
    """The manifest of ``det`` exported for ``class_name`` (see :mod:`clipad.deploy.manifest`)."""
    options = det.options
    if options.get("checkpoint") is not None:  # the learned tensors are in the graph
        options["checkpoint"] = None
    options["precision"] = "fp32"
    ref = det.reference_for(class_name)
    h, w = det.model_size
    data = {
        "format": mf.FORMAT, "schema": mf.SCHEMA, "clipad_version": __version__,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": det.name, "options": options, "backbone": det.backbone.name, "pretrained": det.backbone.pretrained,
        "quick_gelu": det.backbone.quick_gelu, "image_size": det.image_size, "seed": det.seed,
        "class_name": class_name, "shots": int(ref["shots"]) if ref is not None and "shots" in ref else 0,
        "input": mf.input_contract(input_format, h, w),
        "outputs": list(outputs),
        "thresholds": _thresholds_entry(det, class_name),
        "opset": opset, "precision": "fp32",
        "fixed_graph": dict(notes),
        "verification": None,
    }
    return mf.parse_manifest(json.dumps(data, allow_nan=False), "the exported manifest")


def _write_model(path: Path, model: Any, manifest: mf.Manifest) -> None:
    """``model`` with ``manifest`` in its metadata to ``path``, and the sidecar, both atomically."""
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = mf.METADATA_KEY, manifest.to_json()
    model.producer_name, model.producer_version = "clipad", __version__
    model.doc_string = (f"clipad {manifest.method} anomaly detector for class '{manifest.class_name}'; input "
                        f"'{mf.INPUT_NAME}' {manifest.data['input']['dtype']} {manifest.data['input']['layout']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        f.write(model.SerializeToString())
    with atomic_write(mf.sidecar_path(path), "w") as f:
        f.write(manifest.to_json())


def record_verification(result: ExportResult, verification: Verification) -> ExportResult:
    """Write ``verification`` into the manifest of an exported model (embedded and sidecar)."""
    onnx = _require_onnx()
    data = {**result.manifest.data, "verification": verification.to_json()}
    manifest = mf.parse_manifest(json.dumps(data, allow_nan=False), "the exported manifest")
    _write_model(result.path, onnx.load(str(result.path)), manifest)
    return replace(result, manifest=manifest, size_bytes=result.path.stat().st_size)


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Verification:
    """The eager detector against onnxruntime on the same images (see :func:`verify`).

    max_score_diff / max_map_diff: largest absolute difference of scores / map values.
    batch_diff: largest |Δ| between onnxruntime on the whole batch and on its first image alone
        (the dynamic batch axis).
    label_agreement / mask_agreement: fraction of equal labels / mask pixels (None: no thresholds).
    labels_unexplained: labels that differ although the eager score is farther than
        ``tolerance`` from the threshold (a score within it may fall on either side: not a fault).
    """

    images: int
    max_score_diff: float
    max_map_diff: float
    batch_diff: float
    label_agreement: float | None
    mask_agreement: float | None
    labels_unexplained: int
    tolerance: float
    reference: str

    @property
    def passed(self) -> bool:
        return (max(self.max_score_diff, self.max_map_diff, self.batch_diff) <= self.tolerance
                and self.labels_unexplained == 0)

    def summary(self) -> str:
        parts = [f"{self.images} image(s)", f"max |Δscore| {self.max_score_diff:.2e}", f"max |Δmap| {self.max_map_diff:.2e}",
                 f"batch 1 vs {self.images} {self.batch_diff:.2e}"]
        if self.label_agreement is not None:
            differ = round((1.0 - self.label_agreement) * self.images)
            note = "" if differ == 0 else (f" ({differ - self.labels_unexplained} differing at a score within the "
                                            f"tolerance of the threshold, {self.labels_unexplained} farther)")
            parts.append(f"labels agree {self.label_agreement:.1%}{note}")
        if self.mask_agreement is not None:
            parts.append(f"mask pixels agree {self.mask_agreement:.4%}")
        verdict = "within" if self.passed else "BEYOND"
        return f"verify: {', '.join(parts)}; {verdict} tolerance {self.tolerance:g} (reference: {self.reference})"

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "max_score_diff": self.max_score_diff, "max_map_diff": self.max_map_diff,
                "batch_diff": self.batch_diff, "label_agreement": self.label_agreement,
                "mask_agreement": self.mask_agreement, "labels_unexplained": self.labels_unexplained,
                "tolerance": self.tolerance, "reference": self.reference, "passed": self.passed}


def verification_images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``n`` seeded test images, uint8 RGB ``[n, H, W, 3]``: smooth random colour fields (a low
    resolution field upsampled) with pixel noise and one bright square each, so that maps vary."""
    if n < 1:
        raise InvalidValueError(f"verify needs at least 1 image; got {n}")
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
        field += rng.normal(0.0, 12.0, field.shape).astype(np.float32)
        s = max(1, min(h, w) // 6)
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        field[y : y + s, x : x + s] = 255.0
        out[i] = np.clip(np.rint(field), 0, 255).astype(np.uint8)
    return out


def verify(
    det: Detector,
    path: str | os.PathLike,
    images: np.ndarray,
    *,
    class_name: str | None = None,
    tolerance: float = TOLERANCE,
) -> Verification:
    """Score uint8 RGB ``images`` ``[N, H, W, 3]`` at the model size with ``det`` (fp32, eager,
    through ``predict``) and with onnxruntime on the exported model at ``path``; compare.

    onnxruntime runs the whole batch and, separately, the first image alone (the batch axis of
    the graph is dynamic; the trace ran at batch 2)."""
    from .runtime import OnnxDetector

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InvalidValueError(f"verify takes uint8 RGB images [N, H, W, 3]; got {images.dtype} {tuple(images.shape)}")
    if tuple(images.shape[1:3]) != tuple(det.model_size):
        raise InvalidValueError(f"verify images must be at the model size {det.model_size}; got {tuple(images.shape[1:3])}")
    name = class_name or DEFAULT_CLASS
    runtime = OnnxDetector(path)
    with contextlib.ExitStack() as stack:
        saved = det.opts
        stack.callback(setattr, det, "opts", saved)
        det.opts = replace(det.opts, precision="fp32")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        ref = det.predict(x, class_name=name, batch_size=len(images))
    got = runtime.run(runtime.model_input(images))
    one = runtime.run(runtime.model_input(images[:1]))
    score_diff = float(np.abs(got[mf.SCORE] - ref.image_scores.numpy()).max())
    map_diff = float(np.abs(got[mf.MAP] - ref.anomaly_maps.numpy()).max())
    batch_diff = max(float(np.abs(one[mf.SCORE] - got[mf.SCORE][:1]).max()),
                     float(np.abs(one[mf.MAP] - got[mf.MAP][:1]).max()))
    agreement, unexplained = None, 0
    if ref.labels is not None and mf.LABEL in got:
        differ = got[mf.LABEL] != ref.labels.numpy()
        agreement = float(1.0 - differ.mean())
        near = np.abs(ref.image_scores.numpy() - np.float32(ref.image_threshold)) <= tolerance
        unexplained = int((differ & ~near).sum())
    masks = None if ref.masks is None or mf.MASK not in got else float((got[mf.MASK] == ref.masks.numpy()).mean())
    if not all(math.isfinite(v) for v in (score_diff, map_diff, batch_diff)):  # NaN compares as "within"
        score_diff = map_diff = batch_diff = math.inf
    reference = "eager detector in fp32"
    if runtime.manifest.data.get("fixed_graph", {}).get("sinkhorn_iterations"):
        reference += f", Sinkhorn stopping at ot_tol={det.ot_tol:g} (the graph runs all {det.ot_iters} iterations)"
    return Verification(images=len(images), max_score_diff=score_diff, max_map_diff=map_diff, batch_diff=batch_diff,
                        label_agreement=agreement, mask_agreement=masks, labels_unexplained=unexplained,
                        tolerance=float(tolerance), reference=reference)


def export_and_verify(
    det: Detector,
    path: str | os.PathLike,
    *,
    class_name: str | None = None,
    input_format: str = "uint8",
    opset: int = DEFAULT_OPSET,
    verify_images: np.ndarray | int = 0,
    tolerance: float = TOLERANCE,
) -> tuple[ExportResult, Verification | None]:
    """:func:`export_onnx`, then (``verify_images``: a count of seeded images or the images
    themselves) :func:`verify`, recorded in the manifest."""
    result = export_onnx(det, path, class_name=class_name, input_format=input_format, opset=opset)
    if isinstance(verify_images, int):
        if verify_images == 0:
            return result, None
        verify_images = verification_images(verify_images, det.model_size)
    check = verify(det, result.path, verify_images, class_name=class_name, tolerance=tolerance)
    return record_verification(result, check), check
