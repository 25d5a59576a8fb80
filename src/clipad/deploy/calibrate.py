"""Calibrated pass/fail decisions: thresholds from the data a user has.

Two strategies, both storing :class:`~clipad.methods.base.Thresholds` in the detector (per
class; ``det.save`` keeps them, :meth:`~clipad.methods.base.Detector.predict` applies them):

**Normal images only** (``strategy="fpr"``, the common case). The image threshold targets a
false-positive rate ``fpr`` on *new* normal images, by split conformal prediction: with ``n``
calibration scores ``s_(1) <= ... <= s_(n)`` and ``k = ceil((n + 1)(1 - fpr))``, an image is
anomalous when its score is above ``s_(k)``. For a new normal image exchangeable with the
calibration ones, ``P(score > s_(k)) <= (n + 1 - k) / (n + 1) <= fpr`` (ties included). The
stored threshold is the next float32 above ``s_(k)``, so that the rule ``score >= threshold``
(predict's, serve's) is exactly ``score > s_(k)``. It needs ``k <= n``, i.e.
``n >= ceil(1 / fpr) - 1`` images (:func:`min_images`); fewer raise an error.

The achieved FPR is random through the calibration sample: for continuous scores it is
``Beta(n + 1 - k, k)`` distributed (Vovk 2012, "Conditional validity of inductive conformal
predictors"; Angelopoulos & Bates, "A gentle introduction to conformal prediction"), whose
``confidence`` quantile (:func:`fpr_upper_bound`) is reported. :func:`images_needed` gives the
``n`` from which that bound stays within ``factor`` x the target for every larger ``n``: for
``fpr=0.01`` at 95%, 99 images place a threshold, but the bound is within 2x the target (2%)
only from 313 images on; fewer give a :class:`~clipad.errors.ClipadWarning`.

The pixel threshold targets a per-pixel FPR ``pixel_fpr`` over every pixel of the normal images'
maps (as ``predict`` returns them, at each image's size) with the same order statistic over the
``N`` pixels. Pixels of one image are not exchangeable (neighbours are correlated), so no bound
is given: the fraction of calibration pixels above it is reported, and the rate on new images
can be several times the target (pixels of one image move together: generated images on the tiny
random backbone gave 0.0037 on 300 new images for 0.001). Default ``pixel_fpr = 0.001``:
on a normal image 0.1% of the area is flagged on average (65 pixels of a 256 x 256 image), ten
times less than the image-level default, so masks of normal images are nearly empty while
defects of a few hundredths of the image area are still far above it; any image set has enough
pixels for it (``N >= 999``). Exact with bounded memory: only the ``floor((N + 1) pixel_fpr)``
largest values can hold the order statistic, so a buffer of that many values (plus one batch's
maps) is kept while the maps stream by (:class:`TopValues`): 4 MB for 1000 images of 1 MP at
the default; at most :data:`MAX_PIXEL_BUFFER` values.

**Labelled validation data** (``strategy="f1max"``, a :class:`~clipad.data.AnomalyDataset`,
the layouts of ``clipad eval``): anomalib's adaptive threshold, the one maximising F1 over all
candidate thresholds (the scores themselves), at image level and, where masks exist, at pixel
level (:func:`clipad.eval.metrics.f1_max_threshold`). Pixels are compared as ``clipad eval``
compares them: maps at the model input size, masks resized there by nearest neighbour (so the
pixel F1 is the one ``clipad eval`` reports); memory: the class's maps as float32 plus masks.

**Normalisation** (``normalize=True``, off by default; anomalib's convention): scores and maps
are then returned as ``clip((x - threshold) / (max - min) + 0.5, 0, 1)``, ``min``/``max``
those of the calibration scores (maps), so the threshold sits at 0.5
(:func:`~clipad.methods.base.normalize_min_max`).
"""

from __future__ import annotations

import math
import sys
import types
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import (
    ClipadError,
    ClipadWarning,
    InvalidTypeError,
    InvalidValueError,
    SkippedInputWarning,
)
from ..methods.base import Detector, Prediction, Thresholds
from ..version import __version__

__all__ = [
    "CONFIDENCE", "DEFAULT_FPR", "DEFAULT_PIXEL_FPR", "MAX_PIXEL_BUFFER", "Calibration", "NormalCalibrator",
    "TopValues", "calibrate", "conformal_rank", "conformal_threshold", "fpr_upper_bound", "images_needed",
    "min_images", "pixel_count",
]

DEFAULT_FPR = 0.01
DEFAULT_PIXEL_FPR = 0.001
CONFIDENCE = 0.95
#: Largest pixel buffer of the exact pixel quantile (values, 4 bytes each: 256 MiB).
MAX_PIXEL_BUFFER = 2**26


# --------------------------------------------------------------------------- the statistics


def _rate(name: str, value: Any) -> Fraction:
    """A rate in (0, 1) as an exact fraction (its decimal form: 0.01 -> 1/100)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"{name} must be a number in (0, 1); got {type(value).__name__}")
    if not (math.isfinite(value) and 0 < value < 1):
        raise InvalidValueError(f"{name} must be a number in (0, 1) (e.g. 0.01 for 1%); got {value}")
    return Fraction(repr(float(value)))


def conformal_rank(n: int, fpr: float) -> int:
    """``k = ceil((n + 1)(1 - fpr))``, computed exactly: the conformal threshold is the k-th
    smallest of ``n`` calibration scores (``k > n``: too few scores to place it)."""
    return math.ceil((n + 1) * (1 - _rate("fpr", fpr)))


def min_images(fpr: float) -> int:
    """Fewest calibration scores that place a conformal threshold at ``fpr``: ``ceil(1/fpr) - 1``."""
    return math.ceil(1 / _rate("fpr", fpr)) - 1


def fpr_upper_bound(n: int, fpr: float, confidence: float = CONFIDENCE) -> float:
    """The ``confidence`` quantile of the FPR on new normal images achieved by the conformal
    threshold from ``n`` scores: ``Beta(n + 1 - k, k)``, ``k = conformal_rank(n, fpr)``
    (continuous scores; ties only lower it)."""
    from scipy.stats import beta

    _rate("confidence", confidence)
    k = conformal_rank(n, fpr)
    if k > n:
        raise InvalidValueError(f"{n} scores cannot place a threshold at FPR {fpr:g}; at least {min_images(fpr)} are needed")
    return float(beta.ppf(confidence, n + 1 - k, k))


def images_needed(fpr: float, factor: float = 2.0, confidence: float = CONFIDENCE) -> int:
    """Fewest normal images ``n0`` such that for every ``n >= n0`` the :func:`fpr_upper_bound`
    is at most ``factor * fpr`` (e.g. 313 for a 1% FPR within 2x at 95%).

    The bound is a saw-tooth in ``n``: on each stretch where ``l = n + 1 - k`` is constant it
    falls, and it jumps up where ``l`` grows; those peaks fall with ``l``. So the answer lies in
    the stretch before the first peak within the target, found by bisection.
    """
    a = _rate("fpr", fpr)
    if not (math.isfinite(factor) and factor > 1):
        raise InvalidValueError(f"factor must be a number > 1; got {factor}")
    target = factor * float(a)

    def bound(n: int) -> float:
        return fpr_upper_bound(n, float(a), confidence)

    def first_n(l: int) -> int:  # smallest n with n + 1 - k(n) = floor((n + 1) a) = l
        return math.ceil(l / a) - 1

    lo_l = 1
    while bound(first_n(lo_l)) > target:
        lo_l += 1
    if lo_l == 1:
        return first_n(1)
    lo, hi = first_n(lo_l - 1), first_n(lo_l)  # bound(hi) <= target; find the first n of the stretch below it
    while lo < hi:
        mid = (lo + hi) // 2
        if bound(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _next_float32(value: torch.Tensor) -> float:
    """The smallest float32 above ``value`` (a float32 scalar): ``x >= it`` <=> ``x > value``."""
    return float(torch.nextafter(value.float(), torch.tensor(math.inf)))


def conformal_threshold(scores: torch.Tensor, fpr: float) -> float:
    """scores [n] (normal images) -> the threshold t with ``score >= t`` <=> ``score > s_(k)``,
    ``k = conformal_rank(n, fpr)`` (see the module docstring).

    Raises:
        InvalidValueError: too few scores for ``fpr`` (fewer than :func:`min_images`).
    """
    s = scores.detach().flatten().float().cpu()
    n = s.numel()
    k = conformal_rank(n, fpr)
    if k > n:
        raise InvalidValueError(
            f"{n} normal image(s) cannot place a threshold at FPR {fpr:g}: the conformal threshold is the "
            f"ceil((n+1)(1-fpr)) = {k}-th smallest score; give at least {min_images(fpr)} normal images "
            f"({images_needed(fpr)} for a 95% upper bound within 2x the target), or a target fpr >= {1 / (n + 1):.3g}"
        )
    return _next_float32(torch.kthvalue(s, k).values)


class TopValues:
    """The ``capacity`` largest of a stream of float32 values, plus their count, min and max:
    exact high order statistics in memory ``capacity`` + one chunk."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.top = torch.empty(0)
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().flatten().float().cpu()
        if not v.numel():
            return
        self.count += v.numel()
        lo, hi = torch.aminmax(v)
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
        if self.capacity == 0:
            return
        if self.top.numel() >= self.capacity:
            v = v[v > self.top.min()]  # an equal value changes no order statistic of the kept ones
        both = torch.cat([self.top, v])
        self.top = both if both.numel() <= self.capacity else torch.topk(both, self.capacity, sorted=False).values

    def largest(self, m: int) -> torch.Tensor:
        """The m-th largest value seen (1-based; m <= capacity), a float32 scalar."""
        if not 1 <= m <= min(self.capacity, self.top.numel()):
            raise InvalidValueError(f"the {m}-th largest value is not kept (capacity {self.capacity}, {self.top.numel()} kept)")
        return torch.topk(self.top, m).values[-1]


def pixel_count(image: Any) -> int:
    """``H * W`` of an input ``predict`` accepts ([3, H, W] or [B, 3, H, W] tensors: all of
    them; a PIL image; a file, from its header): the size of the maps ``predict`` returns."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1] * image.shape[-2] * (image.shape[0] if image.dim() == 4 else 1))
    if hasattr(image, "size") and hasattr(image, "mode"):  # PIL
        return int(image.size[0] * image.size[1])
    from PIL import Image

    try:
        with Image.open(image) as im:
            return int(im.size[0] * im.size[1])
    except Exception:  # noqa: BLE001 - unreadable: predict reports it; it adds no pixels
        return 0


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Calibration:
    """What one class's calibration gave: its key in ``det.thresholds`` ("" = every class
    without its own) and the :class:`Thresholds` (figures in ``thresholds.provenance``)."""

    class_name: str
    thresholds: Thresholds

    def summary(self) -> str:
        """A few lines for people: thresholds, sample sizes, the FPR bound."""
        p, t = self.thresholds.provenance, self.thresholds
        who = f"class '{self.class_name}'" if self.class_name else "default (every class without its own)"
        lines = [f"{who}: {p['strategy']} calibration from {p['n_images']} image(s)"]
        if p["strategy"] == "fpr":
            lines.append(
                f"  image threshold {t.image:.6g}: target FPR {p['fpr_target']:.4g}, the {p['order_statistic']}-th "
                f"smallest of {p['n_images']} normal scores; FPR on new normal images: expected "
                f"{p['expected_fpr']:.4g}, {p['confidence']:.0%} upper bound {p['fpr_bound']:.4g} "
                f"({p['images_needed']} images keep that bound within 2x the target)")
            if t.pixel is not None:
                lines.append(f"  pixel threshold {t.pixel:.6g}: target pixel FPR {p['pixel_fpr_target']:.4g} over "
                             f"{p['n_pixels']} pixels; {p['pixel_fpr_calibration']:.4g} of them at or above it")
        else:
            lines.append(f"  image threshold {t.image:.6g}: F1-max {p['image_f1']:.4f} "
                         f"({p['n_anomalous']} anomalous, {p['n_images'] - p['n_anomalous']} normal)")
            if t.pixel is not None:
                lines.append(f"  pixel threshold {t.pixel:.6g}: pixel F1-max {p['pixel_f1']:.4f} over "
                             f"{p['n_pixels']} pixels at {p['eval_size']} px")
            else:
                lines.append("  no pixel threshold: no anomalous image with a mask")
        if t.image_range is not None:
            lines.append("  scores and maps are min-max normalised to [0, 1], thresholds at 0.5")
        return "\n".join(lines)


def _provenance(det: Detector, strategy: str, class_name: str, **figures: Any) -> dict[str, Any]:
    return {"strategy": strategy, "class_name": class_name, "method": det.name, "clipad_version": __version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **figures}


# --------------------------------------------------------------------------- normal images


class NormalCalibrator:
    """Accumulates raw predictions of normal images (:meth:`add`), then places the thresholds
    (:meth:`finish`). ``max_pixels``: an upper bound of the total map pixels to come (sizes the
    exact pixel buffer; :func:`pixel_count`); ``pixel_fpr`` None: no pixel threshold."""

    def __init__(self, fpr: float = DEFAULT_FPR, pixel_fpr: float | None = DEFAULT_PIXEL_FPR, *,
                 max_pixels: int, confidence: float = CONFIDENCE) -> None:
        _rate("fpr", fpr)
        _rate("confidence", confidence)
        self.fpr, self.pixel_fpr, self.confidence = float(fpr), pixel_fpr, float(confidence)
        capacity = 0
        if pixel_fpr is not None:
            capacity = math.floor((max(int(max_pixels), 0) + 1) * _rate("pixel_fpr", pixel_fpr))
            if capacity > MAX_PIXEL_BUFFER:
                raise InvalidValueError(
                    f"pixel_fpr={pixel_fpr:g} over {max_pixels} pixels keeps {capacity} values, more than "
                    f"{MAX_PIXEL_BUFFER}: lower pixel_fpr, or calibrate on fewer or smaller images")
        self.scores: list[torch.Tensor] = []
        self.pixels = TopValues(capacity)

    def add(self, pred: Prediction) -> None:
        """Raw scores and maps of normal images (``predict(..., calibrated=False)``)."""
        self.scores.append(pred.image_scores.detach().float().cpu())
        if self.pixel_fpr is not None:
            maps = pred.anomaly_maps
            for m in maps if isinstance(maps, list) else [maps]:
                self.pixels.add(m)

    def finish(self, det: Detector, class_name: str, normalize: bool = False) -> Thresholds:
        """The thresholds of the images added so far. Warns (:class:`ClipadWarning`) when the
        FPR bound is over twice the target; raises when too few images place the threshold."""
        scores = torch.cat(self.scores) if self.scores else torch.empty(0)
        n = scores.numel()
        image = conformal_threshold(scores, self.fpr)
        k = conformal_rank(n, self.fpr)
        bound, need = fpr_upper_bound(n, self.fpr, self.confidence), images_needed(self.fpr, 2.0, self.confidence)
        if n < need:
            warnings.warn(
                f"{n} normal images place the threshold at FPR {self.fpr:g}, but the FPR on new images has a "
                f"{self.confidence:.0%} upper bound of {bound:.3g} ({bound / self.fpr:.1f}x the target): "
                f"{need} images keep it within 2x", ClipadWarning, stacklevel=3)
        figures: dict[str, Any] = {
            "n_images": n, "fpr_target": self.fpr, "order_statistic": k, "expected_fpr": (n + 1 - k) / (n + 1),
            "fpr_bound": bound, "confidence": self.confidence, "images_needed": need,
        }
        pixel = None
        if self.pixel_fpr is not None:
            total = self.pixels.count
            kp = conformal_rank(total, self.pixel_fpr)
            if kp > total:
                raise InvalidValueError(f"{total} pixels cannot place a threshold at pixel FPR {self.pixel_fpr:g}; "
                                        f"at least {min_images(self.pixel_fpr)} are needed")
            value = self.pixels.largest(total - kp + 1)
            pixel = _next_float32(value)
            figures.update(pixel_fpr_target=float(self.pixel_fpr), n_pixels=total,
                           pixel_fpr_calibration=int((self.pixels.top > value).sum()) / total)
        return Thresholds(
            image=image, pixel=pixel,
            image_range=(float(scores.min()), float(scores.max())) if normalize else None,
            pixel_range=(self.pixels.min, self.pixels.max) if normalize and pixel is not None else None,
            provenance=_provenance(det, "fpr", class_name, normalized=normalize, **figures),
        )


def _calibrate_normal(det: Detector, images, class_name: str | None, *, fpr: float, pixel_fpr: float | None,
                      normalize: bool, confidence: float, batch_size: int) -> Thresholds:
    items = list(images) if not isinstance(images, torch.Tensor) else list(images.unbind(0)) if images.dim() == 4 else [images]
    cal = NormalCalibrator(fpr, pixel_fpr, max_pixels=sum(map(pixel_count, items)), confidence=confidence)
    for start in range(0, len(items), batch_size):
        cal.add(det.predict(items[start:start + batch_size], class_name=class_name, batch_size=batch_size, calibrated=False))
    return cal.finish(det, class_name or "", normalize)


# --------------------------------------------------------------------------- labelled data


class _ModelInput:
    """PIL image -> [3, h, w] float at the detector's input size for it, resized as ``predict``."""

    def __init__(self, input_size) -> None:
        self.input_size = input_size

    def __call__(self, image):
        from ..data.transforms import pil_to_tensor, resize_batch

        t = pil_to_tensor(image)
        return resize_batch([t], self.input_size(tuple(t.shape[-2:])), t.device)[0]


def _score_labelled(det: Detector, samples, class_name: str, *, batch_size: int, max_pixels: int | None):
    """-> (scores [n], labels [n] bool, maps [n, S, S] at the model size, masks [n, S, S] bool,
    has_mask [n] bool) of the samples that could be read (the others: SkippedInputWarning)."""
    from ..data import make_loader
    from ..data.transforms import equal_runs

    size = det.image_size
    scores, labels, maps, masks, known = [], [], [], [], []
    for batch in make_loader(samples, batch_size, transform=_ModelInput(det.input_size), max_pixels=max_pixels):
        for fail in batch.failures:
            warnings.warn(str(fail), SkippedInputWarning, stacklevel=3)
        images = [batch.images] if isinstance(batch.images, torch.Tensor) else [
            torch.stack(list(batch.images)[i:j]) for i, j in equal_runs([tuple(t.shape) for t in batch.images])]
        for run in images:
            s, m = det.score_normalized(det.backbone.normalize(run.to(det.device)), class_name=class_name)
            if tuple(m.shape[-2:]) != (size, size):  # aspect-keeping methods: to the square eval size
                m = F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            scores.append(s.cpu())
            maps.append(m.cpu())
        for smp, mk in zip(batch.samples, batch.masks):
            labels.append(bool(smp.label))
            known.append(mk is not None)
            masks.append(torch.zeros(size, size, dtype=torch.bool) if mk is None else
                          F.interpolate(mk[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0.5)
    if not scores:
        return None
    return torch.cat(scores), torch.tensor(labels), torch.cat(maps), torch.stack(masks), torch.tensor(known)


def _calibrate_labelled(det: Detector, samples, class_name: str, *, normalize: bool, batch_size: int,
                        max_pixels: int | None) -> Thresholds | None:
    from ..eval.metrics import f1_max_threshold

    scored = _score_labelled(det, samples, class_name, batch_size=batch_size, max_pixels=max_pixels)
    if scored is None:
        warnings.warn(f"class '{class_name}': no image could be read; not calibrated", ClipadWarning, stacklevel=3)
        return None
    scores, labels, maps, masks, known = scored
    if not bool(labels.any()) or bool(labels.all()):
        warnings.warn(f"class '{class_name}': {int(labels.sum())} anomalous and {int((~labels).sum())} normal images: "
                      "F1-max needs both; not calibrated (for normal images only, calibrate at a target FPR)",
                      ClipadWarning, stacklevel=3)
        return None
    f1, image = f1_max_threshold(scores, labels)
    figures: dict[str, Any] = {"n_images": int(labels.numel()), "n_anomalous": int(labels.sum()), "image_f1": f1,
                               "eval_size": det.image_size}
    pixel = None
    pix_maps, pix_masks = maps[known], masks[known]
    if bool(pix_masks.any()):
        pixel_f1, pixel = f1_max_threshold(pix_maps.flatten(), pix_masks.flatten())
        figures.update(pixel_f1=pixel_f1, n_pixels=int(pix_masks.numel()))
    return Thresholds(
        image=image, pixel=pixel,
        image_range=(float(scores.min()), float(scores.max())) if normalize else None,
        pixel_range=(float(maps.min()), float(maps.max())) if normalize and pixel is not None else None,
        provenance=_provenance(det, "f1max", class_name, normalized=normalize, **figures),
    )


# --------------------------------------------------------------------------- entry point


def calibrate(
    det: Detector,
    images: torch.Tensor | Sequence[Any] | None = None,
    *,
    dataset=None,
    class_name: str | None = None,
    classes: Iterable[str] | None = None,
    fpr: float = DEFAULT_FPR,
    pixel_fpr: float | None = DEFAULT_PIXEL_FPR,
    normalize: bool = False,
    confidence: float = CONFIDENCE,
    batch_size: int = 16,
    max_pixels: int | None = None,
) -> list[Calibration]:
    """Calibrate ``det``'s pass/fail thresholds and keep them in it (``det.save`` stores them).

    Args:
        det: the detector, with the references it will run with already set.
        images: normal images (anything ``predict`` takes), none of them a reference image:
            thresholds at target false-positive rates (``strategy="fpr"``).
        dataset: instead, a labelled :class:`~clipad.data.AnomalyDataset`: F1-max thresholds for
            each of its classes (``classes``: only these), from its test split.
        class_name: with ``images``, the class they are of (prompts and the key the thresholds are
            kept under; None: "", every class without its own).
        fpr / pixel_fpr: target false-positive rates of images / pixels (``pixel_fpr`` None: no
            pixel threshold).
        normalize: also min-max normalise scores and maps to [0, 1], thresholds at 0.5.
        confidence: of the reported upper bound of the FPR on new images.
        batch_size: images per model call. max_pixels: size limit of dataset files (None: Pillow's).

    Returns:
        One :class:`Calibration` per class calibrated.

    Raises:
        InvalidValueError: both or neither of ``images`` and ``dataset``; too few normal images
            for ``fpr`` (:func:`min_images`); no class of the dataset could be calibrated.
    """
    if (images is None) == (dataset is None):
        raise InvalidValueError("calibrate takes normal images or a labelled dataset (one of them); "
                                f"got {'both' if images is not None else 'neither'}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if images is not None:
        if class_name is not None and (not isinstance(class_name, str) or not class_name.strip()):
            raise InvalidValueError(f"class_name must be a non-empty string or None; got {class_name!r}")
        th = _calibrate_normal(det, images, class_name, fpr=fpr, pixel_fpr=pixel_fpr, normalize=normalize,
                               confidence=confidence, batch_size=batch_size)
        det.set_thresholds(th, class_name)
        return [Calibration(class_name or "", th)]
    if class_name is not None:
        raise InvalidValueError(f"class_name={class_name!r} is for normal images; a dataset's classes are its own "
                                "(choose some with classes=[...])")
    names = list(classes) if classes is not None else list(dataset.classes)
    missing = [c for c in names if c not in dataset.classes]
    if missing:
        raise InvalidValueError(f"class(es) {missing} not in the dataset; it has: {', '.join(dataset.classes)}")
    out = []
    for cls in names:
        samples = dataset.filter(class_name=cls, split="test")
        th = _calibrate_labelled(det, samples, cls, normalize=normalize, batch_size=batch_size, max_pixels=max_pixels)
        if th is not None:
            det.set_thresholds(th, cls)
            out.append(Calibration(cls, th))
    if not out:
        raise ClipadError("no class of the dataset could be calibrated (see the warnings): F1-max needs normal and "
                          "anomalous images of a class")
    return out


class _CallableModule(types.ModuleType):
    """``clipad.deploy.calibrate(det, ...)`` works whether the name is bound to this module (any
    ``import clipad.deploy.calibrate`` binds it so) or to the function :func:`calibrate`."""

    def __call__(self, *args: Any, **kwargs: Any) -> list[Calibration]:
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
