"""No result is ever lost to an output error (``clipad predict``, ``clipad eval``).

- File names whose bytes are not UTF-8 (Linux allows them; Python holds them as surrogate
  escapes) reach every output and message as visible ``\\xNN``, never a crash.
- Whole files are written atomically (no truncated file, no ``*.tmp`` left behind); one output
  that cannot be written is reported on one line, the run goes on and exits 1.
- ``scores.csv`` is written as images are scored, so a run that dies keeps its rows.
- Friction: a ``heatmap`` column says which overlay belongs to which row (equal stems); files a
  directory holds with unsupported extensions are reported, not silently ignored.

Every run goes through ``clipad.cli.main`` under ``capsys``, whose stdout/stderr are strict UTF-8
like a pipe: a surrogate printed there raises, as it would in a log capture.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipad.cli import main
from clipad.eval import files, viz

FAST = ["--backbone", "tiny", "--pretrained", "none", "--image-size", "64", "--quiet"]
EVAL = ["--backbone", "tiny", "--pretrained", "none", "--image-size", "64", "--quiet", "--workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _bytes_path(base: Path, *parts: bytes) -> Path:
    """``base/part/...`` with raw-byte components, as Python sees such a name (surrogate escapes)."""
    return Path(os.fsdecode(os.path.join(os.fsencode(base), *parts)))


@pytest.fixture()
def raw_names(tmp_path: Path) -> Path:
    """Skips where the file system refuses names that are not UTF-8 (macOS APFS, Windows)."""
    probe = _bytes_path(tmp_path, b"probe\xff")
    try:
        probe.write_bytes(b"")
    except (OSError, UnicodeError):
        pytest.skip("this file system does not allow file names that are not UTF-8")
    probe.unlink()
    return tmp_path


def _image(path: Path, seed: int, size=(64, 64), defect: bool = False) -> Path:
    a = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    if defect:
        a[10:30, 20:40] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format="PNG")
    return path


def _mask(path: Path, size=(64, 64)) -> None:
    m = np.zeros(size, np.uint8)
    m[10:30, 20:40] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path, format="PNG")


def _run(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(argv)


def _read_scores(path: Path) -> tuple[list[str], list[list[str]]]:
    text = path.read_bytes().decode("utf-8")  # strict: valid UTF-8 or this raises
    rows = list(csv.reader(io.StringIO(text, newline="")))
    return rows[0], rows[1:]


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def _failing_on(stem: str):
    """An ``atomic_write`` that fails like a full disk when writing the file named ``stem``."""
    real = files.atomic_write

    @contextlib.contextmanager
    def atomic_write(path, mode="w", **kwargs):
        with real(path, mode, **kwargs) as f:
            yield f
            if Path(path).stem == stem:
                f.write(b"half a file" if "b" in mode else "half a file")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return atomic_write


# --------------------------------------------------------------------------- the helpers


def test_display_text_escapes_only_what_cannot_be_utf8():
    assert files.display_text("bad\udcff.png") == "bad\\xff.png"
    assert files.display_text("été.png") == "été.png"  # valid text untouched
    assert files.display_text("x\ud800") == "x\\ud800"  # a lone surrogate not from a file name
    raw = b"/d/caf\xe9/\xff\xfe.png"
    shown = files.display_path(raw)
    assert shown == raw.decode("utf-8", "backslashreplace")  # the documented, reversible form
    shown.encode("utf-8")
    assert files.display_path(os.fsdecode(raw)) == shown


def test_atomic_write_failure_leaves_old_file_and_no_tmp(tmp_path: Path):
    target = tmp_path / "metrics.json"
    files.write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with files.atomic_write(target) as f:
            f.write("new but incomplete")
            raise RuntimeError("disk gone")
    assert target.read_text() == "old"
    assert _tmp_files(tmp_path) == []
    with files.atomic_write(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _tmp_files(tmp_path) == []


def test_report_html_rename_failure_leaves_no_tmp(tmp_path: Path, monkeypatch):
    """The failure behind a 0-byte report.html.tmp: the rename (or write) fails at the end."""
    from clipad.eval import report

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(files.os, "replace", no_space)
        with pytest.raises(OSError):
            report.write_report(tmp_path, title="t", table=[{"class": "a", "image_auroc": 0.5}])
    assert list(tmp_path.iterdir()) == []
    assert report.write_report(tmp_path, title="t").name == "report.html"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


# --------------------------------------------------------------------------- predict


def test_predict_non_utf8_file_and_folder_names(raw_names: Path, capsys):
    inputs = raw_names / "in"
    _image(_bytes_path(inputs, b"bad\xff.png"), 1)
    _image(_bytes_path(inputs, b"sub\xfe", b"x.png"), 2)
    _image(inputs / "good.png", 3)
    out = _bytes_path(raw_names, b"out\xfd")
    rc = _run(["predict", str(inputs), *FAST, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    header, rows = _read_scores(out / "scores.csv")
    assert header == ["path", "score", "heatmap"]
    by_name = {r[0]: r for r in rows}
    bad = files.display_path(os.fsencode(inputs) + b"/bad\xff.png")
    sub = files.display_path(os.fsencode(inputs) + b"/sub\xfe/x.png")
    assert set(by_name) == {bad, sub, str(inputs / "good.png")}
    assert "bad\\xff.png" in bad and "sub\\xfe" in sub  # visible, lossless
    for path, score, heatmap in rows:
        assert np.isfinite(float(score))
        assert (out / heatmap).is_file(), heatmap  # the column names the file exactly
    assert by_name[bad][2] == "heatmaps/bad\\xff.png"
    assert "out\\xfd" in captured.out and "3 image(s)" in captured.out
    assert _tmp_files(out) == []


def test_predict_unreadable_file_with_non_utf8_name_is_one_line(raw_names: Path, capsys):
    inputs = raw_names / "in"
    _image(inputs / "good.png", 1)
    _bytes_path(inputs, b"broken\xff.png").write_bytes(b"")
    rc = _run(["predict", str(inputs), *FAST, "--out", str(raw_names / "o")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1
    hits = [line for line in err if "broken\\xff.png" in line]
    assert len(hits) == 1 and "empty" in hits[0] and "skipped" in hits[0]
    _, rows = _read_scores(raw_names / "o" / "scores.csv")
    assert [Path(r[0]).name for r in rows] == ["good.png"]


def test_predict_heatmap_write_error_keeps_every_row(tmp_path: Path, capsys, monkeypatch):
    inputs = tmp_path / "in"
    for i in range(3):
        _image(inputs / f"q{i}.png", i)
    monkeypatch.setattr(viz, "atomic_write", _failing_on("q1"))
    out = tmp_path / "o"
    rc = _run(["predict", str(inputs), *FAST, "--out", str(out), "--batch-size", "2"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1
    hits = [line for line in err if "q1" in line]
    assert len(hits) == 1 and "No space left on device" in hits[0], err
    assert "1 output file(s) not written" in err[-1]
    _, rows = _read_scores(out / "scores.csv")
    assert [Path(r[0]).name for r in rows] == ["q0.png", "q1.png", "q2.png"]
    assert [r[2] for r in rows] == ["heatmaps/q0.png", "", "heatmaps/q2.png"]
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["q0.png", "q2.png"]  # no .tmp
    assert _tmp_files(out) == []


def test_predict_keeps_rows_scored_before_a_crash(tmp_path: Path, monkeypatch):
    """scores.csv grows batch by batch: a run that dies keeps what it scored (valid CSV)."""
    from clipad.cli import predict

    inputs = tmp_path / "in"
    for i in range(3):
        _image(inputs / f"q{i}.png", i)
    real_build = predict.build_detector

    def build(args):
        det = real_build(args)
        real_predict, calls = det.predict, []

        def dying_predict(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("simulated crash at the third image")
            return real_predict(*a, **k)

        det.predict = dying_predict
        return det

    monkeypatch.setattr(predict, "build_detector", build)
    with pytest.raises(RuntimeError, match="third image"):
        _run(["predict", str(inputs), *FAST, "--out", str(tmp_path / "o"), "--batch-size", "1"])
    header, rows = _read_scores(tmp_path / "o" / "scores.csv")
    assert header == ["path", "score", "heatmap"]
    assert [Path(r[0]).name for r in rows] == ["q0.png", "q1.png"]


def test_predict_same_stem_heatmap_column(tmp_path: Path, capsys):
    inputs = tmp_path / "in"
    _image(inputs / "part.png", 1)
    _image(inputs / "part.jpg", 2)  # PNG bytes under .jpg: read by content
    _image(inputs / "b" / "part.png", 3)
    out = tmp_path / "o"
    assert _run(["predict", str(inputs), *FAST, "--out", str(out)]) == 0
    _, rows = _read_scores(out / "scores.csv")
    cells = {Path(r[0]).relative_to(inputs).as_posix(): r[2] for r in rows}
    assert len(set(cells.values())) == 3
    assert set(cells.values()) == {"heatmaps/part.png", "heatmaps/part_1.png", "heatmaps/part_2.png"}
    for cell in cells.values():
        assert (out / cell).is_file()
    # each cell names the overlay of its own row's image: scored alone, b/part.png gives the
    # figure closest to the one its row names (the input panels of the three differ entirely)
    alone = tmp_path / "alone"
    assert _run(["predict", str(inputs / "b" / "part.png"), *FAST, "--out", str(alone)]) == 0
    with Image.open(alone / "heatmaps" / "part.png") as im:
        ref = np.asarray(im, dtype=np.float32)

    def distance(cell: str) -> float:
        with Image.open(out / cell) as im:
            return float(np.abs(np.asarray(im, dtype=np.float32) - ref).mean())

    assert min(cells.values(), key=distance) == cells["b/part.png"]


def test_predict_reports_skipped_extensions(tmp_path: Path, capsys):
    inputs = tmp_path / "in"
    _image(inputs / "a.png", 1)
    frames = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (0, 255)]
    frames[0].save(inputs / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (inputs / "notes.txt").write_text("hello")
    (inputs / "deeper").mkdir()
    (inputs / "deeper" / "README").write_text("no extension")
    (inputs / ".hidden.txt").write_text("hidden files stay unmentioned")
    rc = _run(["predict", str(inputs), *FAST, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 0  # a note, not a failure
    hits = [line for line in err if "skipped" in line]
    assert len(hits) == 1, err
    assert f"'{inputs}'" in hits[0] and "3 file(s)" in hits[0]
    assert "unsupported extensions (.gif, .txt, no extension)" in hits[0]
    assert ".png" in hits[0].split("supported:")[1]
    # named explicitly, the animated GIF is read (first frame)
    rc = _run(["predict", str(inputs / "anim.gif"), *FAST, "--out", str(tmp_path / "g")])
    assert rc == 0
    _, rows = _read_scores(tmp_path / "g" / "scores.csv")
    assert len(rows) == 1


# --------------------------------------------------------------------------- eval


@pytest.fixture()
def raw_folder(raw_names: Path) -> Path:
    """A folder dataset whose class (root folder) and image names are not UTF-8."""
    root = _bytes_path(raw_names, b"cls\xfe")
    for i in range(3):
        _image(_bytes_path(root, b"good", b"g\xff%d.png" % i), i)
    for i in range(2):
        _image(_bytes_path(root, b"bad", b"b\xff%d.png" % i), 10 + i, defect=True)
        _mask(_bytes_path(root, b"masks", b"b\xff%d.png" % i))
    return root


def _eval(root: Path, out: Path) -> int:
    return _run(["eval", "--dataset", "folder", "--root", str(root), "--normal-dir", "good",
                 "--abnormal-dir", "bad", "--mask-dir", "masks", *EVAL, "--out", str(out)])


def test_eval_non_utf8_names_complete_outputs(raw_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "O"
    rc = _eval(raw_folder, out)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads((out / "metrics.json").read_bytes().decode("utf-8"))
    assert set(data["classes"]) == {"cls\\xfe"}
    assert data["classes"]["cls\\xfe"]["n_images"] == 5
    assert data["config"]["root"].endswith("cls\\xfe")
    lines = (out / "metrics.csv").read_bytes().decode("utf-8").splitlines()
    assert [line.split(",")[0] for line in lines] == ["class", "cls\\xfe", "mean"]
    html = (out / "report.html").read_bytes().decode("utf-8")
    HTMLParser().feed(html)
    assert "cls\\xfe" in html and "\\xff" in html and "</html>" in html  # example paths, complete
    with Image.open(out / "curves.png") as im:
        im.load()
    assert "cls\\xfe" in captured.out  # the printed table
    assert _tmp_files(out) == []


def test_eval_output_error_reports_one_line_and_writes_the_rest(tmp_path: Path, capsys, monkeypatch):
    root = tmp_path / "line"
    for i in range(3):
        _image(root / "good" / f"g{i}.png", i)
    for i in range(2):
        _image(root / "bad" / f"b{i}.png", 10 + i, defect=True)
        _mask(root / "masks" / f"b{i}.png")
    monkeypatch.setattr(viz, "atomic_write", _failing_on("curves"))
    out = tmp_path / "O"
    rc = _eval(root, out)
    captured = capsys.readouterr()
    assert rc == 1
    hits = [line for line in captured.err.splitlines() if "curves.png" in line]
    assert len(hits) == 1 and "No space left on device" in hits[0], captured.err
    assert not (out / "curves.png").exists()
    for name in ("metrics.json", "metrics.csv", "report.html"):
        assert (out / name).is_file(), name
    assert "curves.png could not be written" in (out / "report.html").read_text(encoding="utf-8")
    assert "mean" in captured.out  # the table is still printed
    assert _tmp_files(out) == []
