"""Image- and pixel-level anomaly-detection metrics as pure torch functions.

One entry point::

    >>> import torch
    >>> from clipad import metrics
    >>> scores, labels = torch.tensor([0.1, 0.8, 0.3, 0.9]), torch.tensor([0, 1, 0, 1])
    >>> maps = torch.rand(4, 32, 32); masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    >>> masks[1, 4:9, 4:9] = masks[3, 20:30, 2:6] = True
    >>> sorted(metrics.compute(scores, labels, maps, masks))  # doctest: +NORMALIZE_WHITESPACE
    ['image_ap', 'image_auroc', 'image_f1max', 'pixel_ap', 'pixel_aupro', 'pixel_auroc', 'pixel_f1max']

Inputs are torch tensors or numpy arrays, on any device. Work stays on the device of the inputs
(or ``device=``) except connected-component labelling of the masks, which runs on CPU through
``scipy.ndimage.label`` (masks are one byte a pixel and labelling is not the slow part).

Definitions
-----------
Higher scores mean "more anomalous". A sample (image or pixel) is predicted anomalous at
threshold ``t`` when ``score >= t``; curves run over every distinct score, so tied scores move
together and every result is exact (no binning) unless an option says otherwise.

``auroc``
    Area under the ROC curve through all distinct thresholds, trapezoidal. Computed as the
    Mann-Whitney statistic with ties counted one half, in integer arithmetic; this equals
    ``sklearn.metrics.roc_auc_score``.
``ap`` (option ``ap``)
    ``"step"``: sum over distinct thresholds of ``(R_n - R_{n-1}) * P_n`` = sklearn's
    ``average_precision_score``. ``"trapezoid"``: trapezoidal area under sklearn's
    ``precision_recall_curve`` in threshold order, i.e. ``sklearn.metrics.auc(recall, precision)``.
    ``"trapezoid_sorted"``: trapezoidal area after a stable sort of the PR points by recall, which is
    what ``torchmetrics.utilities.compute.auc(recall, precision, reorder=True)`` returns on
    torchmetrics' PR curve: within a run of equal recall the stable sort puts the highest-threshold
    point last, so each trapezoid joins that point to the *lowest*-threshold point of the next recall.
``f1max``
    Max over distinct thresholds of ``2 TP / (2 TP + FP + FN)`` (= ``2PR/(P+R)``, 0/0 taken as 0),
    the maximum of F1 over ``precision_recall_curve``.
``aupro``
    Per-region overlap: the regions are the connected components of every ground-truth mask
    (``connectivity`` 8 by default, as ``skimage.measure.label`` labels 2-D images by default);
    ``PRO(t)`` is the mean over *all regions of all images* of the fraction of the region's pixels
    predicted anomalous; ``FPR(t)`` is false-positive pixels over all normal pixels of all images.
    AUPRO is the area under PRO versus FPR up to ``fpr_limit``, normalised to [0, 1] as
    ``aupro_fpr_norm`` says, over thresholds chosen as ``aupro_thresholds`` says.

Options (keyword arguments of :func:`compute`; ``protocol`` picks a preset, the rest override it)
-----------------------------------------------------------------------------------------------
``protocol``: ``"anomalyclip"`` (default) or ``"adaptclip"`` — see :data:`PROTOCOLS`.

``ap``: ``"step"`` | ``"trapezoid"`` | ``"trapezoid_sorted"`` (see above).

``aupro_thresholds``: an int ``k`` or ``"exact"``.
    ``k``: the binned grid of the official AnomalyCLIP ``cal_pro_score(max_step=k)``:
    ``np.arange(min, max, (max - min) / k)`` over all maps of the evaluation, exactly as NumPy 1.x
    evaluates it on float32 maps (the official environments pin NumPy 1.x): the range is a float32
    subtraction, the step float64, and the length ``ceil(range / step)`` is ``k`` or ``k + 1``
    depending on rounding (NumPy 2 rounds differently); a pixel is positive when ``score > t`` with
    ``t`` rounded to the maps' dtype (NumPy 1.x casts a float64 scalar to the array's float32 in
    the comparison). The extra ``k + 1``-th threshold lies within a step of the max (rounded to
    float32 it can equal the max, so no pixel is above it), adds a low-FPR point and so changes the
    min-max normalisation below, which is why the grid is reproduced to the bit.
    ``"exact"``: every distinct map value, ``score >= t`` (the MVTec AD reference definition).
``aupro_fpr_norm``: ``"minmax"`` | ``"limit"``.
    ``"minmax"`` (official AnomalyCLIP): keep the thresholds with ``FPR < fpr_limit`` (strict),
    rescale those FPRs linearly to [0, 1] by their own min and max, and take the trapezoidal area.
    Undefined (NaN) if fewer than two distinct FPRs are kept.
    ``"limit"`` (MVTec AD / anomalib): the curve from (0, 0) through every threshold to (1, 1),
    linearly interpolated at ``FPR = fpr_limit``, area from 0 to ``fpr_limit`` divided by
    ``fpr_limit``.
``fpr_limit``: float in (0, 1], default 0.3 (both official codes).

``connectivity``: 8 (default; skimage's default for 2-D, and OpenCV's / kornia's in AdaptCLIP) or 4.

``resolution``: None (default: evaluate at the maps' size; masks must match it) or an int / (H, W):
    maps are resized bilinearly (``align_corners=False``) and masks by nearest neighbour before the
    pixel metrics. AdaptCLIP's test script does this at 256 for Real-IAD, Real-IAD-Variety and BMAD,
    and evaluates MVTec AD / VisA at the input size (518); AnomalyCLIP always at the input size.

Which official code each default mirrors (read at zqhang/AnomalyCLIP and gaobb/AdaptCLIP HEAD)
--------------------------------------------------------------------------------------------
``"anomalyclip"`` = AnomalyCLIP ``metrics.py`` (also TokenCLIP, which builds on it; APRIL-GAN /
AnoCLIP use the same AUPRO, credited to cflow-ad; AdaptCLIP ships the same in its unused
``tools/metric.py``): image AUROC / AP = ``roc_auc_score`` / ``average_precision_score``; pixel
AUROC = ``roc_auc_score`` over all pixels of the class; pixel AUPRO = ``cal_pro_score(masks, maps,
max_step=200, expect_fpr=0.3)`` -> ``ap="step", aupro_thresholds=200, aupro_fpr_norm="minmax"``.
AnomalyCLIP reports no F1-max and no pixel AP; we give exact F1-max (as AdaptCLIP) and step AP.

``"adaptclip"`` = AdaptCLIP ``test.py`` -> ``tools/effecient_metric.py`` -> its ``metrics/``
package (anomalib's metrics on torchmetrics): AUROC = torchmetrics ``BinaryROC`` + trapezoid (exact,
= ours); AP = ``auc(recall, precision, reorder=True)`` -> ``ap="trapezoid_sorted"``; F1-max = max of
``2PR/(P+R+1e-10)`` over the exact PR curve (= ours up to 1e-10); AUPRO = anomalib ``AUPRO``
(every distinct threshold, ``fpr_limit=0.3``, area divided by the last FPR, ~0.3) ->
``aupro_thresholds="exact", aupro_fpr_norm="limit"``. anomalib builds its PRO curve by averaging
per-region ROC curves resampled on a common index grid; that approximates the exact curve we
integrate, so ``pixel_aupro`` differs from AdaptCLIP's slightly: measured up to 1.4e-3 on 12 maps
of 64x64, 3e-5 on 40 of 128x128, 5e-6 on 60 of 256x256 (the gap shrinks with the pixel count).
torchmetrics also passes scores outside [0, 1] through a sigmoid, which only matters where float32
sigmoid saturation creates ties.

Undefined metrics (a class with no anomalous or no normal samples, no mask pixels, a degenerate
min-max range) are NaN with an :class:`UndefinedMetricWarning` naming them; never an exception.
:func:`mean_over_classes` averages over the classes where a metric is defined and says which it left out.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Mapping, NamedTuple, Sequence, Union

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ClipadWarning, InvalidValueError, UnknownNameError

__all__ = [
    "IMAGE_KEYS",
    "PIXEL_KEYS",
    "PROTOCOLS",
    "ClassMean",
    "MetricOptions",
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "compute",
    "compute_per_class",
    "f1_max",
    "f1_max_threshold",
    "label_regions",
    "mean_over_classes",
    "resolve_options",
]

ArrayLike = Union[Tensor, np.ndarray, Sequence[float]]
APMode = Literal["step", "trapezoid", "trapezoid_sorted"]
FPRNorm = Literal["minmax", "limit"]

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")

_AP_MODES = ("step", "trapezoid", "trapezoid_sorted")
_FPR_NORMS = ("minmax", "limit")
# Images per chunk when resizing maps/masks or labelling regions, to bound temporary memory.
_CHUNK = 128


class UndefinedMetricWarning(ClipadWarning, RuntimeWarning):
    """A metric is undefined for the given labels (e.g. a class without anomalies); it is NaN.
    A :class:`~clipad.errors.ClipadWarning` (so the CLI prints it) and, as before, a ``RuntimeWarning``."""


@dataclass(frozen=True)
class MetricOptions:
    """How metrics are computed; see the module docstring for each field's meaning and origin."""

    ap: APMode = "step"
    aupro_thresholds: int | Literal["exact"] = 200
    aupro_fpr_norm: FPRNorm = "minmax"
    fpr_limit: float = 0.3
    connectivity: Literal[4, 8] = 8
    resolution: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # a choice outside its set: UnknownNameError, listing the choices; a number out of range: InvalidValueError
        if self.ap not in _AP_MODES:
            raise UnknownNameError(f"ap={self.ap!r} is not one of {list(_AP_MODES)}")
        if self.aupro_fpr_norm not in _FPR_NORMS:
            raise UnknownNameError(f"aupro_fpr_norm={self.aupro_fpr_norm!r} is not one of {list(_FPR_NORMS)}")
        t = self.aupro_thresholds
        if not (t == "exact" or (isinstance(t, int) and not isinstance(t, bool) and t >= 1)):
            raise InvalidValueError(f"aupro_thresholds={t!r}: give a positive int (binned, official 200) or 'exact'")
        f = self.fpr_limit
        if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0.0 < f <= 1.0):
            raise InvalidValueError(f"fpr_limit={self.fpr_limit!r} must lie in (0, 1] (official 0.3)")
        if self.connectivity not in (4, 8):
            raise UnknownNameError(f"connectivity={self.connectivity!r} is not one of [4, 8]")


PROTOCOLS: dict[str, MetricOptions] = {
    # zqhang/AnomalyCLIP metrics.py (sklearn + cal_pro_score(max_step=200, expect_fpr=0.3)).
    "anomalyclip": MetricOptions(),
    # gaobb/AdaptCLIP tools/effecient_metric.py (anomalib/torchmetrics AUPR, F1Max, AUPRO).
    "adaptclip": MetricOptions(ap="trapezoid_sorted", aupro_thresholds="exact", aupro_fpr_norm="limit"),
}


def resolve_options(protocol: str = "anomalyclip", **overrides: Any) -> MetricOptions:
    """The :data:`PROTOCOLS` preset named ``protocol`` with ``overrides`` (field names of :class:`MetricOptions`)."""
    if protocol not in PROTOCOLS:
        raise UnknownNameError(f"protocol={protocol!r} is not one of {sorted(PROTOCOLS)}")
    valid = [f.name for f in fields(MetricOptions)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise UnknownNameError(f"unknown metric option(s) {unknown}; valid options: {valid} and 'protocol'")
    return replace(PROTOCOLS[protocol], **overrides)


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _as_tensor(x: ArrayLike, device: torch.device | str | None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device) if device is not None else t


def _scores(x: ArrayLike, name: str, device: torch.device | str | None) -> Tensor:
    """Float scores, float16/bfloat16 upcast exactly to float32, integers to float64."""
    t = _as_tensor(x, device)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.is_floating_point():
        t = t.double()
    if t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):  # min/max propagate NaN
        bad = int((~torch.isfinite(t)).sum())
        raise InvalidValueError(f"{name} has {bad} non-finite values (NaN/inf); replace them, e.g. torch.nan_to_num, first")
    return t


def _binary(x: ArrayLike, name: str, device: torch.device | str | None) -> Tensor:
    t = _as_tensor(x, device)
    if t.dtype == torch.bool:
        return t
    ok = (t == 0) | (t == 1)
    if not bool(ok.all()):
        example = t[~ok].flatten()[0].item()
        raise InvalidValueError(f"{name} must be binary (bool or 0/1); found e.g. {example!r}; binarise it first, e.g. {name} > 0.5")
    return t != 0


def _undefined(names: Sequence[str], why: str) -> None:
    warnings.warn(f"{', '.join(names)} undefined: {why}; returning NaN", UndefinedMetricWarning, stacklevel=4)


# --------------------------------------------------------------------------------------------
# Ranking: positives and negatives sorted once, every curve read off them by binary search
# --------------------------------------------------------------------------------------------


def _sort_(x: Tensor) -> tuple[Tensor, Tensor]:
    """Ascending sort of float32/float64 ``x`` [M], consuming ``x`` (its memory is used as scratch).

    Returns (values [M], indices [M]). Sorts order-preserving integer keys instead of floats: torch
    sorts integers with a radix sort, 5-10x faster on CPU than its comparison sort of 10^8 floats;
    the key map is a bijection, so the values come back bit-exact.
    """
    itype = torch.int32 if x.dtype == torch.float32 else torch.int64
    x.add_(0.0)  # -0.0 + 0.0 = +0.0: equal floats must get equal keys
    keys = x.view(itype)
    negative = x.numel() > 0 and bool(x.min() < 0)  # maps are usually >= 0: skip two passes
    if negative:
        _flip_negative_(keys)
    keys, idx = torch.sort(keys, stable=True)
    if negative:
        _flip_negative_(keys)
    return keys.view(x.dtype), idx


def _flip_negative_(k: Tensor) -> None:
    """In place, k ^= 0x7FF..F where k < 0: IEEE negatives order by magnitude, so reverse them."""
    mask = k >> (k.element_size() * 8 - 1)  # arithmetic shift: -1 (all ones) for negatives, else 0
    mask &= torch.iinfo(k.dtype).max
    k ^= mask


class _Ranked(NamedTuple):
    """Scores split by label and sorted; every curve below is read off the distinct anomalous scores.

    Between consecutive distinct anomalous scores u_g > u_{g+1} only normal samples enter, so each
    curve (ROC, PR, PRO) is fixed by TP and the normal counts at and strictly above each u_g.
    """

    pos: Tensor  # [P] scores of anomalous samples, ascending
    neg: Tensor  # [N] scores of normal samples, ascending
    pos_weight: Tensor | None  # [P] float64 aligned with pos (AUPRO: 1 / area of the pixel's region)
    values: Tensor  # [G] distinct anomalous scores u_1 > ... > u_G
    tp: Tensor  # [G] int64, #pos >= u_g
    neg_ge: Tensor  # [G] int64, #neg >= u_g
    neg_gt: Tensor  # [G] int64, #neg > u_g


def _rank(scores: Tensor, labels: Tensor, pos_weight: Tensor | None = None) -> _Ranked:
    """scores [M] float, labels [M] bool, pos_weight [P] in the order of ``scores[labels]``."""
    pos, order = _sort_(scores[labels])  # boolean indexing copies, so sorting may consume it
    neg, _ = _sort_(scores[~labels])
    values, counts = torch.unique_consecutive(pos.flip(0), return_counts=True)
    n = neg.numel()
    return _Ranked(
        pos=pos,
        neg=neg,
        pos_weight=None if pos_weight is None else pos_weight[order],
        values=values,
        tp=counts.cumsum(0),
        neg_ge=n - torch.searchsorted(neg, values, right=False),
        neg_gt=n - torch.searchsorted(neg, values, right=True),
    )


def _count_ge(sorted_asc: Tensor, t: Tensor) -> Tensor:
    """#{x >= t} for each t, x sorted ascending."""
    return sorted_asc.numel() - torch.searchsorted(sorted_asc, t, right=False)


def _count_gt(sorted_asc: Tensor, t: Tensor) -> Tensor:
    """#{x > t} for each t, x sorted ascending."""
    return sorted_asc.numel() - torch.searchsorted(sorted_asc, t, right=True)


def _auroc(r: _Ranked) -> float:
    # Mann-Whitney: each (pos, neg) pair scores 1 if pos > neg, 1/2 if tied, so with c_g anomalous
    # samples at u_g, 2U = sum_g c_g * (#neg < u_g + #neg <= u_g), an exact integer.
    n = r.neg.numel()
    counts = torch.diff(r.tp, prepend=r.tp.new_zeros(1))
    two_u = (counts * ((n - r.neg_ge) + (n - r.neg_gt))).sum()
    return float(two_u.double() / (2.0 * r.pos.numel() * n))


def _pr_precision(r: _Ranked) -> tuple[Tensor, Tensor, Tensor]:
    """(tp [G] float64, precision at u_g [G], precision at the lowest threshold above u_{g+1} [G]).

    At u_g the false positives are #neg >= u_g (fewest for this TP); just above u_{g+1} they are
    #neg > u_{g+1} (most for this TP; all N after the last group).
    """
    tp = r.tp.double()
    fp_low = torch.cat([r.neg_gt[1:], r.neg_gt.new_full((1,), r.neg.numel())])
    return tp, tp / (tp + r.neg_ge), tp / (tp + fp_low)


def _average_precision(r: _Ranked, mode: APMode) -> float:
    tp, p_high, p_low = _pr_precision(r)
    recall = torch.cat([tp.new_zeros(1), tp / r.pos.numel()])
    d_recall = recall[1:] - recall[:-1]
    if mode == "step":
        return float((d_recall * p_high).sum())
    # Recall 0: sklearn and torchmetrics both append the point (R=0, P=1); below u_1 precision is 0
    # at every threshold that lets a normal sample above the top anomalous score.
    p_low0 = tp.new_tensor(0.0 if int(r.neg_gt[0]) > 0 else 1.0)
    if mode == "trapezoid":  # threshold order: last point of a recall level -> first of the next
        left, right = torch.cat([p_low0[None], p_low[:-1]]), p_high
    else:  # "trapezoid_sorted": first point of a recall level -> last point of the next
        left, right = torch.cat([tp.new_ones(1), p_high[:-1]]), p_low
    return float((d_recall * (left + right) / 2).sum())


def _f1_curve(r: _Ranked) -> Tensor:
    """[G] float64: F1 of the rule ``score >= u_g`` at each distinct anomalous score u_g."""
    # For a given TP, F1 = 2TP / (TP + FP + P) is largest at the fewest FP, i.e. at u_g.
    return 2 * r.tp.double() / (r.tp + r.neg_ge + r.pos.numel())


def _f1_max(r: _Ranked) -> float:
    return float(_f1_curve(r).max())


_CURVE_METRICS = ("auroc", "ap", "f1max")


def _curve_metrics(
    r: _Ranked, prefix: str, unit: str, ap: APMode, which: Sequence[str] = _CURVE_METRICS
) -> dict[str, float]:
    """``{prefix + name: value}`` for ``name`` in ``which``; NaN + warning where undefined."""
    n_pos, n_neg = r.pos.numel(), r.neg.numel()
    if n_pos == 0:
        _undefined([prefix + w for w in which], f"no anomalous {unit} (all {n_neg} are normal)")
        return {prefix + w: math.nan for w in which}
    out: dict[str, float] = {}
    for w in which:
        if w == "auroc":
            if n_neg == 0:
                _undefined([prefix + w], f"no normal {unit} (all {n_pos} are anomalous)")
                out[prefix + w] = math.nan
            else:
                out[prefix + w] = _auroc(r)
        elif w == "ap":
            out[prefix + w] = _average_precision(r, ap)
        else:
            out[prefix + w] = _f1_max(r)
    return out


# --------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------


def label_regions(masks: ArrayLike, connectivity: Literal[4, 8] = 8) -> tuple[Tensor, int]:
    """Connected components of each mask, numbered 1..R across the whole stack.

    Args:
        masks: ``[N, H, W]`` binary.
        connectivity: 8 (diagonal neighbours join; skimage.measure.label's 2-D default) or 4.

    Returns:
        (labels ``[N, H, W]`` int32 on the masks' device, 0 = background; R).
    """
    m = _binary(masks, "masks", None)
    m_np = m.cpu().numpy()
    # A 3-D structure whose only non-zero slice is the middle one: connects pixels within an
    # image, never across images, so the whole stack is labelled in a few calls.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = np.ones((3, 3), bool) if connectivity == 8 else scipy.ndimage.generate_binary_structure(2, 1)
    labels = np.zeros(m_np.shape, dtype=np.int32)
    total = 0
    for start in range(0, m_np.shape[0], _CHUNK):
        chunk, n = scipy.ndimage.label(m_np[start : start + _CHUNK], structure=structure, output=np.int32)
        chunk[chunk > 0] += total
        labels[start : start + _CHUNK] = chunk
        total += int(n)
    return torch.from_numpy(labels).to(m.device), total


def _binned_thresholds(lo: Tensor, hi: Tensor, steps: int) -> Tensor | None:
    """The official grid ``np.arange(lo, hi, (hi - lo) / steps)`` as NumPy 1.x computes it.

    ``lo``/``hi`` are 0-dim tensors in the maps' dtype. NumPy 1.x subtracts the two float32 scalars
    in float32, divides by ``steps`` in float64, takes ``ceil(range / step)`` elements (``steps`` or
    ``steps + 1``), and fills ``t0 + i * (t1 - t0)`` with ``t1 = t0 + step``. The comparison
    ``maps > t`` then casts ``t`` to the maps' float32. Returns [T] in the maps' dtype, or None if
    all values are equal (the official code fails there).
    """
    span = float(hi - lo)  # the subtraction happens in the maps' dtype, as in NumPy 1.x
    if span <= 0.0:
        return None
    step = span / steps
    n = math.ceil(span / step)
    t0 = float(lo)
    t1 = t0 + step
    grid = torch.arange(n, dtype=torch.float64) * (t1 - t0) + t0
    grid[0] = t0
    if n > 1:
        grid[1] = t1
    return grid.to(device=lo.device, dtype=lo.dtype)


def _clipped_area(x: Tensor, y: Tensor, lo: float, hi: float) -> Tensor:
    """Area under the polyline (x [K] non-decreasing, y [K]) between x = lo and x = hi."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    a, b = x0.clamp(lo, hi), x1.clamp(lo, hi)
    dx = x1 - x0
    slope = torch.where(dx > 0, (y1 - y0) / dx.clamp_min(torch.finfo(dx.dtype).tiny), torch.zeros_like(dx))
    ya, yb = y0 + slope * (a - x0), y0 + slope * (b - x0)
    return ((b - a) * (ya + yb) / 2).sum()


def _aupro(r: _Ranked, n_regions: int, opts: MetricOptions) -> float:
    """AUPRO from ranked pixels; ``r.pos_weight`` = 1 / area of each anomalous pixel's region."""
    assert r.pos_weight is not None
    n_neg = r.neg.numel()
    if n_regions == 0 or r.pos.numel() == 0:
        _undefined(["pixel_aupro"], "no anomalous pixels (no ground-truth regions)")
        return math.nan
    if n_neg == 0:
        _undefined(["pixel_aupro"], "no normal pixels, so no false-positive rate")
        return math.nan
    limit = float(opts.fpr_limit)
    # PRO(t) = sum of pos_weight over anomalous pixels above t, / R; suffix[i] = sum_{j >= i} w_j.
    suffix = torch.cat([r.pos_weight.flip(0).cumsum(0).flip(0), r.pos_weight.new_zeros(1)])
    lo = torch.minimum(r.pos[0], r.neg[0])
    hi = torch.maximum(r.pos[-1], r.neg[-1])

    if opts.aupro_thresholds != "exact":
        grid = _binned_thresholds(lo, hi, int(opts.aupro_thresholds))
        if grid is None:
            _undefined(["pixel_aupro"], "all anomaly-map values are equal, so the binned threshold grid is empty")
            return math.nan
        fpr = _count_gt(r.neg, grid).double() / n_neg  # [T], non-increasing
        pro = suffix[torch.searchsorted(r.pos, grid, right=True)] / n_regions
        if opts.aupro_fpr_norm == "minmax":
            keep = fpr < limit
            f, p = fpr[keep].flip(0), pro[keep].flip(0)
            return _minmax_area(f, p, f[0] if f.numel() else None, f[-1] if f.numel() else None)
        x = torch.cat([fpr.new_zeros(1), fpr.flip(0), fpr.new_ones(1)])
        y = torch.cat([pro.new_zeros(1), pro.flip(0), pro.new_ones(1)])
        return float(_clipped_area(x, y, 0.0, limit) / limit)

    # Exact: between consecutive distinct anomalous values u_g > u_{g+1} PRO is flat, so the curve
    # through every distinct threshold is the polyline (0,0), A_1, B_1, ..., A_G, B_G, (1,1) with
    # A_g = (#neg > u_g, PRO_{g-1}) and B_g = (#neg >= u_g, PRO_g); intermediate points are collinear.
    pro_g = suffix[r.pos.numel() - r.tp] / n_regions  # the first anomalous score >= u_g sits at P - TP_g
    pro_prev = torch.cat([pro_g.new_zeros(1), pro_g[:-1]])
    ax = r.neg_gt.double() / n_neg
    bx = r.neg_ge.double() / n_neg
    x = torch.cat([ax.new_zeros(1), torch.stack([ax, bx], 1).flatten(), ax.new_ones(1)])
    y = torch.cat([ax.new_zeros(1), torch.stack([pro_prev, pro_g], 1).flatten(), ax.new_ones(1)])
    if opts.aupro_fpr_norm == "limit":
        return float(_clipped_area(x, y, 0.0, limit) / limit)
    # "minmax" on exact thresholds: the kept points are the thresholds with FPR < limit; the lowest
    # FPR is at the top threshold (the max score), the highest is the largest reachable FPR < limit.
    fmin = float(_count_ge(r.neg, hi[None])[0]) / n_neg
    fmax = _largest_reachable_fpr_below(r, limit)
    if fmax is None or not fmin < limit:
        return _minmax_area(x, y, None, None)
    return _minmax_area(x, y, x.new_tensor(fmin), x.new_tensor(fmax))


def _largest_reachable_fpr_below(r: _Ranked, limit: float) -> float | None:
    """Largest #{neg >= t} / N < limit over distinct scores t, or None if there is none."""
    n = r.neg.numel()
    # Candidates are counts c with c / N < limit (compared in float64, as the official code does).
    c = min(n, math.floor(limit * n) + 2)
    while c > 0 and not c / n < limit:
        c -= 1
    # A count c > 0 is reachable iff the c-th largest normal score differs from the (c+1)-th;
    # otherwise the largest reachable count below it is #neg > (c-th largest normal score).
    if c > 0 and c < n and bool(r.neg[n - c] == r.neg[n - c - 1]):
        c = int(_count_gt(r.neg, r.neg[n - c][None])[0])
    if c == 0 and not bool(r.pos[-1] > r.neg[-1]):  # FPR 0 is reachable only if a pixel tops all normals
        return None
    return c / n


def _minmax_area(x: Tensor, y: Tensor, fmin: Tensor | None, fmax: Tensor | None) -> float:
    """Area of the polyline between fmin and fmax, divided by (fmax - fmin); NaN if degenerate."""
    if fmin is None or fmax is None or not float(fmax) > float(fmin):
        _undefined(["pixel_aupro"], "fewer than two distinct false-positive rates below fpr_limit for the min-max rescaling")
        return math.nan
    return float(_clipped_area(x, y, float(fmin), float(fmax)) / (fmax - fmin))


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _rank_samples(scores: ArrayLike, labels: ArrayLike) -> _Ranked:
    s = _scores(scores, "scores", None).flatten()
    y = _binary(labels, "labels", s.device).flatten()
    if s.shape != y.shape:
        raise InvalidValueError(f"scores has {s.numel()} values but labels has {y.numel()}; give one label per score")
    return _rank(s, y)


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact AUROC (= sklearn ``roc_auc_score``). scores [M] float, labels [M] binary; NaN + warning if a class is absent."""
    return _curve_metrics(_rank_samples(scores, labels), "", "samples", "step", ["auroc"])["auroc"]


def average_precision(scores: ArrayLike, labels: ArrayLike, mode: APMode = "step") -> float:
    """Exact AP, ``mode`` as the ``ap`` option. scores [M] float, labels [M] binary; NaN + warning without positives."""
    if mode not in _AP_MODES:
        raise UnknownNameError(f"mode={mode!r} is not one of {list(_AP_MODES)}")
    return _curve_metrics(_rank_samples(scores, labels), "", "samples", mode, ["ap"])["ap"]


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact F1-max over all distinct thresholds. scores [M] float, labels [M] binary; NaN + warning without positives."""
    return _curve_metrics(_rank_samples(scores, labels), "", "samples", "step", ["f1max"])["f1max"]


def f1_max_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """(F1-max, its threshold) over all distinct thresholds: anomalib's adaptive threshold.

    scores [M] float, labels [M] binary. The rule is ``score >= threshold`` = anomalous; F1 is
    largest at some anomalous sample's score (between two of them only false positives change),
    so the threshold is that score, exactly as stored in ``scores``; among equal F1 the highest
    threshold (fewest flagged). (NaN, NaN) + warning without anomalous samples.
    """
    r = _rank_samples(scores, labels)
    if r.pos.numel() == 0:
        _undefined(["f1max threshold"], f"no anomalous samples (all {r.neg.numel()} are normal)")
        return math.nan, math.nan
    f1 = _f1_curve(r)
    best = int(torch.argmax(f1))  # the first maximum: u_g descend, so the highest threshold
    return float(f1[best]), float(r.values[best])


def aupro(
    anomaly_maps: ArrayLike,
    masks: ArrayLike,
    *,
    protocol: str = "anomalyclip",
    **options: Any,
) -> float:
    """AUPRO of maps [N, H, W] against binary masks [N, H, W]; options as for :func:`compute`."""
    opts = resolve_options(protocol, **options)
    maps, gt = _prepare_pixels(anomaly_maps, masks, opts, None)
    return _pixel_metrics(maps, gt, opts, only_aupro=True)["pixel_aupro"]


def _prepare_pixels(
    anomaly_maps: ArrayLike, masks: ArrayLike, opts: MetricOptions, device: torch.device | str | None
) -> tuple[Tensor, Tensor]:
    maps = _scores(anomaly_maps, "anomaly_maps", device)
    gt = _binary(masks, "masks", maps.device)
    # [N, 1, H, W] as the official scripts squeeze it.
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if gt.dim() == 4 and gt.shape[1] == 1:
        gt = gt[:, 0]
    if maps.dim() != 3:
        raise InvalidValueError(f"anomaly_maps must be [N, H, W] (or [N, 1, H, W]); got shape {tuple(maps.shape)}")
    if opts.resolution is not None:
        size = (opts.resolution, opts.resolution) if isinstance(opts.resolution, int) else tuple(opts.resolution)
        maps = torch.cat(
            [F.interpolate(c[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for c in maps.split(_CHUNK)]
        )
        gt = torch.cat([F.interpolate(c[:, None].float(), size=size, mode="nearest")[:, 0] > 0 for c in gt.split(_CHUNK)])
    if gt.shape != maps.shape:
        raise InvalidValueError(
            f"masks shape {tuple(gt.shape)} differs from anomaly_maps shape {tuple(maps.shape)}; "
            "resize them to the same size, or pass resolution=... to resize both"
        )
    return maps, gt


def _pixel_metrics(maps: Tensor, gt: Tensor, opts: MetricOptions, only_aupro: bool = False) -> dict[str, float]:
    regions, n_regions = label_regions(gt, opts.connectivity)
    region_of_pixel = regions[gt].long()  # [P], same order as maps[gt]
    del regions
    area = torch.bincount(region_of_pixel, minlength=n_regions + 1).double()
    weight = 1.0 / area[region_of_pixel]
    r = _rank(maps.flatten(), gt.flatten(), weight)
    out = {} if only_aupro else _curve_metrics(r, "pixel_", "pixels", opts.ap)
    out["pixel_aupro"] = _aupro(r, n_regions, opts)
    return out


def compute(
    image_scores: ArrayLike,
    image_labels: ArrayLike,
    anomaly_maps: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    *,
    protocol: str = "anomalyclip",
    device: torch.device | str | None = None,
    **options: Any,
) -> dict[str, float]:
    """Image metrics, and pixel metrics when maps and masks are given.

    Args:
        image_scores: ``[N]`` float, higher = more anomalous.
        image_labels: ``[N]`` binary, 1 = anomalous.
        anomaly_maps: ``[N, H, W]`` (or ``[N, 1, H, W]``) float; float16 is upcast exactly.
        masks: ``[N, H, W]`` binary (bool, uint8, or float 0/1).
        protocol: options preset, ``"anomalyclip"`` (default) or ``"adaptclip"`` (:data:`PROTOCOLS`).
        device: where to compute; default the device of the inputs.
        **options: overrides of :class:`MetricOptions` fields (``ap``, ``aupro_thresholds``,
            ``aupro_fpr_norm``, ``fpr_limit``, ``connectivity``, ``resolution``).

    Returns:
        ``{"image_auroc", "image_ap", "image_f1max"}`` and, with maps and masks, ``{"pixel_auroc",
        "pixel_ap", "pixel_f1max", "pixel_aupro"}``: floats in [0, 1], NaN where undefined
        (with an :class:`UndefinedMetricWarning`).
    """
    opts = resolve_options(protocol, **options)
    scores = _scores(image_scores, "image_scores", device).flatten()
    labels = _binary(image_labels, "image_labels", scores.device).flatten()
    if scores.shape != labels.shape:
        raise InvalidValueError(f"image_scores has {scores.numel()} values but image_labels has {labels.numel()}; give one label per image")
    out = _curve_metrics(_rank(scores, labels), "image_", "images", opts.ap)
    if (anomaly_maps is None) != (masks is None):
        raise InvalidValueError(f"pixel metrics need both anomaly_maps and masks; got only {'anomaly_maps' if masks is None else 'masks'} "
                                 "(pass both, or neither for image metrics only)")
    if anomaly_maps is not None and masks is not None:
        maps, gt = _prepare_pixels(anomaly_maps, masks, opts, device)
        if maps.shape[0] != scores.numel():
            raise InvalidValueError(f"anomaly_maps has {maps.shape[0]} maps but image_scores has {scores.numel()} values; give one map per image")
        out.update(_pixel_metrics(maps, gt, opts))
    return out


def compute_per_class(
    image_scores: ArrayLike,
    image_labels: ArrayLike,
    class_names: Sequence[str] | np.ndarray,
    anomaly_maps: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    *,
    protocol: str = "anomalyclip",
    device: torch.device | str | None = None,
    **options: Any,
) -> dict[str, dict[str, float]]:
    """:func:`compute` on each class separately (as the papers report), in order of first appearance.

    ``class_names``: ``[N]`` strings, one per image. Each class gets its own threshold grid.
    """
    names = np.asarray(class_names)
    if names.shape[0] != len(image_scores):
        raise InvalidValueError(f"class_names has {names.shape[0]} entries but image_scores has {len(image_scores)}; give one class name per image")
    rows: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(names.tolist()):
        idx = torch.from_numpy(np.flatnonzero(names == name))

        def take(x: ArrayLike | None) -> ArrayLike | None:
            if x is None:
                return None
            t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
            return t[idx.to(t.device)]

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UndefinedMetricWarning)
            rows[str(name)] = compute(
                take(image_scores), take(image_labels), take(anomaly_maps), take(masks),
                protocol=protocol, device=device, **options,
            )
        for w in caught:  # re-issue, naming the class
            warnings.warn(f"class {name!r}: {w.message}", w.category, stacklevel=2)
    return rows


class ClassMean(NamedTuple):
    """Mean over classes of each metric, NaNs left out; ``excluded[metric]`` lists the classes left out."""

    mean: dict[str, float]
    excluded: dict[str, list[str]]


def mean_over_classes(rows: Mapping[str, Mapping[str, float]]) -> ClassMean:
    """NaN-excluding mean of per-class metric rows ``{class: {metric: value}}``.

    A class missing a metric counts as NaN for it. A metric NaN in every class has mean NaN.
    """
    keys: dict[str, None] = {}
    for row in rows.values():
        keys.update(dict.fromkeys(row))
    mean: dict[str, float] = {}
    excluded: dict[str, list[str]] = {}
    for key in keys:
        values = {c: float(row.get(key, math.nan)) for c, row in rows.items()}
        good = [v for v in values.values() if not math.isnan(v)]
        mean[key] = float(np.mean(good)) if good else math.nan
        excluded[key] = [c for c, v in values.items() if math.isnan(v)]
    return ClassMean(mean, excluded)
