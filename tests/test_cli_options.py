"""Every option of every subcommand refuses bad values while parsing: one ``clipad:`` line naming
the option, exit code 2, no traceback, nothing loaded.

The walk takes the options from ``build_parser()`` itself, and ``INVALID`` must hold bad values
for each of them (:func:`test_every_option_has_invalid_values`): a new option fails this file
until its bad values are declared. The cases never reach a subcommand (each ``cmd_*`` is replaced
by one that fails the test), so no model is built; the few behaviours that need one (a saved
``--detector`` with ``--pretrained`` / ``--quick-gelu`` or with values other than its own,
``--shots`` over the pool) use the tiny random backbone on 64 px images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipad
from clipad import cli
from clipad.cli import build_parser, main
from clipad.errors import ClipadWarning

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------- the table
#
# dest -> bad values. A value is the text given to the option (``--flag=VALUE``, or the
# positional itself), or (text, extra argv) for a value that is bad only beside another option.
# Placeholders: {file} an existing file, {dir} an existing directory, {missing} a path that does
# not exist. Keys "command.dest" add cases for one subcommand.

_INTS_POSITIVE = ["0", "-3", "x", "2.5", ""]
_INTS_NON_NEGATIVE = ["-1", "x", "1.5", ""]
_FLOATS_POSITIVE = ["0", "-1", "nan", "inf", "x", ""]
_FLOATS_FINITE = ["nan", "inf", "-inf", "x", ""]
_SEEDS = ["-1", "x", str(2**32), ""]
_DEVICES = ["tpu", "", "cuda:x", "cpu:0", "cuda:99", "CUDA"]
_DEVICES += [] if torch.cuda.is_available() else ["cuda", "cuda:0"]
_DEVICES += [] if torch.backends.mps.is_available() else ["mps"]

INVALID: dict[str, list] = {
    "command": ["nosuch", ""],
    # model options (predict, eval, train, serve; some also bench and convert)
    "method": ["nosuch", ""],
    "train.method": ["winclip"],  # registered, but nothing to train
    "backbone": ["nosuch", "", "RN50"],
    "pretrained": ["", "{missing}.pt", "{missing}/w.bin", "{dir}"],
    "detector": ["{missing}", "{dir}", ""],
    "image_size": _INTS_POSITIVE,
    "device": _DEVICES,
    "batch_size": _INTS_POSITIVE,
    "precision": ["fp16", ""],
    "checkpoint": ["{missing}", "{dir}", ""],
    "predict.checkpoint": [("{file}", ["--method", "winclip"])],  # winclip learns nothing
    "domain": ["", ("nosuch", ["--method", "anoclip"]), ("object", ["--method", "winclip"])],
    "set": ["scales=x", "temperature=nan", "temperature=inf", "novalue", "=3", "no_such_option=1", ""],
    "init_seed": _SEEDS,
    "quick_gelu": ["maybe", ""],
    # predict
    "reference": ["{missing}", ""],
    "class_name": ["", " "],
    "out": ["{file}/sub", ""],
    "predict.out": ["{file}"], "eval.out": ["{file}"], "train.out": ["{file}"],  # directories
    "export.out": ["{dir}"],  # a file
    "model": ["{missing}", "{dir}", ""],
    "vmin": [*_FLOATS_FINITE, ("1", ["--vmax=0"]), ("1", ["--vmax=1"])],
    "vmax": [*_FLOATS_FINITE, ("0", ["--vmin=0.5"])],
    "max_image_pixels": _FLOATS_POSITIVE,
    "pixel_threshold": _FLOATS_FINITE,
    # dataset (eval, train, calibrate)
    "dataset": ["nosuch", ""],
    "root": ["{missing}", "{file}", ""],
    "normal_dir": ["", "nosuch", ("good", ["--dataset=mvtec"])],
    "abnormal_dir": ["", "nosuch"],
    "mask_dir": ["", "nosuch"],
    "meta_path": ["{missing}", "{dir}", "{file}"],  # {file}: with --dataset folder
    "split_csv": ["{missing}", "{dir}", "{file}"],
    # eval
    "shots": _INTS_NON_NEGATIVE,
    "seed": _SEEDS,
    "classes": ["", " "],
    "eval_size": _INTS_POSITIVE,
    "resize": ["nearest"],
    "protocol": ["nosuch"],
    "workers": _INTS_NON_NEGATIVE,
    "metrics_device": _DEVICES,
    "examples": _INTS_NON_NEGATIVE,
    # train
    "epochs": _INTS_POSITIVE,
    "lr": _FLOATS_POSITIVE,
    "split": ["val"],
    "max_steps": _INTS_POSITIVE,
    # convert
    "source": ["nosuch", "winclip"],
    "input": ["{missing}", "{dir}", ""],
    "output": ["{dir}", "{file}/x.safetensors", ""],
    # calibrate (its --out is "output", as convert's)
    "fpr": ["0", "1", "-0.1", "1.5", "nan", "x", ""],
    "pixel_fpr": ["0", "1", "nan", "x"],
    "confidence": ["0", "1", "nan", "x"],
    # export
    "format": ["tflite", ""],
    "input_format": ["int8"],
    "opset": ["16", "21", "x", ""],
    "tolerance": _FLOATS_POSITIVE,
    "verify": _INTS_NON_NEGATIVE,
    "verify_images": ["{missing}", "{file}", ""],
    # bench
    "batch": _INTS_POSITIVE,
    "dtype": ["fp16"],
    "warmup": _INTS_NON_NEGATIVE,
    "repeats": _INTS_POSITIVE,
    "threads": _INTS_POSITIVE,
    "json": ["{dir}", "{file}/x.json", ""],
    # serve
    "host": ["", " "],
    "port": ["70000", "65536", "-1", "x", ""],
    "max_batch": _INTS_POSITIVE,
    "max_wait_ms": ["-5", "nan", "inf", "x", ""],
    "max_upload_mb": _FLOATS_POSITIVE,
    "token": [""],
    "threshold": _FLOATS_FINITE,
    "references_dir": ["{file}", ""],
    "max_request_pixels": [*_FLOATS_POSITIVE, ("300", [])],  # over the default in-flight budget
    "max_inflight_pixels": [*_FLOATS_POSITIVE, ("10", [])],  # under the default request budget
    "log_level": ["verbose"],
    # scale-out (predict, eval): --ray [ADDRESS]; the others only with --ray
    "ray": ["", "x", "host:x", "host:70000", "host:0", "http://host:6379"],
    "actors": [*_INTS_POSITIVE, "2"],  # "2": without --ray
    "gpus_per_actor": ["-1", "nan", "inf", "x", "", "0.5"],  # "0.5": without --ray
    "predict.ray": [("local", ["--threshold=0.5"]), ("local", ["--vmin=0", "--vmax=1"])],  # not with --ray
}

#: Options whose values are not usage errors, and why.
NOT_CHECKED_WHILE_PARSING = {
    "images": "each input is checked as it is read: a missing or unreadable one is reported on its line and "
              "skipped, and the run exits 1 (tests/integration/cli/test_cli_predict.py)",
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    """'' (the top-level parser) and each subcommand -> its parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **sub.choices}


def _value_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions that take a value (not --help, --version, flags)."""
    return [a for a in parser._actions if a.nargs != 0 and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


_COMMANDS = _commands()
_OPTIONS = [(name, a.dest) for name, p in _COMMANDS.items() for a in _value_actions(p)
            if a.dest not in NOT_CHECKED_WHILE_PARSING]


def test_every_option_has_invalid_values():
    """A new option fails here until INVALID holds its bad values (or NOT_CHECKED_WHILE_PARSING says why)."""
    missing = sorted({f"{name or 'clipad'} {dest}" for name, dest in _OPTIONS if dest not in INVALID})
    assert not missing, f"declare invalid values in INVALID for: {missing}"
    known = {dest for _, dest in _OPTIONS} | set(NOT_CHECKED_WHILE_PARSING)
    stale = sorted(k for k in INVALID if k.split(".")[-1] not in known)
    assert not stale, f"INVALID holds options that no longer exist: {stale}"
    assert len(_OPTIONS) > 100  # the walk saw every subcommand's options


# ---------------------------------------------------------------------------------- the walk


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("options")
    root = d / "data"
    (root / "good").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "good" / "a.png")
    (d / "file.txt").write_text("x")
    (d / "official.pth").write_bytes(b"x")
    return {"dir": d, "file": d / "file.txt", "missing": d / "missing", "root": root, "image": root / "good" / "a.png",
            "official": d / "official.pth"}


def _base(command: str, p: dict[str, Path]) -> dict[str, list[str]]:
    """A valid command line, by dest (positionals in order)."""
    return {
        "predict": {"images": [str(p["image"])]},
        "eval": {"dataset": ["--dataset=folder"], "root": [f"--root={p['root']}"], "normal_dir": ["--normal-dir=good"]},
        "train": {"dataset": ["--dataset=folder"], "root": [f"--root={p['root']}"], "normal_dir": ["--normal-dir=good"],
                  "out": [f"--out={p['dir'] / 'train_out'}"]},
        "convert": {"source": ["--from=anomalyclip"], "input": [str(p["official"])], "output": [str(p["dir"] / "o.safetensors")]},
        "calibrate": {"images": [str(p["image"])], "output": [f"--out={p['dir'] / 'c.safetensors'}"]},
        "export": {"out": [f"--out={p['dir'] / 'm.onnx'}"]},
    }.get(command, {})


@pytest.fixture()
def no_command_runs(monkeypatch):
    """Replace every subcommand: a case that parses must fail the test, never build a model."""
    def ran(args):
        raise AssertionError(f"the command line parsed and '{args.command}' ran: {vars(args)}")

    for name in _COMMANDS:
        if name and name != "methods":  # clipad.cli.<name>.cmd_<name>, bound when main builds the parser
            monkeypatch.setattr(f"clipad.cli.{name}.cmd_{name}", ran)
    monkeypatch.setattr(cli, "cmd_methods", ran)


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process -> (exit code, stdout, stderr); SystemExit counts as its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def _argv(command: str, action: argparse.Action, text: str, extra: list[str], p: dict[str, Path]) -> list[str]:
    base = _base(command, p)
    if action.option_strings:
        base[action.dest] = [f"{action.option_strings[0]}={text}"]
    else:
        base[action.dest] = [text]
    if command == "":
        return [text]
    positionals = [a.dest for a in _COMMANDS[command]._actions if not a.option_strings]
    args = [x for dest in positionals if dest in base for x in base[dest]]
    args += [x for dest, v in base.items() if dest not in positionals for x in v]
    return [command, *args, *extra]


@pytest.mark.parametrize("command, dest", _OPTIONS, ids=[f"{c or 'clipad'}-{d}" for c, d in _OPTIONS])
def test_invalid_values_are_one_line_and_exit_2(command, dest, paths, no_command_runs):
    action = next(a for a in _value_actions(_COMMANDS[command]) if a.dest == dest)
    names = action.option_strings or [action.metavar or action.dest]
    if command == "":
        names = ["COMMAND"]
    cases = INVALID[dest] + INVALID.get(f"{command}.{dest}", [])
    for case in cases:
        text, extra = case if isinstance(case, tuple) else (case, [])
        text = text.format(**{k: str(v) for k, v in paths.items()})
        argv = _argv(command, action, text, extra, paths)
        code, out, err = _run(argv)
        lines = err.splitlines()
        assert code == 2, f"{argv}: exit {code}; stderr: {err!r}"
        assert "Traceback" not in err, argv
        assert len(lines) == 1 and lines[0].startswith("clipad: "), f"{argv}: {err!r}"
        assert any(n in lines[0] for n in names), f"{argv}: the line does not name {names}: {lines[0]!r}"
        if command:
            assert lines[0].startswith(f"clipad: {command}: "), lines[0]
        assert out == "", argv


def test_the_messages_say_what_fits(paths, no_command_runs):
    """Spot checks of the wording (the walk checks the form)."""
    img = str(paths["image"])
    cases = [
        (["predict", img, "--batch-size", "-3"], "clipad: predict: argument --batch-size: must be a positive integer; got -3"),
        (["predict", img, "--batch-size", "0"], "must be a positive integer; got 0"),
        (["predict", img, "--set", "temperature=nan"], "option temperature must be a finite number"),
        (["predict", img, "--set", "scales=x"], "option scales must be a list of integers"),
        (["predict", img, "--vmin", "1", "--vmax", "0"], "--vmin must be below --vmax"),
        (["predict", img, "--out", str(paths["file"])], "is a file; give a directory"),
        (["serve", "--port", "70000"], "must be a TCP port from 0 to 65535; got 70000"),
        (["serve", "--max-wait-ms", "-5"], "must be a finite number >= 0; got -5"),
        (["serve", "--max-request-pixels", "300"], "is over --max-inflight-pixels"),
        (["train", "--dataset", "folder", "--root", str(paths["root"]), "--normal-dir", "good", "--out",
          str(paths["dir"] / "t"), "--lr", "nan"], "argument --lr: must be a finite number > 0; got nan"),
        (["train", "--dataset", "folder", "--root", str(paths["root"]), "--normal-dir", "good", "--out",
          str(paths["dir"] / "t"), "--epochs", "0"], "argument --epochs: must be a positive integer; got 0"),
        (["train", "--dataset", "folder", "--root", str(paths["root"]), "--normal-dir", "good", "--out",
          str(paths["dir"] / "t"), "--method", "winclip"], "method 'winclip' has nothing to train"),
        (["predict", img, "--device", "tpu"], "must be cpu, cuda, cuda:N or mps; got tpu"),
        (["eval", "--dataset", "mvtec", "--root", str(paths["root"]), "--normal-dir", "good"],
         "argument --normal-dir: only for --dataset folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((["predict", img, "--device", "cuda"], "no CUDA device is visible (got cuda); use --device cpu"))
    for argv, expected in cases:
        code, _, err = _run(argv)
        assert code == 2 and expected in err and len(err.splitlines()) == 1, (argv, err)


def test_reference_before_the_images_says_what_happened(paths, no_command_runs):
    code, _, err = _run(["predict", "--reference", str(paths["root"]), str(paths["image"])])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--reference took every path after it" in err and "end its list with --" in err


def test_reference_list_ends_at_double_dash_and_repeats():
    parse = build_parser(["predict"]).parse_args
    args = parse(["predict", "--reference", ".", "--", "q.png"])
    assert args.images == ["q.png"] and args.reference == ["."]
    args = parse(["predict", "q.png", "--reference", ".", "--reference", "."])
    assert args.reference == [".", "."]


def test_defaults_filled_after_parsing():
    args = build_parser(["eval"]).parse_args(["eval", "--dataset", "mvtec", "--root", "."])
    assert args.method == ["winclip"] and args.init_seed == 0
    args = build_parser(["eval"]).parse_args(["eval", "--dataset", "mvtec", "--root", ".", "--method", "winclip",
                                              "--method", "anoclip"])
    assert args.method == ["winclip", "anoclip"]
    args = build_parser(["train"]).parse_args(["train", "--dataset", "mvtec", "--root", ".", "--out", "o"])
    assert args.method == "anomalyclip"


# ---------------------------------------------------------------------------------- --detector with a model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny detector (random weights, seed 0) and another tiny backbone's weights (seed 1)."""
    from clipad.backbones import create_backbone

    d = tmp_path_factory.mktemp("saved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClipadWarning)
        det = clipad.create_detector("winclip", backbone="tiny", pretrained=None, device="cpu", image_size=64)
        torch.save(create_backbone("tiny", None, seed=1).clip.state_dict(), d / "other.pt")
    det.save(d / "det.safetensors")
    (d / "q").mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / "q" / f"{i}.png")
    return {"dir": d, "det": d / "det.safetensors", "weights": d / "other.pt", "q": d / "q"}


@pytest.mark.parametrize("flag, value", [
    ("--method", "anoclip"), ("--backbone", "ViT-B-16"), ("--image-size", "96"), ("--init-seed", "1"),
    ("--set", "scales=[2]"), ("--set", "no_such_option=1"), ("--checkpoint", "{det}"), ("--domain", "object"),
])
def test_detector_refuses_values_other_than_its_own(saved, tmp_path, flag, value):
    """What a saved detector records cannot be changed from the command line: a different value
    is an error naming the option (never silently ignored)."""
    argv = ["predict", str(saved["q"]), "--detector", str(saved["det"]), "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "o"), flag, value.format(det=saved["det"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClipadWarning)
        code, _, err = _run(argv)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"clipad: {flag}") or f"argument {flag}" in err, err
    assert not (tmp_path / "o" / "scores.csv").exists()


def test_detector_accepts_the_values_it_records(saved, tmp_path):
    """Scripts that always pass the model options keep working with --detector."""
    out = tmp_path / "o"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClipadWarning)
        code, _, err = _run(["predict", str(saved["q"]), "--detector", str(saved["det"]), "--device", "cpu", "--quiet",
                             "--out", str(out), "--method", "winclip", "--backbone", "tiny", "--image-size", "64",
                             "--init-seed", "0", "--set", "scales=[2,3]"])
    assert code == 0, err
    np.testing.assert_allclose(_scores(out), _loaded_scores(saved), rtol=0, atol=1e-5)


def test_eval_takes_one_method_with_a_detector(paths, no_command_runs):
    code, _, err = _run(["eval", "--dataset=folder", f"--root={paths['root']}", "--normal-dir=good",
                         f"--detector={paths['file']}", "--method", "winclip", "anoclip"])
    assert code == 2 and "argument --method: one method with --detector" in err


def _scores(out: Path) -> list[float]:
    lines = (out / "scores.csv").read_text().splitlines()[1:]
    return [float(line.split(",")[1]) for line in lines]


def _loaded_scores(saved, **kwargs) -> list[float]:
    from clipad.data.images import load_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClipadWarning)
        det = clipad.load_detector(saved["det"], device="cpu", **kwargs)
    return det.predict([load_image(saved["q"] / f"{i}.png") for i in range(2)]).image_scores.tolist()


@pytest.mark.parametrize("extra, kwargs", [
    ([], {}),
    (["--pretrained", "{weights}"], {"pretrained": "{weights}"}),
    (["--quick-gelu", "on"], {"quick_gelu": True}),
], ids=["as-saved", "pretrained", "quick-gelu"])
def test_detector_honours_pretrained_and_quick_gelu(saved, tmp_path, extra, kwargs):
    extra = [x.format(weights=saved["weights"]) for x in extra]
    kwargs = {k: v.format(weights=saved["weights"]) if isinstance(v, str) else v for k, v in kwargs.items()}
    out = tmp_path / "o"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClipadWarning)
        code, _, err = _run(["predict", str(saved["q"]), "--detector", str(saved["det"]), "--device", "cpu",
                             "--quiet", "--out", str(out), *extra])
    assert code == 0, err
    cli_scores = _scores(out)
    np.testing.assert_allclose(cli_scores, _loaded_scores(saved, **kwargs), rtol=0, atol=1e-5)
    if extra:  # the option changed the model: not the saved one's scores
        assert not np.allclose(cli_scores, _loaded_scores(saved), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------- --shots over the pool


def test_shots_over_the_pool_warn_how_many_were_used(tmp_path):
    from clipad.data import create_dataset, few_shot_split

    root = tmp_path / "mv" / "widget"
    for split, kind, n in [("train", "good", 2), ("test", "good", 2)]:
        (root / split / kind).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(root / split / kind / f"{i}.png")
    dataset = create_dataset("mvtec", tmp_path / "mv")
    with pytest.warns(ClipadWarning, match=r"5 shots asked but it has only 2 normal training image\(s\); 2 distinct"):
        refs, _ = few_shot_split(dataset, "widget", 5, seed=10)
    assert len(refs) == 5 and len(set(refs)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClipadWarning)
        few_shot_split(dataset, "widget", 2, seed=10)  # within the pool: no warning
