"""One error policy: every error clipad raises on purpose is a ClipadError, every warning it emits a
ClipadWarning, and the CLI prints both one way (``clipad: ...`` lines, above any progress bar)."""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import io
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipad
from clipad.cli import main
from clipad.cli.common import report, warnings_reported
from clipad.errors import ClipadError, ClipadWarning, InvalidValueError, SkippedInputWarning

SRC = Path(clipad.__file__).parent
TINY = ["--backbone", "tiny", "--pretrained", "none", "--quiet", "--workers", "0"]
_BUILTIN_EXCEPTIONS = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
# raised on purpose but not an error of the caller's: the abstract method of a base class
# NotImplementedError: abstract methods; AttributeError: the protocol of a module __getattr__ (PEP 562)
_ALLOWED_BUILTINS = {"NotImplementedError", "AttributeError"}
# a file:line location as Python's default warning display writes it (`x.py:12:`, `<string>:5:`)
_LOCATION = re.compile(r"(\.py|<[a-z]+>):\d+")


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(SRC.rglob("*.py"))]


def _name(node: ast.expr) -> str | None:
    """``Foo`` for ``Foo``, ``Foo(...)`` and ``mod.Foo(...)``."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _img(path: Path, rng, defect: bool = False) -> None:
    a = (rng.random((48, 56, 3)) * 255).astype(np.uint8)
    if defect:
        a[10:30, 20:40] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


# --------------------------------------------------------------------------- the source


def test_no_builtin_exception_is_raised_on_purpose():
    """``raise ValueError(...)`` & co. in src/clipad: each must be a ClipadError subclass (that may
    also subclass the builtin, e.g. InvalidValueError), so the CLI reports it without a traceback."""
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:  # a bare `raise` re-raises
                name = _name(node.exc)
                if name in _BUILTIN_EXCEPTIONS and name not in _ALLOWED_BUILTINS:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: raise {name}")
    assert not offenders, "raise a clipad.errors class instead:\n" + "\n".join(offenders)


def test_the_scan_sees_builtin_raises():
    """The scan above would catch each form it is meant to catch."""
    src = "raise ValueError('x')\nraise TypeError\nraise builtins.RuntimeError('y') from None\nraise KeyError(k) from e\nraise\n"
    names = [_name(n.exc) for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Raise) and n.exc is not None]
    assert names == ["ValueError", "TypeError", "RuntimeError", "KeyError"]
    assert all(n in _BUILTIN_EXCEPTIONS for n in names)


def test_every_public_exception_class_is_a_clipad_error():
    found = []
    for path, tree in _modules():
        classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and not n.name.startswith("_")]
        if not classes or path.name == "__main__.py":
            continue
        module = ".".join(("clipad", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # an optional extra (serve: fastapi) that is not installed
            if "clipad" in str(exc):
                raise
            continue
        for name in classes:
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, Warning):
                found.append(cls)
                assert issubclass(cls, ClipadError), f"{module}.{name} is not a ClipadError"
    assert len(found) >= 5, found  # the scan found the classes of errors.py at least


def test_every_warning_names_its_category():
    """``warnings.warn(msg)`` without a category would be a bare UserWarning: not a ClipadWarning."""
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) == "warn" and isinstance(node.func, ast.Attribute) \
                    and _name(node.func.value) == "warnings":
                category = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "category"), None)
                if category is None or _name(category) in _BUILTIN_EXCEPTIONS:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, "pass a ClipadWarning (sub)class:\n" + "\n".join(offenders)


def test_error_classes_keep_their_builtin_kind():
    from clipad.errors import InvalidTypeError, MissingFileError, NotReadyError, NumericalError
    from clipad.eval.metrics import UndefinedMetricWarning

    for cls, kind in ((InvalidValueError, ValueError), (InvalidTypeError, TypeError), (NumericalError, FloatingPointError),
                      (MissingFileError, FileNotFoundError), (NotReadyError, RuntimeError)):
        assert issubclass(cls, ClipadError) and issubclass(cls, kind), cls
    assert str(MissingFileError("curve 'x.png' does not exist")) == "curve 'x.png' does not exist"
    assert issubclass(UndefinedMetricWarning, ClipadWarning) and issubclass(UndefinedMetricWarning, RuntimeWarning)
    assert issubclass(ClipadWarning, UserWarning)
    with pytest.raises(InvalidValueError, match="fpr_limit"):
        clipad.eval.metrics.MetricOptions(fpr_limit=0)
    with pytest.raises(clipad.UnknownNameError, match=r"\[4, 8\]"):
        clipad.eval.metrics.MetricOptions(connectivity=6)


# --------------------------------------------------------------------------- printing


def test_warnings_print_once_each_without_category_or_location():
    err = io.StringIO()
    before = warnings.showwarning
    with contextlib.redirect_stderr(err), warnings_reported():
        for _ in range(3):
            warnings.warn("mask 'm.png' has 3 levels", ClipadWarning, stacklevel=1)
        warnings.warn("image 'x.png': truncated; skipped", SkippedInputWarning, stacklevel=1)
        warnings.warn("something from a dependency", DeprecationWarning, stacklevel=1)
        warnings.warn("something from a dependency", DeprecationWarning, stacklevel=1)
    assert warnings.showwarning is before
    lines = err.getvalue().splitlines()
    assert lines == [
        "clipad: warning: mask 'm.png' has 3 levels",
        "clipad: image 'x.png': truncated; skipped",
        "clipad: warning: DeprecationWarning: something from a dependency",
    ], lines


def test_skipped_inputs_show_even_where_warnings_are_ignored():
    """A skipped file explains the exit code 1: a filter that hides warnings must not hide it."""
    err = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stderr(err), warnings_reported():
            warnings.warn("image 'x.png': truncated; skipped", SkippedInputWarning, stacklevel=1)
            warnings.warn("a note", ClipadWarning, stacklevel=1)
    assert err.getvalue().splitlines() == ["clipad: image 'x.png': truncated; skipped"]


def test_python_api_still_gets_python_warnings():
    with pytest.warns(ClipadWarning, match="undefined"):
        clipad.eval.metrics.compute([0.1, 0.2], [0, 0])


def test_report_goes_above_a_progress_bar():
    from tqdm import tqdm

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        bar = tqdm(total=4, desc="bar", file=sys.stderr, mininterval=0)
        bar.update(2)
        report("a note")
        bar.update(2)
        bar.close()
    text = err.getvalue()
    assert "bar:  50%" in text
    # on a line of its own: the bar blanked out before it, and redrawn at 50% after its newline
    assert re.search(r"\r +\rclipad: a note\n\rbar:  50%", text), repr(text)


def test_user_mistake_is_one_line_and_exit_2(tmp_path):
    rng = np.random.default_rng(0)
    _img(tmp_path / "a.png", rng)
    code, _, err = _cli(["predict", str(tmp_path / "a.png"), *TINY[:-2], "--image-size", "64",
                         "--set", "temperature=-1", "--out", str(tmp_path / "o")])
    assert code == 2, err
    assert "Traceback" not in err
    hits = [line for line in err.splitlines() if "temperature" in line]
    assert len(hits) == 1 and hits[0].startswith("clipad: "), err


def test_library_value_errors_exit_2_and_bugs_propagate(tmp_path, monkeypatch):
    _img(tmp_path / "a.png", np.random.default_rng(0))
    argv = ["predict", str(tmp_path / "a.png"), *TINY[:-2], "--out", str(tmp_path / "o")]

    def invalid(*args, **kwargs):
        raise InvalidValueError("image_size=3 is too small; give at least 32")

    monkeypatch.setattr(clipad.api, "create_detector", invalid)
    code, _, err = _cli(argv)
    assert (code, err) == (2, "clipad: image_size=3 is too small; give at least 32\n")

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(clipad.api, "create_detector", bug)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        _cli(argv)


def test_predict_prints_library_warnings_one_line_each(tmp_path):
    """A saved detector with random weights: the backbone's warning, once, as a clipad line."""
    rng = np.random.default_rng(0)
    for i in range(3):
        _img(tmp_path / "in" / f"q{i}.png", rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = clipad.create_detector("winclip", backbone="tiny", pretrained=None, device="cpu", image_size=64)
    det.save(tmp_path / "det.safetensors")
    code, _, err = _cli(["predict", str(tmp_path / "in"), "--detector", str(tmp_path / "det.safetensors"),
                         "--batch-size", "1", "--out", str(tmp_path / "o")])
    assert code == 0, err
    hits = [line for line in err.splitlines() if "randomly initialised" in line]
    assert len(hits) == 1, err
    assert hits[0].startswith("clipad: warning: backbone 'tiny' uses randomly initialised weights"), hits[0]
    assert "UserWarning" not in err and "ClipadWarning" not in err and not _LOCATION.search(err), err


def test_eval_prints_an_undefined_metric_once(tmp_path):
    """A class without anomalies: each 'undefined' warning once, as a clipad line, not twice."""
    rng = np.random.default_rng(1)
    root = tmp_path / "mvtec"
    for i in range(2):
        _img(root / "screw" / "train" / "good" / f"{i:03d}.png", rng)
        _img(root / "screw" / "test" / "good" / f"{i:03d}.png", rng)
    code, _, err = _cli(["eval", "--dataset", "mvtec", "--root", str(root), *TINY, "--image-size", "64",
                         "--out", str(tmp_path / "O")])
    assert code == 0, err
    lines = err.splitlines()
    image = [line for line in lines if "image_auroc, image_ap, image_f1max undefined" in line]
    pixel = [line for line in lines if "pixel_auroc, pixel_ap, pixel_f1max undefined" in line]
    assert len(image) == 1 and len(pixel) == 1, err
    assert image[0].startswith("clipad: warning: class 'screw': image_auroc"), image[0]
    assert "UndefinedMetricWarning" not in err and not _LOCATION.search(err), err
