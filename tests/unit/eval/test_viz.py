"""Tests of clipad.viz: colour mapping, overlays, heatmap figures and curve helpers."""

from __future__ import annotations

import io
import warnings

import matplotlib
import numpy as np
import pytest
from PIL import Image

from clipad.eval import viz

sk_metrics = pytest.importorskip("sklearn.metrics")


def _jet(t: float) -> np.ndarray:
    return matplotlib.colormaps["jet"](np.array([t]), bytes=True)[0, :3]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- colorize


def test_colorize_shape_dtype_and_endpoints():
    amap = np.linspace(-1.0, 3.0, 40, dtype=np.float32).reshape(5, 8)
    rgb = viz.colorize(amap, 0.0, 2.0)
    assert rgb.shape == (5, 8, 3) and rgb.dtype == np.uint8
    # values at or beyond the range ends saturate to the colormap's end colours
    np.testing.assert_array_equal(rgb[0, 0], _jet(0.0))
    np.testing.assert_array_equal(rgb[-1, -1], _jet(1.0))


def test_colorize_is_monotone_on_a_gray_map():
    values = np.sort(np.random.default_rng(0).random(200)).reshape(10, 20)
    gray = viz.colorize(values, 0.0, 1.0, cmap="gray")[..., 0].ravel()
    assert np.all(np.diff(gray.astype(int)) >= 0)


def test_colorize_nan_and_inf():
    amap = np.array([[np.nan, np.inf, -np.inf, 0.5]])
    rgb = viz.colorize(amap, 0.0, 1.0)
    np.testing.assert_array_equal(rgb[0, 0], viz.NAN_RGB)
    np.testing.assert_array_equal(rgb[0, 1], _jet(1.0))
    np.testing.assert_array_equal(rgb[0, 2], _jet(0.0))


def test_colorize_constant_range_is_safe():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = viz.colorize(np.full((4, 4), 2.0), 2.0, 2.0)
    assert np.all(rgb == rgb[0, 0])
    np.testing.assert_array_equal(rgb[0, 0], _jet(0.5))


def test_colorize_rejects_reversed_range():
    with pytest.raises(ValueError, match="vmax"):
        viz.colorize(np.zeros((2, 2)), 1.0, 0.0)


# ----------------------------------------------------------------------------- overlay


def test_overlay_alpha_extremes_and_inputs():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    amap = rng.random((12, 16)).astype(np.float32)
    out = viz.overlay(img, amap, alpha=0.5)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(viz.overlay(img, amap, alpha=0.0), img)
    lo, hi = float(amap.min()), float(amap.max())
    np.testing.assert_array_equal(viz.overlay(img, amap, alpha=1.0), viz.colorize(amap, lo, hi))
    # PIL input and a grayscale array give the same as the RGB array they stand for
    np.testing.assert_array_equal(viz.overlay(Image.fromarray(img), amap), out)
    gray = img[..., 0]
    np.testing.assert_array_equal(viz.overlay(gray, amap), viz.overlay(np.stack([gray] * 3, -1), amap))


def test_overlay_nan_pixels_show_the_image():
    img = np.full((4, 4, 3), 77, np.uint8)
    amap = np.random.default_rng(2).random((4, 4))
    amap[1, 2] = np.nan
    out = viz.overlay(img, amap, alpha=0.7)
    np.testing.assert_array_equal(out[1, 2], [77, 77, 77])


def test_overlay_all_nan_map_is_safe():
    img = np.zeros((5, 5, 3), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = viz.overlay(img, np.full((5, 5), np.nan))
    np.testing.assert_array_equal(out, img)


def test_overlay_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(10, 12\).*20x24"):
        viz.overlay(np.zeros((20, 24, 3), np.uint8), np.zeros((10, 12)))


def test_overlay_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        viz.overlay(np.zeros((4, 4, 3), np.float32), np.zeros((4, 4)))


# ----------------------------------------------------------------------------- figures


def _count_colour(fig: np.ndarray, rgb: np.ndarray, tol: int = 6) -> int:
    return int(np.all(np.abs(fig.astype(int) - rgb.astype(int)) <= tol, axis=-1).sum())


def test_heatmap_figure_has_colour_bar():
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    amap = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    fig = viz.heatmap_figure(img, amap, score=0.73, title="part.png")
    assert isinstance(fig, Image.Image) and fig.mode == "RGB"
    arr = np.asarray(fig)
    # Two square panels plus a colour bar: wider than two panels' height side by side.
    assert fig.width > 2 * fig.height * 0.9
    # Over a mid-grey image with alpha 0.5 the overlay never shows the colormap's pure end
    # colours; only the colour bar does, so finding both proves a bar is drawn.
    assert _count_colour(arr, _jet(1.0)) > 50
    assert _count_colour(arr, _jet(0.0)) > 50


def test_heatmap_figure_mask_adds_a_panel():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    amap = rng.random((40, 40))
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    two = viz.heatmap_figure(img, amap, 0.5, "a")
    three = viz.heatmap_figure(img, amap, 0.5, "a", mask=mask)
    assert three.width > two.width * 1.3


@pytest.mark.parametrize(
    "amap",
    [np.full((30, 50), 2.5), np.full((30, 50), np.nan), np.where(np.eye(30, 50) > 0, np.nan, 1.0)],
    ids=["constant", "all-nan", "some-nan"],
)
def test_heatmap_figure_degenerate_maps(amap):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fig = viz.heatmap_figure(np.zeros((30, 50, 3), np.uint8), amap, float("nan"), None)
    assert fig.width > 0 and fig.height > 0


def test_heatmap_figure_title_is_not_mathtext():
    # An unbalanced '$' would make matplotlib's mathtext parser raise at draw time.
    fig = viz.heatmap_figure(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), 1.0, "a$b_\\frac{.png")
    assert fig.width > 0


def test_heatmap_figure_size_mismatch():
    with pytest.raises(ValueError, match="resize"):
        viz.heatmap_figure(np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4)), None, None)


def test_tiny_and_huge_inputs_give_bounded_figures():
    tiny = viz.heatmap_figure(Image.new("RGB", (10, 10)), np.random.default_rng(4).random((10, 10)), 0.1, "t")
    huge_map = np.zeros((8000, 8000), np.float32)
    huge_map[5003, 17] = 1.0
    huge = viz.heatmap_figure(Image.new("RGB", (8000, 8000), "gray"), huge_map, 0.9, "h")
    # Same aspect ratio and panels -> same figure, whatever the pixel count.
    assert tiny.size == huge.size
    assert max(huge.size) <= 2000
    assert len(_png_bytes(huge)) < 1_000_000 and len(_png_bytes(tiny)) < 1_000_000


def test_fit_for_display_keeps_one_pixel_peaks():
    amap = np.zeros((8000, 6000), np.float32)
    amap[7999, 5999] = 3.0  # in the last, partial block
    mask = np.zeros((8000, 6000), bool)
    mask[123, 456] = True
    rgb, small, small_mask = viz.fit_for_display(Image.new("RGB", (6000, 8000)), amap, mask, max_side=512)
    assert max(small.shape) <= 512 and rgb.shape[:2] == small.shape == small_mask.shape
    assert small.max() == 3.0 and small[-1, -1] == 3.0
    assert small_mask.sum() == 1


def test_save_overlay_png(tmp_path):
    path = viz.save_overlay_png(tmp_path / "sub" / "x.png", np.zeros((16, 16, 3), np.uint8), np.eye(16), 0.3, "x")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 16


# ----------------------------------------------------------------------------- curves


def _tied_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = np.round(rng.random(n) + 0.5 * labels, 1)  # rounding makes many ties
    return scores, labels.astype(int)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_points_match_sklearn(seed):
    scores, labels = _tied_data(500, seed)
    fpr, tpr, thr = viz.roc_curve_points(scores, labels)
    ref_fpr, ref_tpr, ref_thr = sk_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_array_equal(thr, ref_thr)
    assert viz.roc_auc_from_points(fpr, tpr) == pytest.approx(sk_metrics.roc_auc_score(labels, scores))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pr_points_match_sklearn(seed):
    scores, labels = _tied_data(500, seed)
    precision, recall, thr = viz.pr_curve_points(scores, labels)
    ref_p, ref_r, ref_t = sk_metrics.precision_recall_curve(labels, scores)
    np.testing.assert_allclose(precision, ref_p)
    np.testing.assert_allclose(recall, ref_r)
    np.testing.assert_array_equal(thr, ref_t)
    ap = viz.average_precision_from_points(precision, recall)
    assert ap == pytest.approx(sk_metrics.average_precision_score(labels, scores))


def test_curves_with_one_label_kind_are_nan():
    fpr, tpr, _ = viz.roc_curve_points([0.1, 0.5, 0.9], [0, 0, 0])
    assert np.isnan(tpr).all() and not np.isnan(fpr).any()
    assert np.isnan(viz.roc_auc_from_points(fpr, tpr))


def test_curve_input_errors():
    with pytest.raises(ValueError, match="length"):
        viz.roc_curve_points([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="NaN"):
        viz.pr_curve_points([0.1, np.nan], [0, 1])


def test_roc_pr_figure(tmp_path):
    rng = np.random.default_rng(5)
    many = rng.random(200_000)
    curves = {
        "bottle": _tied_data(300, 0),
        "pixels $x$": (many, rng.random(200_000) < many * 0.2),  # thinned before plotting
        "no anomalies": (rng.random(50), np.zeros(50)),
    }
    path = viz.save_roc_pr_png(tmp_path / "curves.png", curves, title="image level")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > img.height
