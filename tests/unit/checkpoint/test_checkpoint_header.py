"""Checkpoint files that are not what clipad wrote: hand-edited or damaged headers, non-finite
weights, official ``.pth`` files given as clipad checkpoints. Each is one bounded
:class:`~clipad.errors.CheckpointError` (``clipad: ...`` and exit 2 on the command line), found
before anything is built. Also: ``quick_gelu`` survives save/load, and the files clipad writes
get the usual umask-respecting mode."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import clipad
from _helpers import random_images, tiny_detector, write_folder_dataset
from clipad.checkpoint import MAX_ERROR, read_checkpoint
from clipad.cli import main
from clipad.errors import MAX_MESSAGE, CheckpointError, ClipadError, InvalidValueError, shorten
from clipad.methods.anomalyclip.model import AnomalyCLIP
from clipad.train import CHECKPOINT_DIR, LOG_CSV, LOG_JSON, epoch_paths

SIZE = 64

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _load(path: Path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return clipad.load_detector(path, device="cpu")


def _read_raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A real saved detector with learned tensors and two reference sets (AdaptCLIP on tiny)."""
    det = tiny_detector("adaptclip", image_size=SIZE, precision="fp32", taps=(1.0,), n_ctx=2, pq_mid_dim=4,
                        va_reduction=8, sigma=0.0)
    det.set_reference(random_images(1, SIZE, seed=1))
    det.set_reference(random_images(1, SIZE, seed=2), class_name="bottle")
    return det.save(tmp_path_factory.mktemp("saved") / "adaptclip.safetensors")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(path)
    return path


def _tampered(saved: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``saved`` whose header (and tensors) ``edit(meta, tensors)`` changed in place."""
    meta, tensors = _read_raw(saved)
    edit(meta, tensors)
    out = tmp_path / "tampered.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


def _set(key: str, value: str):
    def edit(meta, tensors):
        meta[key] = value
    return edit


def _drop(key: str):
    def edit(meta, tensors):
        del meta[key]
    return edit


def _option(name: str, value):
    def edit(meta, tensors):
        options = json.loads(meta["options"])
        options[name] = value
        meta["options"] = json.dumps(options)
    return edit


def _extra_reference(meta, tensors):
    tensors["reference.7.patches"] = torch.zeros(1, 2)


def _classes_cut(meta, tensors):
    meta["reference_classes"] = json.dumps([""])  # the file still holds reference.1.*


def _junk_tensor(meta, tensors):
    tensors["weights.w"] = torch.zeros(2)


# (id, edit, words the message must hold: the key and what is wrong)
TAMPERED = [
    ("no-image_size", _drop("image_size"), ["'image_size'", "missing"]),
    ("no-method", _drop("method"), ["'method'", "missing"]),
    ("no-backbone", _drop("backbone"), ["'backbone'", "missing"]),
    ("image_size-abc", _set("image_size", "abc"), ["'image_size'", "integer", "'abc'"]),
    ("image_size-huge", _set("image_size", "99999999"), ["'image_size'", "4096"]),
    ("options-not-json", _set("options", "{n_ctx: 2"), ["'options'", "not valid JSON"]),
    ("options-a-list", _set("options", "[1, 2]"), ["'options'", "JSON object", "list"]),
    ("reference-index-out-of-range", _extra_reference, ["reference.7.patches", "class 7"]),
    ("reference_classes-cut", _classes_cut, ["reference.1.", "lists 1"]),
    ("reference_classes-not-json", _set("reference_classes", "['']"), ["'reference_classes'", "not valid JSON"]),
    ("reference_classes-an-object", _set("reference_classes", "{}"), ["'reference_classes'", "JSON list"]),
    ("seed-abc", _set("seed", "abc"), ["'seed'", "integer"]),
    ("pretrained-not-json", _set("pretrained", "open ai"), ["'pretrained'", "not valid JSON"]),
    ("quick_gelu-not-bool", _set("quick_gelu", '"yes"'), ["'quick_gelu'", "true or false"]),
    ("unknown-method", _set("method", "nosuch"), ["method", "nosuch"]),
    ("unknown-backbone", _set("backbone", "ViT-Q-99"), ["backbone", "ViT-Q-99"]),
    ("method-1MB", _set("method", "m" * 1_000_000), ["'method'", "1000000 characters"]),
    ("unknown-option", _option("n_layers", 3), ["options", "n_layers"]),
    ("option-wrong-type", _option("n_ctx", "two"), ["options", "n_ctx", "integer"]),
    ("option-dict", _option("taps", {"a": 1}), ["options", "taps", "JSON object"]),
    ("option-huge-int", _option("pq_mid_dim", 10**30), ["options", "pq_mid_dim", "64 bits"]),
    ("option-image_size-differs", _option("image_size", 32), ["'image_size'", "options say 32"]),
    ("junk-tensor", _junk_tensor, ["weights.w", "learned."]),
    ("n_ctx-10000000", _option("n_ctx", 10_000_000), ["options", "n_ctx", "10000000", "75"]),
]


def _check_message(message: str, words: list[str]) -> None:
    assert len(message) <= MAX_ERROR, len(message)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)


@pytest.mark.parametrize("edit,words", [t[1:] for t in TAMPERED], ids=[t[0] for t in TAMPERED])
def test_tampered_header_is_one_bounded_checkpoint_error(saved, tmp_path, edit, words):
    path = _tampered(saved, tmp_path, edit)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        _load(path)
    assert time.perf_counter() - start < 1.0  # found before anything is built
    message = str(info.value)
    _check_message(message, words)
    assert str(path) in message and ("edited by hand" in message or "re-save" in message)
    assert isinstance(info.value, ValueError)  # `except ValueError` around load_detector still works


@pytest.mark.parametrize("edit,words", [t[1:] for t in TAMPERED[:9] + TAMPERED[-1:]],
                         ids=[t[0] for t in TAMPERED[:9] + TAMPERED[-1:]])
def test_tampered_header_on_the_command_line(saved, tmp_path, image, edit, words):
    path = _tampered(saved, tmp_path, edit)
    code, stdout, stderr = _run(["predict", str(image), "--detector", str(path), "--out", str(tmp_path / "o")])
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipad: "), stderr
    _check_message(lines[0][len("clipad: "):], words)


def test_untouched_file_loads(saved):
    det = _load(saved)
    assert det.name == "adaptclip" and sorted(det.references) == ["", "bottle"]


def test_header_length_is_checked_before_reading(tmp_path):
    """A length field larger than the file (or than the cap) is refused without reading it."""
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CheckpointError, match="not a .safetensors file") as info:
        read_checkpoint(path)
    assert len(str(info.value)) <= MAX_ERROR


@pytest.mark.parametrize("kind", ["zip", "pickle"])
def test_official_checkpoint_points_to_convert(tmp_path, kind):
    """An official .pth (torch.save: a zip; older: a bare pickle) is never unpickled."""
    path = tmp_path / "official.pth"
    torch.save({"prompt_learner.ctx": torch.zeros(2)}, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(CheckpointError, match="official checkpoint") as info:
        tiny_detector("anomalyclip", image_size=SIZE, checkpoint=str(path))
    message = str(info.value)
    assert "clipad convert --from anomalyclip" in message and len(message) <= MAX_ERROR
    with pytest.raises(CheckpointError, match="clipad convert --from METHOD"):
        _load(path)


def test_official_checkpoint_on_the_command_line(tmp_path, image):
    path = tmp_path / "official.pth"
    torch.save({"prompt_learner.ctx": torch.zeros(2)}, path)
    code, _, stderr = _run(["predict", str(image), "--method", "anomalyclip", "--backbone", "tiny", "--pretrained",
                            "none", "--checkpoint", str(path), "--image-size", str(SIZE), "--out", str(tmp_path / "o")])
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "clipad convert --from anomalyclip" in stderr


# --------------------------------------------------------------------------- non-finite weights


def test_nan_learned_weights_are_refused(saved, tmp_path, image):
    def poison(meta, tensors):
        name = next(k for k in sorted(tensors) if k.startswith("learned.") and tensors[k].is_floating_point())
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
    path = _tampered(saved, tmp_path, poison)
    with pytest.raises(CheckpointError, match="NaN or infinite") as info:
        _load(path)
    assert len(str(info.value)) <= MAX_ERROR
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        tiny_detector("adaptclip", image_size=SIZE, taps=(1.0,), n_ctx=2, pq_mid_dim=4, va_reduction=8,
                      checkpoint=str(path))
    code, _, stderr = _run(["predict", str(image), "--detector", str(path), "--out", str(tmp_path / "o")])
    assert code == 2 and "NaN or infinite" in stderr


def test_nan_weights_are_not_saved(tmp_path):
    det = tiny_detector("anomalyclip", image_size=SIZE, n_ctx=2, deep_length=2)
    with torch.no_grad():
        det.prompts.ctx[0, 0, 0] = float("inf")
    with pytest.raises(InvalidValueError, match="NaN or infinite"):
        det.save(tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_folder_dataset(root, n_normal=2, n_abnormal=2, size=32)
    return root


def _train_args(root: Path, out: Path) -> list[str]:
    return ["train", "--method", "anomalyclip", "--backbone", "tiny", "--pretrained", "none", "--dataset", "folder",
            "--root", str(root), "--normal-dir", "good", "--abnormal-dir", "bad", "--mask-dir", "masks",
            "--out", str(out), "--image-size", str(SIZE), "--batch-size", "2", "--workers", "0", "--quiet",
            "--epochs", "1"]


def test_nan_training_loss_stops_without_saving(folder_data, tmp_path, monkeypatch):
    def nan_loss(self, images, masks, labels, **kwargs):
        return self.prompts.ctx.sum() * float("nan"), {}
    monkeypatch.setattr(AnomalyCLIP, "training_loss", nan_loss)
    out = tmp_path / "run"
    code, _, stderr = _run(_train_args(folder_data, out))
    assert code == 2 and "training loss is nan" in stderr and "learning rate" in stderr
    assert not (out / "anomalyclip.safetensors").exists()
    assert not list((out / CHECKPOINT_DIR).glob("*.safetensors"))


# --------------------------------------------------------------------------- file modes


@contextlib.contextmanager
def _umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_written_files_respect_the_umask(folder_data, tmp_path, mask):
    """safetensors writes through a 0600 temporary file; clipad's files get what open() gives."""
    expected = 0o666 & ~mask
    with _umask(mask):
        det = tiny_detector("winclip", image_size=SIZE, scales=(2,))
        assert _mode(det.save(tmp_path / "w.safetensors")) == expected
        out = tmp_path / "run"
        code, _, stderr = _run(_train_args(folder_data, out))
        assert code == 0, stderr
    written = [out / "anomalyclip.safetensors", *epoch_paths(out, 1), out / LOG_CSV, out / LOG_JSON]
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(expected) for p in written}


# --------------------------------------------------------------------------- quick_gelu


def test_quick_gelu_survives_save_and_load(tmp_path):
    det = tiny_detector("anomalyclip", image_size=SIZE, n_ctx=2, deep_length=2, quick_gelu=True)
    assert det.backbone.quick_gelu
    path = det.save(tmp_path / "qg.safetensors")
    assert _read_raw(path)[0]["quick_gelu"] == "true"
    loaded = _load(path)
    assert loaded.backbone.quick_gelu
    x = random_images(1, SIZE, seed=3)
    assert torch.equal(loaded.predict(x).anomaly_maps, det.predict(x).anomaly_maps)
    plain = _load(tiny_detector("anomalyclip", image_size=SIZE, n_ctx=2, deep_length=2).save(tmp_path / "p.safetensors"))
    assert not plain.backbone.quick_gelu


def test_file_without_quick_gelu_loads_with_auto(saved, tmp_path):
    """Files written before quick_gelu was recorded (tests/fixtures/legacy too) decide it as before."""
    path = _tampered(saved, tmp_path, _drop("quick_gelu"))
    assert not _load(path).backbone.quick_gelu


# --------------------------------------------------------------------------- message bounds


def test_error_messages_are_bounded():
    huge = "x" * 1_000_000
    assert len(str(ClipadError(huge))) <= MAX_MESSAGE
    assert len(str(InvalidValueError(huge))) <= MAX_MESSAGE
    short = shorten(huge, 200)
    assert len(short) <= 200 and short.startswith("xxx") and "characters left out" in short
    assert shorten("a\nb") == "a\\nb" and shorten("plain") == "plain"
    with pytest.raises(ClipadError) as info:
        tiny_detector("anomalyclip", n_ctx=huge)
    assert len(str(info.value)) <= MAX_MESSAGE
