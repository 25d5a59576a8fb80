"""Tests of clipad.report: the self-contained HTML report of ``clipad eval``."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipad.eval import report, viz

EVIL = "<script>alert(1)</script>"
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}


class StrictParser(HTMLParser):
    """Records tag-structure errors that browsers would silently repair."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def _parse(text: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    return parser


def _example(i: int, cls: str, score: float, label: int, size=(48, 64)) -> dict:
    rng = np.random.default_rng(i)
    h, w = size
    mask = None
    if label:
        mask = np.zeros(size, bool)
        mask[h // 4 : h // 2, w // 4 : w // 2] = True
    return {
        "path": f"data/{cls}/img_{i:03d}&\"x\".png",
        "class_name": cls,
        "score": score,
        "label": label,
        "image": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
        "amap": rng.random(size).astype(np.float32),
        "mask": mask,
    }


TABLE = [
    {"class": "bottle", "n_images": 12, "n_anomalous": 4, "image_auroc": 0.91234, "image_ap": 0.8,
     "pixel_auroc": 0.975, "pixel_aupro": 0.8123},
    {"class": EVIL, "n_images": 5, "n_anomalous": 0, "image_auroc": float("nan"), "image_ap": float("nan"),
     "pixel_auroc": float("nan"), "pixel_aupro": float("nan")},
    {"class": "mean", "n_images": 17, "n_anomalous": 4, "image_auroc": 0.91234, "image_ap": 0.8,
     "pixel_auroc": 0.975, "pixel_aupro": 0.8123},
]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    curve = viz.save_roc_pr_png(out / "curves.png", {"bottle": (rng.random(40), rng.random(40) < 0.5)})
    examples = [_example(i, "bottle", float(i) / 10, i % 2) for i in range(10)]
    examples += [_example(100 + i, EVIL, 0.5 + i, 0, size=(20, 10)) for i in range(2)]
    path = report.write_report(
        out / "sub",
        title=f"winclip {EVIL}",
        config={"method": "winclip", "backbone": "tiny", "dataset": "mvtec", "shots": 0, "seed": 7},
        table=TABLE,
        notes=[f"skipped {EVIL}.png: truncated"],
        curve_pngs=[curve],
        examples=examples,
        examples_per_class=2,
    )
    return path, path.read_text(encoding="utf-8")


def test_report_is_written(written):
    path, text = written
    assert path.name == "report.html" and path.is_file()
    assert text.startswith("<!DOCTYPE html>")
    assert not path.with_name("report.html.tmp").exists()


def test_table_values_are_formatted(written):
    _, text = written
    assert ">91.2<" in text  # image_auroc 0.91234 as percent, one decimal
    assert ">81.2<" in text and ">97.5<" in text
    assert ">12<" in text and ">17<" in text  # counts stay integers
    assert "<tfoot>" in text and text.index("<tfoot>") < text.index(">mean<")
    for key in ("method", "backbone", "dataset", "shots", "seed"):
        assert f"<th>{key}</th>" in text


def test_nan_shows_na_with_footnote(written):
    _, text = written
    assert text.count(">n/a<") == 4
    assert re.search(r"n/a: the metric is undefined.*left out of the mean", text)


def test_no_footnote_without_nan(tmp_path):
    text = report.write_report(tmp_path, title="t", table=TABLE[:1], percent=False).read_text()
    assert "n/a" not in text
    assert ">0.9123<" in text


def test_untrusted_text_is_escaped(written):
    _, text = written
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "img_001&amp;&quot;x&quot;.png" in text


def test_html_is_well_formed_and_self_contained(written):
    _, text = written
    parser = _parse(text)
    assert parser.errors == [] and parser.stack == []
    tags = {t for t, _ in parser.tags}
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    srcs = [a["src"] for t, a in parser.tags if "src" in a]
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:|//|file:)", text)


def test_embedded_images_decode_and_are_small(written):
    _, text = written
    uris = re.findall(r'src="data:image/(png|jpeg);base64,([^"]+)"', text)
    # 1 curve + bottle: 2 highest + 2 lowest (3 images each) + EVIL class: 2 examples (2 images + "no mask")
    assert len(uris) == 1 + 4 * 3 - 2 + 2 * 2  # two of the four bottle examples are normal: no mask image
    for fmt, data in uris[1:]:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            assert img.format.lower() == fmt and max(img.size) <= 256


def test_highest_and_lowest_per_class(written):
    _, text = written
    section = text[text.index("<h2>Examples</h2>"):]
    shown = re.findall(r"img_(\d{3})&amp;", section)
    bottle = sorted({int(s) for s in shown if int(s) < 100})
    assert bottle == [0, 1, 8, 9]
    assert section.count(">highest<") == 2 and section.count(">lowest<") == 2
    # bottle's examples come first (table order), highest score first
    assert section.index("img_009") < section.index("img_008") < section.index("img_001") < section.index("img_100")


def test_select_examples_matches_brute_force():
    rng = np.random.default_rng(3)
    scores = rng.random(60)
    classes = [["a", "b", "c"][i % 3] for i in range(60)]
    got = report.select_examples(scores, classes, k=4)
    want = set()
    for c in "abc":
        idx = sorted((i for i in range(60) if classes[i] == c), key=lambda i: scores[i])
        want |= set(idx[:4]) | set(idx[-4:])
    assert got == sorted(want)


def test_missing_curve_png_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        report.write_report(tmp_path, title="t", table=TABLE, curve_pngs=[tmp_path / "nope.png"])
    assert not (tmp_path / "report.html").exists()


def test_mismatched_example_names_the_path(tmp_path):
    bad = _example(0, "bottle", 0.5, 1)
    bad["amap"] = np.zeros((5, 5), np.float32)
    with pytest.raises(ValueError, match=r"img_000.*\(5, 5\)"):
        report.write_report(tmp_path, title="t", table=TABLE, examples=[bad])
