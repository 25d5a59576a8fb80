"""Tests of clipad.metrics against independent references: scikit-learn for AUROC / AP / F1-max,
a stable-sorted PR trapezoid (torchmetrics' reorder) for AdaptCLIP's AP, and a slow loop over
thresholds with scipy.ndimage.label regions for AUPRO."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from clipad.eval import metrics as M
from clipad.errors import UnknownNameError

_trapezoid = getattr(np, "trapezoid", None) or np.trapz

# --------------------------------------------------------------------------- references


def sk_f1max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    denom = p + r
    return float(np.max(np.where(denom > 0, 2 * p * r / np.where(denom > 0, denom, 1), 0.0)))


def sk_trapezoid_sorted(y: np.ndarray, s: np.ndarray) -> float:
    """torchmetrics' auc(recall, precision, reorder=True): stable sort of the PR points by recall."""
    p, r, _ = precision_recall_curve(y, s)  # same layout as torchmetrics: recall decreasing, (0, 1) last
    order = np.argsort(r, kind="stable")
    return float(_trapezoid(p[order], r[order]))


def slow_aupro(maps, masks, thresholds, norm, *, strict, limit=0.3, connectivity=8) -> float:
    """Loop over thresholds; regions by scipy.ndimage.label per image; PRO = mean region overlap.

    strict: predicted anomalous when map > t (official binned grid) else map >= t (exact).
    """
    structure = ndi.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndi.label(m, structure=structure)
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [], []
    for t in thresholds:  # descending
        pred = maps > t if strict else maps >= t
        pros.append(np.mean([pred[i][reg].sum() / reg.sum() for i, reg in regions]))
        fprs.append((pred & normal).sum() / normal.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    if norm == "minmax":
        keep = fprs < limit
        f = fprs[keep]
        return float(auc((f - f.min()) / (f.max() - f.min()), pros[keep]))
    points = [(0.0, 0.0), *zip(fprs, pros), (1.0, 1.0)]
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def make_pixels(seed: int, n: int = 6, h: int = 20, w: int = 20, decimals: int | None = 2):
    """Maps [n, h, w] float32 and masks [n, h, w] bool: 1-3 blobs on some images, some empty masks,
    a diagonal-touching pixel pair, maps correlated with the masks, optionally rounded (ties)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        if i % 3 == 2:
            continue  # normal image: empty mask
        for _ in range(rng.integers(1, 4)):
            cy, cx, ry, rx = rng.integers(0, h), rng.integers(0, w), *rng.integers(1, 5, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    masks[0, 1, 1] = masks[0, 2, 2] = True  # one region at 8-connectivity, two at 4
    maps = ndi.gaussian_filter(rng.normal(size=(n, h, w)), (0, 1.5, 1.5))
    maps = 1 / (1 + np.exp(-(maps / maps.std() + 1.5 * masks)))
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps.astype(np.float32), masks


# --------------------------------------------------------------------------- image-level curves


@pytest.mark.parametrize("decimals", [0, 1, 3])
def test_auroc_ap_f1_match_sklearn_with_ties(decimals):
    rng = np.random.default_rng(decimals)
    for _ in range(40):
        n = int(rng.integers(2, 80))
        y = rng.random(n) < rng.uniform(0.1, 0.9)
        y[0], y[1] = True, False
        s = np.round(rng.random(n) + 0.3 * y, decimals)
        assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
        assert M.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-6)
        assert M.f1_max(s, y) == pytest.approx(sk_f1max(y, s), abs=1e-6)
        p, r, _ = precision_recall_curve(y, s)
        assert M.average_precision(s, y, "trapezoid") == pytest.approx(auc(r, p), abs=1e-6)
        assert M.average_precision(s, y, "trapezoid_sorted") == pytest.approx(sk_trapezoid_sorted(y, s), abs=1e-6)


@pytest.mark.parametrize(
    "s, y",
    [
        (np.full(7, 0.4), np.array([1, 0, 0, 1, 0, 0, 0])),  # all scores equal
        (np.array([0.1, 0.9, 0.3, 0.5]), np.array([0, 0, 1, 0])),  # single positive
        (np.array([0.1, 0.9, 0.3, 0.5]), np.array([1, 1, 0, 1])),  # single negative
        (np.array([0.2, 0.2, 0.7]), np.array([0, 1, 0])),  # positive tied with a negative, below another
        (np.array([5.0, -3.0, -0.0, 0.0, 2.0]), np.array([1, 0, 1, 0, 0])),  # negatives, signed zeros tie
    ],
)
def test_degenerate_cases_match_sklearn(s, y):
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.f1_max(s, y) == pytest.approx(sk_f1max(y, s), abs=1e-12)
    p, r, _ = precision_recall_curve(y, s)
    assert M.average_precision(s, y, "trapezoid") == pytest.approx(auc(r, p), abs=1e-12)
    assert M.average_precision(s, y, "trapezoid_sorted") == pytest.approx(sk_trapezoid_sorted(y, s), abs=1e-12)


def test_trapezoid_sorted_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics")
    from torchmetrics.functional.classification import binary_precision_recall_curve

    rng = np.random.default_rng(3)
    for _ in range(10):
        y = rng.random(60) < 0.4
        s = np.round(rng.random(60), 1)
        p, r, _ = binary_precision_recall_curve(torch.from_numpy(s), torch.from_numpy(y.astype(np.int64)))
        ref = float(tm.utilities.compute.auc(r.double(), p.double(), reorder=True))
        assert M.average_precision(s, y, "trapezoid_sorted") == pytest.approx(ref, abs=1e-6)


def test_compute_image_metrics_and_input_types():
    rng = np.random.default_rng(0)
    y = rng.random(50) < 0.5
    s = np.round(rng.random(50), 1)
    ref = {"image_auroc": roc_auc_score(y, s), "image_ap": average_precision_score(y, s), "image_f1max": sk_f1max(y, s)}
    for scores, labels in [(s, y), (torch.from_numpy(s), torch.from_numpy(y)), (s.astype(np.float32), y.astype(np.uint8)),
                           (list(s), list(y.astype(int)))]:
        out = M.compute(scores, labels)
        assert set(out) == set(M.IMAGE_KEYS)
        for k, v in ref.items():
            assert out[k] == pytest.approx(v, abs=1e-6)


# --------------------------------------------------------------------------- pixel level


def test_pixel_curves_match_sklearn_on_flattened_pixels():
    maps, masks = make_pixels(1, n=5, h=24, w=24)
    out = M.compute(np.r_[0.1, 0.2, 0.3, 0.4, 0.5], [0, 1, 0, 1, 1], maps, masks)
    y, s = masks.ravel(), maps.ravel()
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert out["pixel_f1max"] == pytest.approx(sk_f1max(y, s), abs=1e-6)


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("norm", ["minmax", "limit"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_exact_matches_slow_reference(seed, norm, connectivity):
    maps, masks = make_pixels(seed)
    thresholds = np.unique(maps)[::-1]
    ref = slow_aupro(maps, masks, thresholds, norm, strict=False, connectivity=connectivity)
    ours = M.aupro(maps, masks, aupro_thresholds="exact", aupro_fpr_norm=norm, connectivity=connectivity)
    assert ours == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("norm", ["minmax", "limit"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_official_grid_matches_slow_reference(seed, norm):
    maps, masks = make_pixels(seed, decimals=2 if seed % 2 else None)
    maps[2, 0, 0], maps[2, 0, 1] = 0.0, 1.0  # normal pixels fixing the range to [0, 1]
    grid = np.arange(0.0, 1.0, 1.0 / 200)  # = np.arange(min, max, (max - min) / 200) in any NumPy
    assert len(grid) == 200
    # NumPy 1.x compares float32 maps with the float64 threshold cast to float32.
    ref = slow_aupro(maps, masks, grid.astype(np.float32)[::-1], norm, strict=True)
    assert M.aupro(maps, masks, aupro_fpr_norm=norm) == pytest.approx(ref, abs=1e-9)


def test_official_grid_has_numpy1_extra_threshold():
    # NumPy 1.26 (the official environments' NumPy): len(np.arange(np.float32(0), hi, (hi - 0) / 200))
    # is 201 for this hi, and the last threshold, cast to float32, equals hi itself.
    hi = np.float32(0.900300145149231)
    grid = M._binned_thresholds(torch.tensor(np.float32(0.0)), torch.tensor(hi), 200)
    assert len(grid) == 201
    assert grid[-1].item() == float(hi)
    np.testing.assert_array_equal(grid[:200].numpy(), np.arange(0.0, float(hi), float(hi) / 200)[:200].astype(np.float32))
    # End to end: the max value sits on a normal pixel, so the 201st threshold adds an FPR-0 point,
    # which moves the min-max rescaling.
    maps, masks = make_pixels(5, decimals=None)
    maps = (maps - maps.min()) / (maps.max() - maps.min()) * hi
    maps[2, 0, 0], maps[2, 0, 1] = 0.0, hi
    maps = maps.astype(np.float32)
    ref = slow_aupro(maps, masks, grid.numpy()[::-1], "minmax", strict=True)
    ref_200 = slow_aupro(maps, masks, grid.numpy()[:200][::-1], "minmax", strict=True)
    ours = M.aupro(maps, masks)
    assert ours == pytest.approx(ref, abs=1e-9)
    assert abs(ref - ref_200) > 1e-6  # the extra threshold matters here


def test_regions_use_8_connectivity_like_skimage():
    masks = np.zeros((3, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours
    masks[1, 0:2, 0:2] = masks[1, 4:6, 4:6] = True
    assert M.label_regions(masks)[1] == 1 + 2
    assert M.label_regions(masks, connectivity=4)[1] == 2 + 2
    labels, n = M.label_regions(masks)
    assert set(labels[0].unique().tolist()) == {0, 1} and labels[2].max() == 0  # numbered across images
    measure = pytest.importorskip("skimage.measure")  # the official code's labeller
    rng = np.random.default_rng(0)
    rand = rng.random((8, 16, 16)) < 0.35
    assert M.label_regions(rand)[1] == sum(int(measure.label(m).max()) for m in rand)


# --------------------------------------------------------------------------- options, dtypes, devices


def test_float16_and_mask_dtypes_agree():
    maps, masks = make_pixels(2, decimals=None)
    maps16 = torch.from_numpy(maps).half()
    scores, labels = np.linspace(0, 1, len(maps)), masks.reshape(len(masks), -1).any(1)
    ref = M.compute(scores, labels, maps16.float().numpy(), masks)
    for m in (masks.astype(np.uint8), torch.from_numpy(masks).float(), torch.from_numpy(masks)[:, None]):
        out = M.compute(torch.from_numpy(scores), torch.from_numpy(labels), maps16, m)
        assert out == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("protocol", sorted(M.PROTOCOLS))
def test_values_in_unit_interval(protocol):
    for seed in range(4):
        maps, masks = make_pixels(seed)
        rng = np.random.default_rng(seed)
        out = M.compute(rng.random(len(maps)), [0, 1, 1, 0, 1, 1], maps, masks, protocol=protocol)
        assert set(out) == set(M.IMAGE_KEYS + M.PIXEL_KEYS)
        assert all(0.0 <= v <= 1.0 for v in out.values()), out


def test_options_change_results_in_the_documented_direction():
    maps, masks = make_pixels(7, n=12, h=48, w=48, decimals=None)
    exact_limit = M.aupro(maps, masks, aupro_thresholds="exact", aupro_fpr_norm="limit")
    exact_minmax = M.aupro(maps, masks, aupro_thresholds="exact", aupro_fpr_norm="minmax")
    binned = M.aupro(maps, masks, aupro_thresholds=200, aupro_fpr_norm="limit")
    assert binned == pytest.approx(exact_limit, abs=0.02)  # binning approximates the exact curve
    assert exact_minmax == pytest.approx(exact_limit, abs=0.01)  # exact grid: min ~0, max ~limit
    # the mean of a non-decreasing PRO curve over [0, L] grows with L
    a, b, c = (M.aupro(maps, masks, aupro_thresholds="exact", aupro_fpr_norm="limit", fpr_limit=L) for L in (0.05, 0.3, 1.0))
    assert a <= b <= c
    # a perfect map: every region fully found before any false positive
    assert M.aupro(masks.astype(np.float32), masks, aupro_fpr_norm="limit") == pytest.approx(1.0)


def test_protocol_presets_and_overrides():
    assert M.resolve_options() == M.PROTOCOLS["anomalyclip"]
    assert M.resolve_options("anomalyclip").aupro_thresholds == 200
    opts = M.resolve_options("adaptclip", fpr_limit=0.2)
    assert (opts.ap, opts.aupro_thresholds, opts.aupro_fpr_norm, opts.fpr_limit) == ("trapezoid_sorted", "exact", "limit", 0.2)
    with pytest.raises(UnknownNameError, match="aupro_steps"):
        M.compute([0.1, 0.9], [0, 1], aupro_steps=100)
    with pytest.raises(UnknownNameError, match="anomalyclip"):
        M.compute([0.1, 0.9], [0, 1], protocol="mvtec")
    with pytest.raises(UnknownNameError):
        M.compute([0.1, 0.9], [0, 1], ap="area")


def test_resolution_option_resizes_maps_and_masks():
    maps, masks = make_pixels(3, h=16, w=16)
    big_maps = torch.from_numpy(maps).repeat_interleave(2, 1).repeat_interleave(2, 2)
    big_masks = torch.from_numpy(masks).repeat_interleave(2, 1).repeat_interleave(2, 2)
    scores, labels = np.arange(6.0), [0, 1, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="resolution"):
        M.compute(scores, labels, big_maps, masks)
    same = M.compute(scores, labels, big_maps, big_masks, resolution=32)
    assert same == pytest.approx(M.compute(scores, labels, big_maps, big_masks), abs=1e-12)
    down = M.compute(scores, labels, big_maps, big_masks, resolution=(16, 16))
    assert down["pixel_auroc"] == pytest.approx(M.compute(scores, labels, maps, masks)["pixel_auroc"], abs=0.05)


def test_bad_inputs_name_the_problem():
    maps, masks = make_pixels(0)
    scores, labels = np.arange(6.0), [0, 1, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="masks must be binary"):
        M.compute(scores, labels, maps, masks * 0.7)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        M.compute(scores, labels, bad, masks)
    with pytest.raises(ValueError, match="both"):
        M.compute(scores, labels, maps)
    with pytest.raises(ValueError, match="image_labels"):
        M.compute(scores, labels[:5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    maps, masks = make_pixels(4, n=12, h=40, w=40)
    scores, labels = np.random.default_rng(0).random(12), masks.reshape(12, -1).any(1)
    for protocol in M.PROTOCOLS:
        cpu = M.compute(scores, labels, maps, masks, protocol=protocol)
        gpu = M.compute(torch.from_numpy(scores).cuda(), torch.from_numpy(labels).cuda(), torch.from_numpy(maps).cuda(),
                        torch.from_numpy(masks).cuda(), protocol=protocol)
        assert gpu == pytest.approx(cpu, abs=1e-9)


# --------------------------------------------------------------------------- undefined metrics, per class


def test_class_without_anomalies_gives_nan_and_warning():
    maps, masks = make_pixels(0)
    masks[:] = False
    with pytest.warns(M.UndefinedMetricWarning) as record:
        out = M.compute(np.arange(6.0), np.zeros(6), maps, masks)
    assert all(math.isnan(v) for v in out.values())
    text = " ".join(str(w.message) for w in record)
    assert all(key in text for key in M.IMAGE_KEYS + M.PIXEL_KEYS), text


def test_class_without_normals_leaves_defined_metrics():
    with pytest.warns(M.UndefinedMetricWarning, match="image_auroc"):
        out = M.compute([0.2, 0.5, 0.5], [1, 1, 1])
    assert math.isnan(out["image_auroc"])
    assert out["image_ap"] == 1.0 and out["image_f1max"] == 1.0


def test_compute_per_class_and_mean_over_classes():
    maps, masks = make_pixels(1, n=9)
    names = ["a", "b", "c"] * 3
    masks[[3, 4, 2, 5, 8]] = False  # "a" and "b" get a normal image; "c" (2, 5, 8) has no anomalies
    labels = masks.reshape(9, -1).any(1)
    scores = np.random.default_rng(0).random(9)
    with pytest.warns(M.UndefinedMetricWarning, match="class 'c'"):
        rows = M.compute_per_class(scores, labels, names, maps, masks)
    assert list(rows) == ["a", "b", "c"]
    sel = [0, 3, 6]
    assert rows["a"] == pytest.approx(M.compute(scores[sel], labels[sel], maps[sel], masks[sel]))
    assert math.isnan(rows["c"]["image_auroc"]) and math.isnan(rows["c"]["pixel_aupro"])

    mean, excluded = M.mean_over_classes(rows)
    for key in M.IMAGE_KEYS + M.PIXEL_KEYS:
        defined = [rows[c][key] for c in rows if not math.isnan(rows[c][key])]
        assert mean[key] == pytest.approx(np.mean(defined))
        assert excluded[key] == [c for c in rows if math.isnan(rows[c][key])]
    assert "c" in excluded["image_auroc"]


def test_mean_over_classes_all_nan_and_missing():
    res = M.mean_over_classes({"x": {"m": math.nan}, "y": {"m": math.nan, "k": 0.5}})
    assert math.isnan(res.mean["m"]) and res.excluded["m"] == ["x", "y"]
    assert res.mean["k"] == 0.5 and res.excluded["k"] == ["x"]


def test_no_warning_when_everything_is_defined():
    maps, masks = make_pixels(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.compute(np.arange(6.0), [0, 1, 1, 0, 1, 0], maps, masks, protocol="adaptclip")
