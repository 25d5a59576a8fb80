"""Heatmap overlays and ROC / PR plots for people to look at.

Everything here draws with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``), never
``pyplot``: pyplot keeps global figure state, which leaks memory in long ``clipad predict``
runs and is not thread-safe. Functions return arrays or ``PIL.Image``; only the ``save_*``
functions touch the file system.

The curve helpers (:func:`roc_curve_points`, :func:`pr_curve_points`) exist to draw curves; the
project's reference metrics live in :mod:`clipad.metrics`.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> img = Image.new("RGB", (64, 48), "gray")
    >>> amap = np.random.default_rng(0).random((48, 64)).astype("float32")
    >>> overlay(img, amap).shape
    (48, 64, 3)
    >>> heatmap_figure(img, amap, score=0.7, title="x.png").mode
    'RGB'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from ..errors import InvalidValueError
from .files import atomic_write, display_text

ImageLike = Union[Image.Image, np.ndarray]

#: Colour of NaN pixels in :func:`colorize` (mid grey: reads as "no value", unlike any cmap colour).
NAN_RGB = (128, 128, 128)

#: Long side, in pixels, of each panel of :func:`heatmap_figure`; larger inputs are reduced to
#: it before plotting, so what is drawn is what is seen (matplotlib's own downsampling of a
#: bigger array would blur away one-pixel peaks that the block-max reduction keeps).
DISPLAY_MAX_SIDE = 512

# More curve points than this are thinned before plotting: pixel-level curves have millions of
# distinct thresholds, which matplotlib would draw slowly and invisibly finer than a pixel.
_MAX_PLOT_POINTS = 4000


# --------------------------------------------------------------------------------------------
# Arrays: colour mapping and overlays
# --------------------------------------------------------------------------------------------


def colorize(amap: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """Map values to colours through a matplotlib colormap.

    Args:
        amap: ``[H, W]`` float values. NaN pixels get :data:`NAN_RGB`; ``±inf`` saturate.
        vmin, vmax: values mapped to the bottom and top of the colormap; values outside are
            clipped. ``vmin == vmax`` (a constant map) is allowed: values equal to it get the
            middle colour, values below / above the bottom / top colour.
        cmap: a matplotlib colormap name.

    Returns:
        ``[H, W, 3]`` uint8 RGB.
    """
    amap = np.asarray(amap)
    if amap.ndim != 2:
        raise InvalidValueError(f"anomaly map must be 2-D [H, W], got shape {tuple(amap.shape)}; pass one map, e.g. maps[i]")
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise InvalidValueError(f"vmin and vmax must be finite, got vmin={vmin}, vmax={vmax}; leave them None for the map's own range")
    if vmax < vmin:
        raise InvalidValueError(f"vmax ({vmax}) is smaller than vmin ({vmin}); swap them")
    # A 256-entry lookup table instead of calling the colormap per pixel: the call builds
    # float RGBA arrays 4x the map size, too slow and memory-hungry for 8000x8000 maps.
    lut = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]
    values = amap.astype(np.float32, copy=False)
    if vmax > vmin:
        t = (values - np.float32(vmin)) * np.float32(1.0 / (vmax - vmin))
    else:
        # The limit of a vanishing range: a step at vmin, with vmin itself in the middle.
        t = np.where(values > vmin, 1.0, np.where(values < vmin, 0.0, 0.5)).astype(np.float32)
    nan = np.isnan(t)
    index = np.clip(np.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0) * 255.0 + 0.5, 0, 255)
    rgb = lut[index.astype(np.uint8)]
    rgb[nan] = NAN_RGB
    return rgb


def overlay(
    image: ImageLike,
    amap: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """Blend a colour-mapped anomaly map over an image.

    Args:
        image: ``PIL.Image`` (any mode) or ``[H, W, 3]`` / ``[H, W]`` uint8 array.
        amap: ``[H, W]`` float anomaly map, same size as ``image``. NaN pixels show the image.
        vmin, vmax: colour range; default the finite min / max of ``amap``.
        alpha: weight of the colour in ``[0, 1]``.
        cmap: matplotlib colormap name.

    Returns:
        ``[H, W, 3]`` uint8 RGB.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InvalidValueError(f"alpha must be in [0, 1] (0: image only, 1: heatmap only), got {alpha}")
    rgb = to_rgb_array(image)
    amap = _check_map(amap, rgb.shape[:2])
    lo, hi = value_range(amap, vmin, vmax)
    colour = colorize(amap, lo, hi, cmap).astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colour
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    nan = np.isnan(amap)
    if nan.any():
        out[nan] = rgb[nan]
    return out


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """``PIL.Image`` or uint8 ``[H, W]`` / ``[H, W, 3]`` / ``[H, W, 4]`` -> ``[H, W, 3]`` uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise InvalidValueError(
            f"image array must be uint8 (0-255), got {arr.dtype}; "
            "convert with (x * 255).round().astype(np.uint8) if it is a float image in [0, 1]"
        )
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return arr[:, :, :3]
    raise InvalidValueError(f"image array must be [H, W], [H, W, 3] or [H, W, 4] (channels last), got {arr.shape}")


def value_range(
    amap: np.ndarray, vmin: float | None = None, vmax: float | None = None
) -> tuple[float, float]:
    """Colour range: the given bounds, or the finite min / max of ``amap`` (0, 0 if none)."""
    if vmin is None or vmax is None:
        # fmin / fmax skip NaN without copying the map; only maps holding ±inf need a mask.
        lo = float(np.fmin.reduce(amap, axis=None)) if amap.size else math.nan
        hi = float(np.fmax.reduce(amap, axis=None)) if amap.size else math.nan
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = amap[np.isfinite(amap)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    return float(vmin), float(vmax)


def _image_size(image: ImageLike) -> tuple[int, int]:
    """``(H, W)`` of a PIL image or array without converting it."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    shape = np.shape(image)
    return int(shape[0]), int(shape[1])


def _check_map(amap: np.ndarray, size: tuple[int, int], what: str = "anomaly map") -> np.ndarray:
    arr = np.asarray(amap)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]  # a [1, H, W] map, as sliced from a batch
    if arr.shape != tuple(size):
        raise InvalidValueError(
            f"{what} has shape {tuple(arr.shape)} but the image is {size[0]}x{size[1]} (HxW); "
            "resize the map to the image size first (Prediction.anomaly_maps already are)"
        )
    if arr.dtype == bool:
        return arr
    return arr.astype(np.float32, copy=False)


def fit_for_display(
    image: ImageLike,
    amap: np.ndarray,
    mask: np.ndarray | None = None,
    max_side: int = DISPLAY_MAX_SIDE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Shrink an image, its map and its mask together so the long side is at most ``max_side``.

    The map and mask are reduced by block *maximum* (factor ``ceil(long side / max_side)``),
    so a one-pixel defect or peak stays visible; the image is resampled to the same grid.

    Args:
        image: PIL image or uint8 ``[H, W(, C)]`` array.
        amap: ``[H, W]`` float map.
        mask: ``[H, W]`` ground truth (nonzero = anomalous) or None.

    Returns:
        ``(rgb [h, w, 3] uint8, amap [h, w] float32, mask [h, w] bool | None)``.
    """
    size = _image_size(image)
    amap = _check_map(amap, size)
    if mask is not None:
        mask = _check_map(np.asarray(mask) != 0, size, what="mask")
    h, w = size
    factor = max(1, math.ceil(max(h, w) / max_side))
    if factor == 1:
        return to_rgb_array(image), amap, mask
    small_map = _block_max(amap, factor)
    small_h, small_w = small_map.shape
    pil = image if isinstance(image, Image.Image) else Image.fromarray(to_rgb_array(image))
    # reducing_gap: PIL first shrinks by an integer factor in JPEG-like blocks, then resamples;
    # an 8000x8000 image takes ~0.1 s instead of ~1 s, with no visible difference.
    if pil.mode not in ("RGB", "RGBA", "L", "LA"):
        pil = pil.convert("RGB")  # palette / binary / 16-bit modes cannot be resampled as-is
    # Resizing before converting: convert() copies even an RGB image, 0.1 s at 8000x8000.
    small = pil.resize((small_w, small_h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    small_img = np.asarray(small if small.mode == "RGB" else small.convert("RGB"))
    small_mask = None if mask is None else _block_max(mask.astype(np.float32), factor) > 0
    return small_img, small_map, small_mask


def _block_max(x: np.ndarray, k: int) -> np.ndarray:
    """``[H, W]`` -> ``[ceil(H/k), ceil(W/k)]`` maxima over k x k blocks, ignoring NaN."""
    h, w = x.shape
    ph, pw = -h % k, -w % k
    if ph or pw:
        x = np.pad(x, ((0, ph), (0, pw)), constant_values=np.nan)
    h, w = h + ph, w + pw
    # fmax ignores NaN unless both are NaN, so all-NaN blocks stay NaN without a warning.
    # Rows first over contiguous memory, then columns on the k-times smaller result: 6x faster
    # than one reduction over a [h/k, k, w/k, k] view.
    rows = np.fmax.reduce(x.reshape(h // k, k, w), axis=1)
    return np.fmax.reduce(rows.reshape(h // k, w // k, k), axis=2)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _render(fig: Figure) -> Image.Image:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(rgba[:, :, :3].copy(), mode="RGB")


def _title_text(title: str | None, score: float | None) -> str:
    # display_text: a file name with undecodable bytes would make matplotlib's text layout raise
    parts = [] if title is None else [display_text(title)]
    if score is not None:
        parts.append("score n/a" if not math.isfinite(score) else f"score {score:.4g}")
    return "  —  ".join(parts)


def heatmap_figure(
    image: ImageLike,
    amap: np.ndarray,
    score: float | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    mask: np.ndarray | None = None,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    max_side: int = DISPLAY_MAX_SIDE,
    dpi: int = 100,
) -> Image.Image:
    """A figure of one prediction: input image, overlay with a colour bar, and the mask.

    Panels, left to right: the input; the anomaly map over the input with a colour bar of its
    value scale (the ground-truth outline drawn on it in white when ``mask`` is given); and,
    with ``mask``, the ground truth itself. The title holds ``title`` and ``score``.

    The colour range is taken from the full-resolution map before the display reduction
    (:func:`fit_for_display`), so the colour bar states the map's real values. The output size
    depends only on the image's aspect ratio and the number of panels, never on its pixel
    count: tiny and huge inputs give figures of the same few hundred pixels.

    Args:
        image: PIL image or uint8 ``[H, W(, C)]`` array.
        amap: ``[H, W]`` float anomaly map at the image's size.
        score: image-level anomaly score, shown in the title (None: not shown).
        title: e.g. the file name; shown verbatim (no mathtext, so ``$`` in names is safe),
            undecodable bytes of a file name as ``\\xNN`` (:func:`~clipad.eval.files.display_text`).
        vmin, vmax: colour range; default the finite min / max of ``amap``. Pass fixed values
            to compare several images on one scale.
        mask: optional ``[H, W]`` ground truth, nonzero = anomalous.
        alpha: colour weight of the overlay.
        cmap: matplotlib colormap name.
        max_side: long side, in pixels, the panels are reduced to before plotting.
        dpi: resolution of the rendered figure.

    Returns:
        The figure as an RGB ``PIL.Image``; ``.save(path)`` writes a PNG.
    """
    amap = _check_map(amap, _image_size(image))
    lo, hi = value_range(amap, vmin, vmax)
    rgb, small_map, small_mask = fit_for_display(image, amap, mask, max_side)
    blended = overlay(rgb, small_map, lo, hi, alpha=alpha, cmap=cmap)

    n_panels = 2 if small_mask is None else 3
    h, w = small_map.shape
    # Panels are max_side pixels on their long side whatever the input size; extreme aspect
    # ratios are letterboxed in a panel at least 1.5 inches on its short side.
    long_in = max_side / dpi
    panel_w = max(long_in * min(1.0, w / h), 1.5)
    panel_h = max(long_in * min(1.0, h / w), 1.5)
    fig = Figure(figsize=(panel_w * n_panels + 1.0, panel_h + 0.9), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=True)
    # "auto": nearest-neighbour when upsampling (tiny images stay crisp), antialiased when the
    # layout shrinks a panel by a few pixels.
    axes[0].imshow(rgb, interpolation="auto")
    axes[0].set_title("input", fontsize=10)
    axes[1].imshow(blended, interpolation="auto")
    axes[1].set_title("anomaly map", fontsize=10)
    if small_mask is not None:
        if small_mask.any() and min(h, w) >= 2:
            axes[1].contour(
                small_mask.astype(np.float32), levels=[0.5], colors="white", linewidths=1.0
            )
        axes[2].imshow(small_mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[2].set_title("ground truth", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])

    # The overlay is an RGB image with no colormap attached, so the bar gets its own mappable.
    # A constant map gets a unit-wide bar centred on its value, matching colorize's step rule.
    bar_lo, bar_hi = (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
    mappable = ScalarMappable(norm=Normalize(vmin=bar_lo, vmax=bar_hi), cmap=cmap)
    colorbar = fig.colorbar(mappable, ax=axes[1], fraction=0.05, pad=0.02)
    colorbar.set_label("anomaly score", fontsize=9)
    colorbar.ax.tick_params(labelsize=8)

    text = _title_text(title, score)
    if text:
        fig.suptitle(text, fontsize=11, parse_math=False)
    return _render(fig)


def save_overlay_png(
    path: str | Path,
    image: ImageLike,
    amap: np.ndarray,
    score: float | None = None,
    title: str | None = None,
    **kwargs: object,
) -> Path:
    """Write :func:`heatmap_figure` ``(image, amap, score, title, **kwargs)`` as a PNG, atomically
    (a temporary file renamed into place: no truncated PNG is ever left, see :mod:`.files`).

    Returns:
        ``path``; missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = heatmap_figure(image, amap, score, title, **kwargs)  # type: ignore[arg-type]
    with atomic_write(path, "wb") as f:  # never a truncated PNG, even on a full disk
        figure.save(f, format="PNG")
    return path


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------


def _counts_at_thresholds(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (false positives, true positives, threshold) per distinct score, descending."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel() != 0
    if scores.shape != labels.shape:
        raise InvalidValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in length; give one label per score")
    if scores.size == 0:
        raise InvalidValueError("no scores to draw a curve from; pass at least one (score, label) pair")
    if np.isnan(scores).any():
        raise InvalidValueError(f"{int(np.isnan(scores).sum())} scores are NaN; drop them first")
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    # Tied scores are one threshold: keep only the last index of each run of equal scores.
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels)[last].astype(np.float64)
    fps = (last + 1) - tps
    return fps, tps, scores[last]


def roc_curve_points(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points at every distinct threshold.

    Same points as ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``:
    starts at ``(0, 0)`` with threshold ``+inf``.

    Args:
        scores: ``[N]`` float, higher = more anomalous.
        labels: ``[N]``, nonzero = anomalous.

    Returns:
        ``(fpr [T+1], tpr [T+1], thresholds [T+1])``; a rate is all-NaN when its class is absent.
    """
    fps, tps, thr = _counts_at_thresholds(scores, labels)
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    return fpr, tpr, np.r_[np.inf, thr]


def pr_curve_points(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve points at every distinct threshold.

    Same points as ``sklearn.metrics.precision_recall_curve(labels, scores)``: recall
    decreasing, ending with the point ``(recall 0, precision 1)`` that has no threshold.

    Returns:
        ``(precision [T+1], recall [T+1], thresholds [T])``; recall is NaN with no positives.
    """
    fps, tps, thr = _counts_at_thresholds(scores, labels)
    precision = tps / (tps + fps)
    recall = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def roc_auc_from_points(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under an ROC curve (NaN if the curve is undefined)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))


def average_precision_from_points(precision: np.ndarray, recall: np.ndarray) -> float:
    """Step-wise area under a PR curve, as ``sklearn.metrics.average_precision_score``."""
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= _MAX_PLOT_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, _MAX_PLOT_POINTS).round().astype(np.int64))
    return x[keep], y[keep]


def roc_pr_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str | None = None,
    *,
    dpi: int = 100,
) -> Image.Image:
    """ROC (left) and precision-recall (right) curves of several classes or methods.

    Args:
        curves: name -> ``(scores [N], labels [N])``, e.g. ``{"bottle": (s, y), ...}``; pixel
            level curves pass flattened maps and masks. Names are drawn verbatim (undecodable
            bytes as ``\\xNN``).
        title: figure title, e.g. ``"image level"``.
        dpi: resolution of the rendered figure.

    Returns:
        RGB ``PIL.Image``. The legends give each curve's AUROC and AP (step-wise, as
        sklearn); a curve with only one label kind is listed as undefined and not drawn.
    """
    fig = Figure(figsize=(11.0, 5.2), dpi=dpi, layout="constrained")
    ax_roc, ax_pr = fig.subplots(1, 2)
    colours = matplotlib.colormaps["tab10" if len(curves) <= 10 else "tab20"]
    for i, (name, (scores, labels)) in enumerate(curves.items()):
        name = display_text(name)
        colour = colours(i % colours.N)
        fpr, tpr, _ = roc_curve_points(scores, labels)
        precision, recall, _ = pr_curve_points(scores, labels)
        auroc = roc_auc_from_points(fpr, tpr)
        ap = average_precision_from_points(precision, recall)
        if not (math.isfinite(auroc) and math.isfinite(ap)):
            for ax in (ax_roc, ax_pr):
                ax.plot([], [], color=colour, label=f"{name} (undefined: one label only)")
            continue
        ax_roc.plot(*_thin(fpr, tpr), color=colour, lw=1.4, label=f"{name} (AUROC {auroc:.3f})")
        # PR curves are step functions of recall; "post" with recall increasing draws them so.
        r, p = _thin(recall[::-1], precision[::-1])
        ax_pr.step(r, p, where="post", color=colour, lw=1.4, label=f"{name} (AP {ap:.3f})")
    ax_roc.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall")
    for ax in (ax_roc, ax_pr):
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.grid(True, lw=0.4, alpha=0.5)
        if curves:
            loc = "lower right" if ax is ax_roc else "lower left"
            for text in ax.legend(loc=loc, fontsize=7).get_texts():
                text.set_parse_math(False)
    if title:
        fig.suptitle(display_text(title), fontsize=12, parse_math=False)
    return _render(fig)


def save_roc_pr_png(
    path: str | Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str | None = None,
    **kwargs: object,
) -> Path:
    """Write :func:`roc_pr_figure` ``(curves, title, **kwargs)`` as a PNG, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = roc_pr_figure(curves, title, **kwargs)  # type: ignore[arg-type]
    with atomic_write(path, "wb") as f:
        figure.save(f, format="PNG")
    return path
