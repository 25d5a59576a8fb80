"""Method options as frozen dataclasses, the training contract, converters in the registry, and
detectors saved before the Options dataclasses (``tests/fixtures/legacy``, written by the code of
commit fd2359c with ``make_legacy.py``) loading with the same scores."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import json
import textwrap
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipad
import clipad.cli.common
from clipad import ClipadError, UnknownNameError
from clipad.cli import build_parser, main, method_options
from clipad.errors import InvalidTypeError, InvalidValueError
from clipad.methods import get_method
from clipad.methods.anomalyclip.options import AnomalyCLIPOptions
from clipad.methods.base import Detector, LearnedDetector, LearnedOptions, Options
from clipad.methods.registry import converters, learned_methods, list_converters
from clipad.methods.tokenclip.options import TokenCLIPOptions
from _helpers import FIXTURES_DIR

METHODS = clipad.list_methods()
LEGACY = FIXTURES_DIR / "legacy"
SIZE = 64

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(method: str, **options) -> Detector:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return clipad.create_detector(method, backbone="tiny", pretrained=None, device="cpu", **options)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        build_parser().parse_args([*argv, "--help"])
    assert info.value.code == 0
    return out.getvalue()


# --------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("method", METHODS)
def test_options_fields_are_what_create_detector_accepts(method: str):
    cls = get_method(method)
    assert issubclass(cls.Options, Options) and cls.Options is not Options
    assert cls.Options.__dataclass_params__.frozen
    names = [f.name for f in dataclasses.fields(cls.Options)]
    defaults = {f.name: f.default for f in dataclasses.fields(cls.Options)}
    assert all(d is not dataclasses.MISSING for d in defaults.values())
    det = _build(method, **{**defaults, "image_size": SIZE})  # every field is accepted by name
    assert list(det.options) == names
    assert det.options == json.loads(json.dumps(det.options))  # JSON-able as saved
    with pytest.raises(UnknownNameError, match="not_an_option") as info:
        _build(method, not_an_option=1)
    assert all(name in str(info.value) for name in names)


@pytest.mark.parametrize("method", METHODS)
def test_every_option_is_documented(method: str):
    """Each field of each Options class in the MRO is followed by its docstring."""
    for klass in get_method(method).Options.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, after in zip(body, [*body[1:], None]):
            if isinstance(stmt, ast.AnnAssign):
                documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                assert documented, f"{klass.__name__}.{stmt.target.id} has no docstring"


def test_tokenclip_options_extend_anomalyclips_without_repeating_them():
    assert issubclass(TokenCLIPOptions, AnomalyCLIPOptions)
    inherited = {f.name: f.default for f in dataclasses.fields(AnomalyCLIPOptions)}
    assert not set(TokenCLIPOptions.__annotations__) & set(inherited)
    own = {f.name: f.default for f in dataclasses.fields(TokenCLIPOptions)}
    assert {k: own[k] for k in inherited} == inherited
    assert get_method("tokenclip").Options is TokenCLIPOptions


def test_literal_choices_match_the_methods_constants():
    from clipad.methods.anoclip import model as anoclip
    from clipad.methods.anoclip.prompts import DOMAINS
    from clipad.methods.tokenclip import model as tokenclip

    def choices(method: str, name: str) -> tuple:
        return typing.get_args(typing.get_type_hints(get_method(method).Options)[name])

    assert choices("anoclip", "domain") == DOMAINS
    assert choices("anoclip", "adapter") == anoclip.ADAPTERS
    for name, values in (("assignment", tokenclip.ASSIGNMENTS), ("orthogonality", tokenclip.ORTHOGONALITY),
                         ("cost", tokenclip.COSTS), ("image_score", tokenclip.IMAGE_SCORES)):
        assert choices("tokenclip", name) == values


# --------------------------------------------------------------------------- checking values


@pytest.mark.parametrize(
    ("method", "options", "error", "words"),
    [
        ("winclip", {"scales": "x"}, InvalidTypeError, ["scales", "list of integers", "'x'", "[2, 3]"]),
        ("winclip", {"scales": [2, "3"]}, InvalidTypeError, ["scales"]),
        ("winclip", {"image_size": True}, InvalidTypeError, ["image_size", "integer"]),
        ("winclip", {"temperature": float("inf")}, InvalidValueError, ["temperature", "finite"]),
        ("anomalyclip", {"temperature": "abc"}, InvalidTypeError, ["temperature", "finite number", "'abc'"]),
        ("anomalyclip", {"temperature": float("nan")}, InvalidValueError, ["temperature", "nan"]),
        ("anomalyclip", {"temperature": 0}, InvalidValueError, ["temperature", "> 0"]),
        ("anomalyclip", {"n_ctx": 2.5}, InvalidTypeError, ["n_ctx", "integer"]),
        ("anomalyclip", {"checkpoint": 3}, InvalidTypeError, ["checkpoint", "string or None"]),
        ("anomalyclip", {"taps": [0.0]}, InvalidValueError, ["taps", "(0, 1]"]),
        ("adaptclip", {"taps": [0.5, "a"]}, InvalidTypeError, ["taps", "finite numbers"]),
        ("adaptclip", {"schedule": "joint"}, UnknownNameError, ["schedule", "'released'", "'alternate'"]),
        ("anoclip", {"tta": "yes"}, InvalidTypeError, ["tta", "true or false"]),
        ("anoclip", {"domain_phrases": "x-ray"}, InvalidTypeError, ["domain_phrases"]),
        ("tokenclip", {"assignment": "hungarian"}, UnknownNameError, ["assignment", "'ot'", "'softmax'"]),
        ("tokenclip", {"precision": "fp8"}, UnknownNameError, ["precision", "'bf16'"]),
    ],
)
def test_bad_option_values_are_one_clear_error(method, options, error, words):
    with pytest.raises(error) as info:
        _build(method, **options)
    message = str(info.value)
    assert message.startswith(f"method '{method}': option ")
    for word in words:
        assert word in message, (word, message)


def test_values_are_normalised():
    det = _build("winclip", image_size=SIZE, scales=[2], temperature=1)
    assert det.opts.scales == (2,) and det.scales == (2,) and det.options["scales"] == [2]
    assert isinstance(det.opts.temperature, float) and det.options["temperature"] == 1.0
    assert AnomalyCLIPOptions(checkpoint=Path("a/b.safetensors")).checkpoint == str(Path("a/b.safetensors"))
    assert AnomalyCLIPOptions(taps=[np.float32(0.5), 1]).taps == (0.5, 1.0)


def test_options_instance_or_keywords_and_precision_setter():
    from clipad.backbones.clip import create_backbone
    from clipad.methods.winclip import WinCLIP
    from clipad.methods.winclip.options import WinCLIPOptions

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        bb = create_backbone("tiny", None)
    a = WinCLIP(bb, WinCLIPOptions(image_size=SIZE, scales=(2,)))
    b = WinCLIP(bb, image_size=SIZE, scales=[2])
    assert a.opts == b.opts and a.options == b.options
    with pytest.raises(InvalidValueError, match="not both"):
        WinCLIP(bb, WinCLIPOptions(), image_size=SIZE)
    with pytest.raises(InvalidTypeError, match="WinCLIPOptions"):
        WinCLIP(bb, AnomalyCLIPOptions())
    with pytest.raises(InvalidValueError, match="multiple of the patch size 16"):
        WinCLIP(bb, image_size=SIZE + 1)
    with pytest.raises(UnknownNameError, match="precision"):
        a.precision = "fp16"
    a.precision = "bf16"
    assert a.opts.precision == "bf16" and a.options["precision"] == "bf16"


# --------------------------------------------------------------------------- the command line


def _png(tmp_path: Path) -> Path:
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    ("method", "setting", "word"),
    [("winclip", "scales=x", "scales"), ("anomalyclip", "temperature=abc", "temperature"),
     ("anomalyclip", "temperature=NaN", "temperature"), ("tokenclip", "cost=min", "cost"), ("winclip", "scalez=[2]", "scalez")],
)
def test_bad_set_value_is_one_line_and_exit_2(tmp_path, method, setting, word):
    code, _, err = _run(["predict", str(_png(tmp_path)), "--method", method, "--backbone", "tiny", "--pretrained", "none",
                         "--device", "cpu", "--image-size", str(SIZE), "--out", str(tmp_path / "out"), "--quiet",
                         "--set", setting])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipad: ") and word in lines[0], err
    assert "Traceback" not in err


def test_help_lists_each_methods_options():
    text = _help(["predict"])
    assert "method options (--set KEY=VALUE" in text
    for method in METHODS:
        assert f"  {method}: " in text
    for option in ("scales=[2, 3]", "n_subspaces=4", "schedule=released", "dpam_start=0.25", "tta_steps=5"):
        assert option in text, option
    for flag in ("--tta", "--domain", "--checkpoint"):
        assert flag in text
    assert len(text.split("method options (--set")[1].splitlines()) < 40  # the section stays short


def test_train_help_and_method_choice(tmp_path):
    text = _help(["train"])
    assert "(default: anomalyclip)" in text and "default: winclip" not in text
    assert "  winclip: " not in text and "  anomalyclip: " in text
    code, _, err = _run(["train", "--dataset", "folder", "--root", str(tmp_path), "--out", str(tmp_path / "o"),
                         "--method", "winclip", "--backbone", "tiny"])
    assert code == 2
    assert "winclip" in err and all(m in err for m in learned_methods()), err


def test_option_flags_come_from_options_metadata(tmp_path):
    args = build_parser().parse_args(["predict", "x.png", "--method", "anoclip", "--tta", "--domain", "texture",
                                      "--set", "tta_steps=2"])
    assert method_options(args) == {"tta": True, "domain": "texture", "tta_steps": 2}
    assert method_options(build_parser().parse_args(["predict", "x.png"])) == {}
    weights = tmp_path / "w.safetensors"  # --checkpoint must name an existing file
    weights.touch()
    args = build_parser().parse_args(["predict", "x.png", "--method", "adaptclip", "--checkpoint", str(weights)])
    assert method_options(args) == {"checkpoint": str(weights)}
    source = inspect.getsource(clipad.cli.common)
    assert not any(word in source for word in ("anoclip", "tta", "domain", "anomalyclip")), "the shared CLI names no method"


# --------------------------------------------------------------------------- contracts


def test_learned_methods_subclass_learned_detector():
    assert learned_methods() == ["adaclip", "adaptclip", "anomalyclip", "tokenclip"]
    for method in METHODS:
        cls = get_method(method)
        assert issubclass(cls, LearnedDetector) == (method in learned_methods())
        if issubclass(cls, LearnedDetector):
            assert issubclass(cls.Options, LearnedOptions)
            assert cls.training_defaults and cls.min_train_batch >= 1 and cls.training_references >= 0


def test_fit_refuses_a_detector_without_learned_tensors(tmp_path):
    from clipad.train.loop import TrainConfig, fit

    with pytest.raises(ClipadError, match="nothing to train") as info:
        fit(_build("winclip", image_size=SIZE), [object()], tmp_path, TrainConfig())
    assert "anomalyclip" in str(info.value)


def test_checkpoint_is_applied_by_create_detector_only(tmp_path):
    det = _build("anomalyclip", image_size=SIZE)
    det.reset_parameters(5)
    path = det.save(tmp_path / "a.safetensors")
    via = _build("anomalyclip", image_size=SIZE, checkpoint=path)
    assert via.options["checkpoint"] == str(path)
    assert all(torch.equal(v, det.learned_state()[k]) for k, v in via.learned_state().items())
    with pytest.raises(InvalidValueError, match="create_detector"):
        type(det)(det.backbone, image_size=SIZE, checkpoint=str(path))


def test_references_view_is_read_only():
    det = _build("winclip", image_size=SIZE)
    det.set_reference(torch.rand(1, 3, SIZE, SIZE))
    assert list(det.references) == [""] and det.references[""]["shots"].item() == 1
    with pytest.raises(TypeError):
        det.references["x"] = {}  # type: ignore[index]
    with pytest.raises(ClipadError, match="few-shot"):
        _build("anomalyclip", image_size=SIZE).load_references({"": {"shots": torch.tensor(1)}})


def test_converters_come_from_the_registry(tmp_path):
    from clipad.convert import convert_checkpoint
    from clipad.methods.adaclip import convert as adaclip
    from clipad.methods.adaptclip import convert as adaptclip
    from clipad.methods.anomalyclip import convert as anomalyclip

    assert list_converters() == ["adaclip", "adaptclip", "anomalyclip"]
    assert converters() == {"adaclip": adaclip.convert_official, "adaptclip": adaptclip.convert_official,
                            "anomalyclip": anomalyclip.convert_official}
    with pytest.raises(UnknownNameError, match="unknown source 'winclip'.*adaclip, adaptclip, anomalyclip"):
        convert_checkpoint("winclip", tmp_path / "x.pth", tmp_path / "y.safetensors")
    text = _help(["convert"])
    assert "adaptclip" in text and "anomalyclip" in text and "AnomalyCLIP only" not in text


# --------------------------------------------------------------------------- files saved by the old code


def _legacy_images(seed: int, n: int = 2) -> torch.Tensor:
    """make_legacy.images: [n, 3, 72, 64] in [0, 1]."""
    return torch.from_numpy(np.random.default_rng(seed).random((n, 3, 72, 64), dtype=np.float32))


LEGACY_SCORES = json.loads((LEGACY / "scores.json").read_text())


@pytest.mark.parametrize("method", sorted(LEGACY_SCORES["scores"]))
def test_detector_saved_by_the_old_code_loads_with_the_same_scores(method: str):
    path = LEGACY / f"{method}.safetensors"
    assert path.stat().st_size < 300_000
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        det = clipad.load_detector(path, device="cpu")
    assert det.name == method and det.options["precision"] == "fp32"
    expected = LEGACY_SCORES["scores"][method]
    pred = det.predict(_legacy_images(LEGACY_SCORES["image_seed"]), class_name=LEGACY_SCORES["class_name"])
    # values saved on one CPU: another CPU's kernels move the maps by up to 6.6e-7 here (seen with
    # ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE), so the suite's 1e-5 for maps and scores
    torch.testing.assert_close(pred.image_scores, torch.tensor(expected["image_scores"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(pred.anomaly_maps[0, 0], torch.tensor(expected["map_first_row"]), rtol=0, atol=1e-5)
    assert abs(float(pred.anomaly_maps.double().sum()) - expected["map_sum"]) < 1e-5 * pred.anomaly_maps.numel()
