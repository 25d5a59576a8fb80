"""End-to-end tests of ``clipad predict`` on the tiny random backbone.

The CLI runs in-process through ``clipad.cli.main`` (fast, output captured) and, to prove the
installed entry point works, a couple of times as a separate process. Every input file is made
here; the bad ones cover each way an image file can be odd (still valid) or broken (one stderr
line each, the rest of the run goes on, exit code 1 with a count).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipad
from clipad.cli import build_parser, main
from clipad.data.images import load_image

SIZE = "64"  # model input size: a 4x4 patch grid keeps every run fast on CPU
FAST = ["--backbone", "tiny", "--pretrained", "none", "--image-size", SIZE, "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``clipad.cli.main(argv)`` in-process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return _rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _api_scores(paths: list[Path], reference: list[Path] | None = None) -> torch.Tensor:
    """The same images scored through the Python API: what the CLI must write."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        det = clipad.create_detector("winclip", backbone="tiny", pretrained=None, device="cpu", image_size=int(SIZE))
    if reference:
        det.set_reference([load_image(p) for p in reference])
    return det.predict([load_image(p) for p in paths]).image_scores


# --------------------------------------------------------------------------- input files


def _write_valid(d: Path) -> dict[str, tuple[int, int]]:
    """Odd-but-valid images -> {file name: (H, W) as displayed}."""
    d.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, int]] = {}
    Image.fromarray(_noise(48, 64, 1)).save(d / "rgb.png")
    sizes["rgb.png"] = (48, 64)
    Image.fromarray(_noise(29, 37, 2)[..., 0]).save(d / "gray.png")  # mode L
    sizes["gray.png"] = (29, 37)
    rgba = np.concatenate([_noise(20, 30, 3), _rng(4).integers(0, 256, (20, 30, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(d / "rgba.png")
    sizes["rgba.png"] = (20, 30)
    Image.fromarray(_noise(25, 26, 5)).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    sizes["palette.png"] = (25, 26)
    Image.fromarray(_rng(6).integers(0, 65536, (32, 40), dtype=np.uint16)).save(d / "gray16.png")
    sizes["gray16.png"] = (32, 40)
    Image.fromarray(_noise(28, 36, 7)).convert("CMYK").save(d / "cmyk.jpg")
    sizes["cmyk.jpg"] = (28, 36)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_noise(30, 40, 8)).save(d / "exif_rotated.jpg", exif=exif.tobytes())
    sizes["exif_rotated.jpg"] = (40, 30)  # stored 40 wide x 30 high, displayed 30 x 40
    Image.fromarray(_noise(10, 10, 9)).save(d / "small.png")
    sizes["small.png"] = (10, 10)
    return sizes


def _write_invalid(d: Path) -> dict[str, str]:
    """Broken files -> {file name: a word its error line must contain}."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "zero.png").write_bytes(b"")
    png = io.BytesIO()
    Image.fromarray(_noise(64, 64, 10)).save(png, format="PNG")
    (d / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    jpg = io.BytesIO()
    Image.fromarray(_noise(64, 64, 11)).save(jpg, format="JPEG", quality=90)
    (d / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) * 3 // 5])
    (d / "corrupt.png").write_bytes(_rng(12).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    (d / "text.jpg").write_text("this is a text file, not a JPEG\n")
    return {
        "zero.png": "empty",
        "truncated.png": "truncated",
        "truncated.jpg": "truncated",
        "corrupt.png": "not an image",
        "text.jpg": "not an image",
    }


BIG = "big.png"


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One predict run over a folder holding every odd-but-valid and every broken kind of file."""
    root = tmp_path_factory.mktemp("mixed")
    inputs = root / "inputs"
    sizes = _write_valid(inputs)
    reasons = _write_invalid(inputs)
    # 8000x8000: a solid colour compresses to a small PNG; it must still be decoded and scored
    Image.new("RGB", (8000, 8000), (120, 140, 160)).save(inputs / BIG, compress_level=1)
    sizes[BIG] = (8000, 8000)
    out = root / "out"
    code, stdout, stderr = _run(["predict", str(inputs), *FAST, "--out", str(out), "--save-maps"])
    return {"inputs": inputs, "out": out, "sizes": sizes, "reasons": reasons,
            "code": code, "stdout": stdout, "stderr": stderr}


@pytest.fixture(scope="module")
def good_dirs(tmp_path_factory):
    """Three query images of different sizes and two known-good references."""
    root = tmp_path_factory.mktemp("good")
    (root / "query").mkdir()
    for i in range(3):
        Image.fromarray(_noise(40 + 8 * i, 56, 20 + i)).save(root / "query" / f"q{i}.png")
    (root / "ref").mkdir()
    for i in range(2):
        Image.fromarray(_noise(48, 48, 30 + i)).save(root / "ref" / f"r{i}.png")
    return root / "query", root / "ref"


# --------------------------------------------------------------------------- help


def _predict_parser():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, subparsers.choices["predict"]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ("predict", "eval", "methods", "--version", "--help"):
        assert word in text


def test_predict_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    documented = ["--method", "--backbone", "--pretrained", "--reference", "--class-name", "--out",
                  "--save-maps", "--image-size", "--device", "--batch-size", "--detector", "--quiet"]
    _, predict = _predict_parser()
    registered = [s for a in predict._actions for s in a.option_strings]
    assert set(documented) <= set(registered)
    for option in registered:  # none hidden with help=SUPPRESS
        assert option in text, option


def test_methods_command_lists_registry():
    code, stdout, _ = _run(["methods"])
    assert code == 0
    assert stdout.split() == clipad.list_methods()


# --------------------------------------------------------------------------- the mixed run


def test_mixed_run_exit_code_and_summary(mixed_run):
    assert mixed_run["code"] == 1
    n_bad = len(mixed_run["reasons"])
    last = mixed_run["stderr"].strip().splitlines()[-1]
    assert re.search(rf"\b{n_bad}\b.*failed", last), last
    n_good = len(mixed_run["sizes"])
    assert re.search(rf"\b{n_good}\b image", mixed_run["stdout"])


def test_mixed_run_one_line_per_bad_file(mixed_run):
    lines = mixed_run["stderr"].splitlines()
    for name, reason in mixed_run["reasons"].items():
        path = str(mixed_run["inputs"] / name)
        hits = [line for line in lines if path in line]
        assert len(hits) == 1, (name, hits)
        assert reason in hits[0].lower(), hits[0]
        assert "skipped" in hits[0]
    for name in mixed_run["sizes"]:
        assert not any(str(mixed_run["inputs"] / name) in line for line in lines), name


def test_mixed_run_scores_csv(mixed_run):
    header, rows = _read_csv(mixed_run["out"] / "scores.csv")
    assert header == ["path", "score", "heatmap"]  # path, score first: older readers keep working
    expected = {str(mixed_run["inputs"] / n) for n in mixed_run["sizes"]}
    assert len(rows) == len(expected)
    assert {r[0] for r in rows} == expected
    for path, score, heatmap in rows:
        assert np.isfinite(float(score))
        assert heatmap == f"heatmaps/{Path(path).stem}.png"
        assert (mixed_run["out"] / heatmap).is_file()


def test_mixed_run_scores_equal_the_python_api(mixed_run):
    _, rows = _read_csv(mixed_run["out"] / "scores.csv")
    rows = [r for r in rows if not r[0].endswith(BIG)]  # scored above; not worth a second pass here
    api = _api_scores([Path(r[0]) for r in rows])
    cli = torch.tensor([float(r[1]) for r in rows])
    torch.testing.assert_close(cli, api, rtol=0, atol=1e-5)


def test_mixed_run_heatmaps_and_maps(mixed_run):
    out, sizes = mixed_run["out"], mixed_run["sizes"]
    stems = {Path(n).stem for n in sizes}
    assert {p.name for p in (out / "heatmaps").iterdir()} == {f"{s}.png" for s in stems}
    assert {p.name for p in (out / "maps").iterdir()} == {f"{s}.npy" for s in stems}
    for name, size in sizes.items():
        stem = Path(name).stem
        with Image.open(out / "heatmaps" / f"{stem}.png") as heatmap:
            assert heatmap.format == "PNG" and heatmap.width > 0
        amap = np.load(out / "maps" / f"{stem}.npy", mmap_mode="r")
        assert amap.shape == size, name
        assert amap.dtype == np.float32
        if name != BIG:
            assert np.isfinite(amap).all()
    big = np.load(out / "maps" / f"{Path(BIG).stem}.npy", mmap_mode="r")
    assert np.isfinite(big[::97, ::89]).all()


# --------------------------------------------------------------------------- few-shot, names, paths


def test_zero_shot_run_succeeds(good_dirs, tmp_path: Path):
    query, _ = good_dirs
    code, stdout, stderr = _run(["predict", str(query), *FAST, "--out", str(tmp_path / "o")])
    assert code == 0, stderr
    _, rows = _read_csv(tmp_path / "o" / "scores.csv")
    assert [Path(r[0]).name for r in rows] == ["q0.png", "q1.png", "q2.png"]
    assert not (tmp_path / "o" / "maps").exists()  # maps only with --save-maps
    assert "random weights" in stderr  # the one note, since pretrained is none


def test_reference_dir_few_shot(good_dirs, tmp_path: Path):
    query, ref = good_dirs
    code, _, stderr = _run(["predict", str(query), *FAST, "--reference", str(ref), "--out", str(tmp_path / "o")])
    assert code == 0, stderr
    _, rows = _read_csv(tmp_path / "o" / "scores.csv")
    paths = [Path(r[0]) for r in rows]
    cli = torch.tensor([float(r[1]) for r in rows])
    refs = sorted(ref.iterdir())
    torch.testing.assert_close(cli, _api_scores(paths, reference=refs), rtol=0, atol=1e-5)
    assert not torch.allclose(cli, _api_scores(paths), rtol=0, atol=1e-4)  # the references were used


def test_bad_reference_image_is_reported_and_skipped(good_dirs, tmp_path: Path):
    query, ref = good_dirs
    refs = tmp_path / "refs"
    shutil.copytree(ref, refs)
    (refs / "broken.png").write_bytes(b"")
    code, _, stderr = _run(["predict", str(query), *FAST, "--reference", str(refs), "--out", str(tmp_path / "o")])
    assert code == 1
    hits = [line for line in stderr.splitlines() if str(refs / "broken.png") in line]
    assert len(hits) == 1 and "empty" in hits[0]
    _, rows = _read_csv(tmp_path / "o" / "scores.csv")
    assert len(rows) == 3


@pytest.mark.parametrize(
    "extra, listed",
    [
        pytest.param(["--method", "no-such-method", "--backbone", "tiny", "--pretrained", "none"], clipad.list_methods(),
                     id="method"),
        pytest.param(["--backbone", "no-such-backbone", "--pretrained", "none"], ["tiny", "ViT-B-16"],
                     id="backbone"),
        pytest.param(["--backbone", "no-such-backbone"], ["tiny", "ViT-B-16"], id="backbone-no-pretrained"),
    ],
)
def test_unknown_names_exit_2_and_list_valid_names(good_dirs, tmp_path: Path, extra, listed):
    query, _ = good_dirs
    code, _, stderr = _run(["predict", str(query), "--quiet", *extra, "--out", str(tmp_path / "o")])
    assert code == 2
    bad = next(a for a in extra if a.startswith("no-such"))
    hits = [line for line in stderr.splitlines() if bad in line]
    assert len(hits) == 1, stderr
    for name in listed:
        assert name in hits[0]
    assert not (tmp_path / "o" / "scores.csv").exists()


def test_nonexistent_input_only(tmp_path: Path):
    missing = tmp_path / "nope"
    code, _, stderr = _run(["predict", str(missing), *FAST, "--out", str(tmp_path / "o")])
    assert code == 1
    assert len([line for line in stderr.splitlines() if str(missing) in line]) == 1
    assert not (tmp_path / "o" / "scores.csv").exists()


def test_nonexistent_input_beside_valid_ones(good_dirs, tmp_path: Path):
    query, _ = good_dirs
    missing = tmp_path / "nope.png"
    code, _, stderr = _run(["predict", str(missing), str(query), *FAST, "--out", str(tmp_path / "o")])
    assert code == 1
    hits = [line for line in stderr.splitlines() if str(missing) in line]
    assert len(hits) == 1 and "does not exist" in hits[0]
    assert re.search(r"\b1\b.*failed", stderr.strip().splitlines()[-1])
    _, rows = _read_csv(tmp_path / "o" / "scores.csv")
    assert len(rows) == 3


def test_explicit_bad_file_and_same_stems(tmp_path: Path):
    """Files named explicitly are kept whatever their suffix; equal stems get distinct outputs."""
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_noise(32, 32, 40)).save(d / "part.png")
    Image.fromarray(_noise(32, 32, 41)).save(d / "part.jpg")
    (d / "notes.txt").write_text("hello")
    code, _, stderr = _run(["predict", str(d / "part.png"), str(d / "part.jpg"), str(d / "notes.txt"),
                            *FAST, "--out", str(tmp_path / "o"), "--save-maps"])
    assert code == 1
    assert len([line for line in stderr.splitlines() if str(d / "notes.txt") in line]) == 1
    assert len(list((tmp_path / "o" / "heatmaps").iterdir())) == 2
    assert len(list((tmp_path / "o" / "maps").iterdir())) == 2


# --------------------------------------------------------------------------- the installed entry point


def _entry_point() -> list[str]:
    script = Path(sys.executable).parent / "clipad"
    found = str(script) if script.is_file() else shutil.which("clipad")
    return [found] if found else [sys.executable, "-m", "clipad.cli"]


def _subprocess(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(_entry_point() + args, capture_output=True, text=True, env=env, timeout=300, **kwargs)


def test_console_script_help():
    proc = _subprocess(["--help"])
    assert proc.returncode == 0, proc.stderr
    assert "predict" in proc.stdout and "usage: clipad" in proc.stdout


def test_console_script_predict(good_dirs, tmp_path: Path):
    query, _ = good_dirs
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    proc = _subprocess(["predict", str(query), str(bad), *FAST, "--out", str(tmp_path / "o"), "--save-maps"])
    assert proc.returncode == 1, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if str(bad) in line]) == 1
    _, rows = _read_csv(tmp_path / "o" / "scores.csv")
    assert len(rows) == 3
    assert len(list((tmp_path / "o" / "maps").glob("*.npy"))) == 3


def test_module_entry_point_version():
    proc = subprocess.run([sys.executable, "-m", "clipad.cli", "--version"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0
    assert clipad.__version__ in proc.stdout
