"""The self-contained HTML report that ``clipad eval`` writes next to its metrics JSON.

One file, ``report.html``, readable offline and safe to mail around: images are embedded as
base64 data URIs, the CSS is inline, there is no JavaScript, and a Content-Security-Policy
forbids loading anything from outside the file. Every piece of text that comes from data (class
names, file paths, config values, notes) is HTML-escaped: dataset folders are untrusted input;
bytes of file names that are not UTF-8 are shown as ``\\xNN`` (:mod:`clipad.eval.files`).

Sections: run configuration, per-class metrics table (+ mean row), notes, ROC / PR curve
images, and the highest- and lowest-scoring images of each class (image, heatmap overlay and
ground-truth mask side by side, with score and label).

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> out = write_report(Path(tempfile.mkdtemp()), title="demo", config={"method": "winclip"},
    ...                    table=[{"class": "bottle", "image_auroc": 0.9}])
    >>> out.name
    'report.html'
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image

from ..errors import InvalidValueError, MissingFileError, UnknownNameError
from .files import display_text, write_text_atomic
from .viz import fit_for_display, overlay, value_range

#: Table columns in display order with their headers; other keys follow in first-seen order.
COLUMNS: dict[str, str] = {
    "class": "class",
    "n_images": "images",
    "n_anomalous": "anomalous",
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1max": "image F1-max",
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1max": "pixel F1-max",
    "pixel_aupro": "pixel AUPRO",
}

_NA_FOOTNOTE = (
    "n/a: the metric is undefined for this class (for example no anomalous test images, or no "
    "ground-truth masks). Classes with n/a are left out of the mean of that metric."
)

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #1d232b; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d5dbe3; }
h3 { font-size: 15px; margin: 20px 0 6px; }
table { border-collapse: collapse; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e7ed; }
th { background: #f2f4f7; text-align: left; font-weight: 600; }
table.metrics td.num, table.metrics th.num { text-align: right;
                                             font-variant-numeric: tabular-nums; }
table.metrics tfoot td { font-weight: 700; border-top: 2px solid #9aa5b4; }
table.config th { width: 12em; }
.na { color: #8a94a3; }
.footnote, .caption, .muted { color: #5b6675; font-size: 12px; }
.curves img { max-width: 100%; height: auto; border: 1px solid #e3e7ed; margin: 4px 0; }
.example { display: flex; gap: 10px; align-items: flex-start; margin: 8px 0 14px; }
.example figure { margin: 0; text-align: center; }
.example figcaption { font-size: 11px; color: #5b6675; }
.thumb { display: block; object-fit: contain; background: #f2f4f7; image-rendering: pixelated;
         border: 1px solid #e3e7ed; }
.nomask { display: flex; align-items: center; justify-content: center; color: #8a94a3;
          background: #f2f4f7; border: 1px dashed #c9d0da; font-size: 12px; }
.meta { font-size: 12px; min-width: 180px; max-width: 300px; word-break: break-all; }
.meta .score { font-size: 16px; font-weight: 700; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 9px; font-size: 11px;
         color: #fff; }
.badge.anomalous { background: #c0392b; } .badge.normal { background: #2e7d4f; }
.badge.unknown { background: #7b8594; }
.role { text-transform: uppercase; letter-spacing: .04em; font-size: 10px; color: #5b6675; }
.scale { display: flex; align-items: center; gap: 6px; font-size: 12px; color: #5b6675; }
.scale .bar { width: 220px; height: 12px; border: 1px solid #c9d0da; }
"""


def _e(value: object) -> str:
    # display_text first: a file name with undecodable bytes (a lone surrogate) cannot be
    # written as UTF-8; it is shown as \xNN instead of failing the whole report
    return html.escape(display_text(value), quote=True)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _format_cell(key: str, value: object, percent: bool) -> tuple[str, bool]:
    """HTML of one table cell's content and whether it is numeric (right-aligned)."""
    if _is_missing(value):
        return '<span class="na">n/a</span><sup>*</sup>', True
    if isinstance(value, (bool, np.bool_)) or isinstance(value, str):
        return _e(value), False
    if isinstance(value, (int, np.integer)):
        return _e(int(value)), True
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if key.startswith("n_") and value.is_integer():
            return _e(int(value)), True
        if math.isinf(value):
            return _e(value), True
        return (f"{100.0 * value:.1f}" if percent else f"{value:.4f}"), True
    return _e(value), False


def _metrics_table(table: Sequence[Mapping[str, Any]], percent: bool) -> tuple[str, bool]:
    """``<table>`` HTML and whether any value was missing (so the footnote is needed)."""
    keys = [k for k in COLUMNS if any(k in row for row in table)]
    for row in table:
        keys += [k for k in row if k not in keys]
    body_rows, foot_rows, any_missing = [], [], False
    for i, row in enumerate(table):
        cells = []
        for key in keys:
            value = row.get(key)
            any_missing |= _is_missing(value)
            content, numeric = _format_cell(key, value, percent)
            cells.append(f'<td class="num">{content}</td>' if numeric else f"<td>{content}</td>")
        line = "<tr>" + "".join(cells) + "</tr>"
        is_mean = i == len(table) - 1 and str(row.get("class", "")).lower() == "mean"
        (foot_rows if is_mean else body_rows).append(line)
    numeric_cols = {k for k in keys if k != "class"}
    head = "".join(
        f'<th class="num">{_e(COLUMNS.get(k, k))}</th>'
        if k in numeric_cols
        else f"<th>{_e(COLUMNS.get(k, k))}</th>"
        for k in keys
    )
    parts = ['<table class="metrics">', f"<thead><tr>{head}</tr></thead>"]
    parts += ["<tbody>", *body_rows, "</tbody>"]
    if foot_rows:
        parts += ["<tfoot>", *foot_rows, "</tfoot>"]
    parts.append("</table>")
    return "\n".join(parts), any_missing


def _data_uri(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=85)
    else:
        img.save(buf, format="PNG", optimize=True)
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _png_file_uri(path: Path) -> str:
    data = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _display_size(h: int, w: int, side: int) -> tuple[int, int]:
    """Width and height of an ``[h, w]`` thumbnail shown with its long side ``side`` pixels."""
    scale = side / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _label_badge(label: object) -> str:
    if _is_missing(label):
        return '<span class="badge unknown">unlabelled</span>'
    if isinstance(label, (bool, int, np.integer, np.bool_, float, np.floating)):
        return (
            '<span class="badge anomalous">anomalous</span>'
            if label
            else '<span class="badge normal">normal</span>'
        )
    return f'<span class="badge unknown">{_e(label)}</span>'


def _gradient_css(cmap: str) -> str:
    colours = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 11), bytes=True)[:, :3]
    stops = ", ".join(f"rgb({r},{g},{b})" for r, g, b in colours)
    return f"background: linear-gradient(to right, {stops});"


def select_examples(
    scores: Sequence[float] | np.ndarray, class_names: Sequence[str], k: int = 3
) -> list[int]:
    """Indices of the ``k`` highest- and ``k`` lowest-scoring images of each class.

    Lets ``clipad eval`` load images and maps only for what the report shows.

    Args:
        scores: ``[N]`` image scores (NaN scores are never selected).
        class_names: ``[N]`` class of each image.
        k: images per end per class.

    Returns:
        Sorted indices into ``scores``, each at most once.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(class_names),):
        raise InvalidValueError(f"{scores.size} scores but {len(class_names)} class names; give one class name per score")
    names = np.asarray(class_names, dtype=object)
    chosen: set[int] = set()
    for name in dict.fromkeys(class_names):
        idx = np.flatnonzero((names == name) & ~np.isnan(scores))
        order = idx[np.argsort(-scores[idx], kind="stable")]
        chosen.update(order[:k].tolist())
        chosen.update(order[max(k, order.size - k):].tolist())
    return sorted(chosen)


def _examples_section(
    examples: Sequence[Mapping[str, Any]],
    class_order: Sequence[str],
    per_class: int,
    side: int,
    fmt: str,
    cmap: str,
) -> str:
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for name in class_order:
        by_class.setdefault(str(name), [])
    for ex in examples:
        by_class.setdefault(str(ex.get("class_name", "")), []).append(ex)
    gradient = _gradient_css(cmap)
    parts = [
        '<p class="muted">Per class, the highest- and lowest-scoring test images: input, anomaly '
        "map over the input, ground-truth mask. Within a class all overlays share one colour "
        "scale, so normal and anomalous images can be compared by eye.</p>"
    ]
    for name, items in by_class.items():
        if not items:
            continue
        items = sorted(items, key=lambda ex: -_sort_score(ex.get("score")))
        if len(items) > 2 * per_class:
            shown = [("highest", ex) for ex in items[:per_class]]
            shown += [("lowest", ex) for ex in items[-per_class:]]
        else:
            shown = [(f"rank {i + 1} of {len(items)}", ex) for i, ex in enumerate(items)]
        maps = [np.asarray(ex["amap"], dtype=np.float32) for _, ex in shown]
        lows, highs = zip(*(value_range(m) for m in maps))
        lo, hi = min(lows), max(highs)
        parts.append(f"<h3>{_e(name)}</h3>")
        parts.append(
            f'<div class="scale"><span>{lo:.4g}</span><span class="bar" style="{gradient}"></span>'
            f"<span>{hi:.4g}</span><span>anomaly score (colour scale of this class)</span></div>"
        )
        for (role, ex), amap in zip(shown, maps):
            parts.append(_example_row(role, ex, amap, lo, hi, side, fmt, cmap))
    return "\n".join(parts)


def _sort_score(score: object) -> float:
    return -math.inf if _is_missing(score) else float(score)  # type: ignore[arg-type]


def _example_row(
    role: str,
    ex: Mapping[str, Any],
    amap: np.ndarray,
    lo: float,
    hi: float,
    side: int,
    fmt: str,
    cmap: str,
) -> str:
    path = str(ex.get("path", ""))
    try:
        rgb, small_map, small_mask = fit_for_display(ex["image"], amap, ex.get("mask"), side)
    except ValueError as err:
        raise InvalidValueError(f"report example '{path}': {err}") from None
    h, w = small_map.shape
    dw, dh = _display_size(h, w, side)
    size_attr = f'width="{dw}" height="{dh}"'
    blended = overlay(rgb, small_map, lo, hi, cmap=cmap)
    cells = [
        f'<figure><img class="thumb" {size_attr} alt="input {_e(path)}" '
        f'src="{_data_uri(Image.fromarray(rgb), fmt)}"><figcaption>input</figcaption></figure>',
        f'<figure><img class="thumb" {size_attr} alt="anomaly map {_e(path)}" '
        f'src="{_data_uri(Image.fromarray(blended), fmt)}">'
        "<figcaption>anomaly map</figcaption></figure>",
    ]
    if small_mask is not None:
        mask_img = Image.fromarray(small_mask.astype(np.uint8) * 255).convert("1")
        cells.append(
            f'<figure><img class="thumb" {size_attr} alt="mask {_e(path)}" '
            f'src="{_data_uri(mask_img, "png")}"><figcaption>ground truth</figcaption></figure>'
        )
    else:
        cells.append(
            f'<figure><div class="nomask" style="width:{dw}px;height:{dh}px">no mask</div>'
            "<figcaption>ground truth</figcaption></figure>"
        )
    score = ex.get("score")
    score_txt = "n/a" if _is_missing(score) else f"{float(score):.4g}"
    meta = (
        f'<div class="meta"><div class="role">{_e(role)}</div>'
        f'<div class="score">score {_e(score_txt)}</div>'
        f"<div>{_label_badge(ex.get('label'))}</div>"
        f"<div>{_e(path)}</div></div>"
    )
    return '<div class="example">' + "".join(cells) + meta + "</div>"


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    config: Mapping[str, Any] | None = None,
    table: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
    curve_pngs: Sequence[str | Path] = (),
    examples: Sequence[Mapping[str, Any]] = (),
    examples_per_class: int = 3,
    thumb_side: int = 256,
    thumb_format: str = "jpeg",
    percent: bool = True,
    cmap: str = "jet",
) -> Path:
    """Write ``out_dir/report.html``.

    Args:
        out_dir: folder to write into (created if missing).
        title: page title, e.g. ``"winclip on MVTec AD (0-shot)"``.
        config: run configuration shown first, e.g. method, backbone, pretrained, dataset,
            shots, seed, image size; values are shown with ``str``.
        table: one row per class then, optionally, a last row whose ``class`` is ``"mean"``
            (shown as the table footer). Keys as :data:`COLUMNS` (others are appended); floats
            are metrics in [0, 1], counts start with ``n_``. NaN / None show as "n/a" with a
            footnote.
        notes: free-text remarks, one bullet each (e.g. skipped files, deviations).
        curve_pngs: PNG files of curves (e.g. from :func:`clipad.viz.save_roc_pr_png`), embedded.
        examples: dicts with ``path``, ``class_name``, ``score``, ``label`` (1 / True =
            anomalous, 0 = normal, None = unknown), ``image`` (PIL or uint8 ``[H, W, 3]``),
            ``amap`` (``[H, W]`` float) and ``mask`` (``[H, W]`` bool or None). Per class the
            ``examples_per_class`` highest and lowest are shown (all, if there are few);
            :func:`select_examples` picks which to load.
        examples_per_class: images per end per class.
        thumb_side: long side of the example thumbnails in pixels.
        thumb_format: ``"jpeg"`` (default: 5-10x smaller than PNG for photographs, which keeps
            a 15-class report near 1-2 MB) or ``"png"`` (lossless). Masks are always PNG.
        percent: show metrics x100 with one decimal, as the papers do; else 4 decimals.
        cmap: colormap of the overlays.

    Returns:
        Path of the written ``report.html``.
    """
    if thumb_format not in ("jpeg", "png"):
        raise UnknownNameError(f"thumb_format must be 'jpeg' or 'png', got {thumb_format!r}")
    out_dir = Path(out_dir)
    config = dict(config or {})

    # Curve files are read first so a missing one fails before anything is written.
    curve_html = []
    for png in curve_pngs:
        png = Path(png)
        if not png.is_file():
            raise MissingFileError(
                f"curve image '{png}' does not exist; write it before the report"
            )
        curve_html.append(f'<img src="{_png_file_uri(png)}" alt="{_e(png.stem)}">')

    body = [f"<h1>{_e(title)}</h1>"]
    body.append("<h2>Run configuration</h2>")
    if config:
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in config.items())
        body.append(f'<table class="config">{rows}</table>')
    else:
        body.append('<p class="muted">not recorded</p>')

    body.append("<h2>Metrics</h2>")
    if table:
        table_html, any_missing = _metrics_table(table, percent)
        body.append(table_html)
        unit = "Metrics are in percent (x100)." if percent else "Metrics are fractions in [0, 1]."
        unit += " AUPRO is integrated up to a false positive rate of 0.3."
        body.append(f'<p class="footnote">{unit}</p>')
        if any_missing:
            body.append(f'<p class="footnote" id="na-footnote">* {_e(_NA_FOOTNOTE)}</p>')
    else:
        body.append('<p class="muted">no metrics</p>')

    if notes:
        body.append("<h2>Notes</h2>")
        body.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")

    if curve_html:
        body.append("<h2>Curves</h2>")
        body.append('<div class="curves">' + "\n".join(curve_html) + "</div>")

    if examples:
        body.append("<h2>Examples</h2>")
        class_order = [str(r.get("class")) for r in table if "class" in r]
        body.append(
            _examples_section(
                examples, class_order, examples_per_class, thumb_side, thumb_format, cmap
            )
        )

    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            # No scripts, nothing fetched from outside: the page is a document, not an app.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'\">",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed so a reader never sees a half-written report; the
    # temporary file is removed if writing fails (e.g. a full disk).
    return write_text_atomic(out_dir / "report.html", page)
