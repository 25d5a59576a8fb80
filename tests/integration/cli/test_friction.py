"""Friction at the edges: messages that tell a command-line user what to type, and a fair bench.

- Offline weights: the command line is told ``--pretrained /path``, Python callers
  ``pretrained='/path'`` (one :class:`~clipad.errors.WeightsNotFound` with both wordings).
- Image size limit: ``--max-image-pixels MP`` of predict and eval, ``max_pixels=`` of the
  readers; Pillow's limit stays the default; the limit reaches DataLoader worker processes.
- ``clipad bench``: the bare forward is warmed and timed exactly as the method (fake clock and
  call counts; nothing is timed for real).
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

import clipad
from clipad import WeightsNotFound
from clipad.backbones import weights as weights_mod
from clipad.backbones.clip import Backbone
from clipad.cli import main
from clipad.data import Sample, SampleLoader, collate_samples
from clipad.data.images import load_image, load_mask
from clipad.errors import ImageReadError
from clipad.eval import speed
from clipad.methods.base import Detector

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--backbone", "tiny", "--pretrained", "none", "--image-size", "64", "--device", "cpu", "--quiet"]
BIG_SIDE, SMALL_SIDE = 200, 40  # 0.04 MP and 0.0016 MP: one over --max-image-pixels 0.01, one under


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _noise(path: Path, side: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------- offline weights


@pytest.fixture
def offline(tmp_path: Path, monkeypatch):
    """No cached weights anywhere, HF_HUB_OFFLINE=1, and any connection or download fails the test
    (as tests/unit/backbones/test_weights.py's offline tests)."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "home"
    (home / ".cache" / "clip").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("offline: no connection may be opened")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(weights_mod, "_download_tag", no_network)


BACKBONE, TAG = "ViT-B-16-plus-240", "laion400m_e31"


def test_offline_weights_message_on_the_command_line_names_flags(offline, tmp_path: Path):
    image = _noise(tmp_path / "x.png", SMALL_SIDE)
    start = time.monotonic()
    code, _, err = _run(["predict", str(image), "--method", "winclip", "--backbone", BACKBONE, "--pretrained", TAG,
                         "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")])
    assert time.monotonic() - start < 10.0  # fails at once, as offline resolution does
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("clipad: ")]
    assert len(lines) == 1, err
    line = lines[0]
    assert BACKBONE in line and TAG in line and "offline mode" in line
    assert f"--pretrained /path/to/{BACKBONE}.safetensors" in line and "--pretrained none" in line
    assert "pretrained=" not in line  # Python syntax, which a shell user would type as is


def test_offline_weights_message_in_python_keeps_python_form(offline):
    with pytest.raises(WeightsNotFound) as info:
        clipad.create_detector("winclip", backbone=BACKBONE, pretrained=TAG, device="cpu")
    exc = info.value
    message = str(exc)
    assert f"pretrained='/path/to/{BACKBONE}.safetensors'" in message and "pretrained=None" in message
    assert "--pretrained" not in message
    # the structured fields the command line words its own message from
    assert (exc.backbone, exc.tag) == (BACKBONE, TAG) and "offline mode" in exc.reason
    assert exc.cli_message.replace("--pretrained /path/to/", "pretrained='/path/to/") != message  # a real rewording
    assert "--pretrained none" in exc.cli_message


def test_file_errors_have_one_wording(tmp_path: Path):
    """Errors about a file given as --pretrained / pretrained= read the same everywhere."""
    with pytest.raises(WeightsNotFound, match="directory") as info:
        clipad.create_detector("winclip", backbone="tiny", pretrained=str(tmp_path), device="cpu")
    assert info.value.cli_message is None and "pretrained=" not in str(info.value)


# --------------------------------------------------------------------------- image size limit


def test_predict_max_image_pixels_skips_the_large_image_and_goes_on(tmp_path: Path):
    small = _noise(tmp_path / "in" / "small.png", SMALL_SIDE)
    _noise(tmp_path / "in" / "big.png", BIG_SIDE, seed=1)
    out = tmp_path / "out"
    code, stdout, err = _run(["predict", str(tmp_path / "in"), "--method", "winclip", *TINY,
                              "--max-image-pixels", "0.01", "--out", str(out)])
    assert code == 1  # one input failed
    big_lines = [line for line in err.splitlines() if "big.png" in line]
    assert len(big_lines) == 1, err
    assert "--max-image-pixels" in big_lines[0] and f"{BIG_SIDE}x{BIG_SIDE}" in big_lines[0]
    assert "10,000 pixels" in big_lines[0]
    rows = (out / "scores.csv").read_text().splitlines()[1:]
    assert len(rows) == 1 and rows[0].startswith(str(small))  # the run went on with the others
    assert "1 image(s) scored" in stdout


def test_max_image_pixels_must_be_positive(tmp_path: Path):
    image = _noise(tmp_path / "x.png", SMALL_SIDE)
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(["predict", str(image), *TINY, "--max-image-pixels", "0"])
        except SystemExit as exc:  # argparse's own exit, where the parser does not return the code
            code = exc.code
    assert code == 2 and "--max-image-pixels" in err.getvalue()


def test_default_limit_is_pillows(tmp_path: Path, monkeypatch):
    path = _noise(tmp_path / "p.png", 100)  # 10,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above 2,000
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    message = str(info.value)
    assert "too large" in message and "MAX_IMAGE_PIXELS" in message
    assert "--max-image-pixels" in message and "max_pixels=" in message  # both ways to raise it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 10,000 <= 2 x 5,000: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(path).size == (100, 100)


def test_explicit_limit_replaces_pillows_for_that_read(tmp_path: Path, monkeypatch):
    path = _noise(tmp_path / "p.png", 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does Pillow warn: its check is off for this read
        assert load_image(path, max_pixels=10_000).size == (100, 100)  # above Pillow's limit
        assert load_mask(path, threshold=0.5, max_pixels=10_000).shape == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000  # and back afterwards
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's check off: clipad's still applies
    with pytest.raises(ImageReadError, match="over the limit of 9,999 pixels") as info:
        load_image(path, max_pixels=9_999)
    assert "100x100" in str(info.value) and "p.png" in str(info.value)
    with pytest.raises(ImageReadError, match="over the limit"):
        load_mask(path, max_pixels=9_999)
    assert Image.MAX_IMAGE_PIXELS is None


def test_limit_reaches_spawned_worker_processes(tmp_path: Path):
    """A spawned worker starts from a fresh interpreter (no module state of the parent): the limit
    travels with the loader."""
    small = _noise(tmp_path / "small.png", SMALL_SIDE)
    big = _noise(tmp_path / "big.png", BIG_SIDE)
    samples = [Sample(image_path=small, label=0, class_name="c"), Sample(image_path=big, label=0, class_name="c")]
    ds = SampleLoader(samples, load_masks=False, max_pixels=10_000)
    assert pickle.loads(pickle.dumps(ds)).max_pixels == 10_000
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_samples, multiprocessing_context="spawn")
    (batch,) = list(loader)
    assert [s.image_path for s in batch.samples] == [small]
    (failure,) = batch.failures
    assert failure.path == str(big) and "--max-image-pixels" in str(failure)


def test_eval_max_image_pixels_in_workers(tmp_path: Path):
    root = tmp_path / "line"
    for i in range(3):
        _noise(root / "good" / f"g{i}.png", SMALL_SIDE, seed=i)
    _noise(root / "bad" / "b0.png", SMALL_SIDE, seed=7)
    _noise(root / "bad" / "huge.png", BIG_SIDE, seed=8)
    out = tmp_path / "out"
    code, _, err = _run(["eval", "--dataset", "folder", "--root", str(root), "--normal-dir", "good",
                         "--abnormal-dir", "bad", "--method", "winclip", *TINY, "--workers", "1",
                         "--max-image-pixels", "0.01", "--out", str(out)])
    assert code == 1
    lines = [line for line in err.splitlines() if "huge.png" in line]
    assert len(lines) == 1 and "--max-image-pixels" in lines[0], err
    data = json.loads((out / "metrics.json").read_text())
    assert data["classes"]["line"]["n_images"] == 4 and len(data["failures"]) == 1


# --------------------------------------------------------------------------- bench


def test_measure_interleaved_warms_and_times_each_alike():
    now = [0.0]
    log: list[str] = []

    def fake(name: str, seconds: float):
        def fn() -> None:
            log.append(name)
            now[0] += seconds
        return fn

    results = speed.measure_interleaved(
        [fake("method", 3.0), fake("bare", 1.0)], "cpu", repeats=4, warmup=2,
        clock=lambda: now[0], cpu_clock=lambda: 0.0,
    )
    assert log[:4] == ["method", "bare"] * 2  # warm-up: the same calls, in turns
    assert log[4:] == ["method", "bare", "bare", "method", "method", "bare", "bare", "method"]
    assert log.count("method") == log.count("bare") == 6
    assert results == [(3.0, 0.0), (1.0, 0.0)]  # each timed on its own calls only


def test_bench_method_warms_and_times_the_bare_forward_with_the_method(monkeypatch):
    """What bench_method really calls: the detector's scoring and, outside it, the bare tower."""
    log: list[str] = []
    inside = [False]
    score, encode = Detector.score_normalized, Backbone.encode_image

    def scored(self, *args, **kwargs):
        log.append("method")
        inside[0] = True
        try:
            return score(self, *args, **kwargs)
        finally:
            inside[0] = False

    def encoded(self, *args, **kwargs):
        if not inside[0]:
            log.append("bare")
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(Detector, "score_normalized", scored)
    monkeypatch.setattr(Backbone, "encode_image", encoded)
    (row,) = speed.bench_method(
        "winclip", backbone="tiny", image_size=64, batches=[1], shots=0, device="cpu", dtype="fp32",
        warmup=2, repeats=3, options={},
    )
    assert log.count("method") == log.count("bare") == 5
    assert log[:4] == ["method", "bare"] * 2  # the bare forward is warmed like the method, not cold
    assert log[4:] == ["method", "bare", "bare", "method", "method", "bare"]
    assert row["overhead_vs_backbone"] == pytest.approx(row["ms_per_image"] / row["backbone_ms_per_image"])
