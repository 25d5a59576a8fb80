"""Small helpers shared by the method test files (imported as ``from _helpers import ...``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clipad

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FIXTURES_DIR = TESTS_DIR / "fixtures"  # fidelity fixtures made by tools/<method>_fixtures.py


def tiny_detector(method: str, **options) -> clipad.Detector:
    """``method`` on the random ``tiny`` backbone, on CPU, without the random-weights warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return clipad.create_detector(method, backbone="tiny", pretrained=None, device="cpu", **options)


def random_images(n: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    """[n, 3, h, w] uniform images in [0, 1] from a seeded generator."""
    return torch.rand(n, 3, h, h if w is None else w, generator=torch.Generator().manual_seed(seed))


def report_max_diff(method: str, name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Max |ours - theirs| after checking shapes; printed so `pytest -s` shows the fidelity figures."""
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    diff = (ours.float() - theirs.float()).abs().max().item()
    print(f"{method} fidelity: {name}: max |diff| {diff:.2e}")
    return diff


def write_folder_dataset(root: Path, n_normal: int = 6, n_abnormal: int = 6, size: int = 48, seed: int = 0) -> None:
    """A folder-layout dataset (good/, bad/, masks/) of smooth noise images; anomalous ones carry
    a bright square, with its mask."""
    rng = np.random.default_rng(seed)
    for d in ("good", "bad", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n_normal + n_abnormal):
        img = (rng.random((size // 8, size // 8, 3)) * 120 + 60).astype(np.uint8)
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)).copy()
        if i < n_normal:
            Image.fromarray(img).save(root / "good" / f"{i:02d}.png")
            continue
        y, x = rng.integers(4, size - 20, size=2)
        img[y : y + 16, x : x + 16] = 255
        mask = np.zeros((size, size), np.uint8)
        mask[y : y + 16, x : x + 16] = 255
        Image.fromarray(img).save(root / "bad" / f"{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:02d}.png")


def load_openai_fixture(fixtures: Path, name: str, tmp_dir: Path):
    """(backbone, meta, expected) from a fixture folder made by ``tools/<method>_fixtures.py``.

    ``model.safetensors`` holds a small random CLIP in the OpenAI state-dict layout (token
    embedding rows only for the tokens the prompts use; the others were zero in the official run
    and cannot affect any output) and, in its header, the architecture (``shape``). The weights go
    through clipad's own file-loading path, as an OpenAI ``.pt`` state dict (-> QuickGELU).
    """
    import json

    import open_clip
    from safetensors import safe_open
    from safetensors.torch import load_file

    from clipad.backbones.clip import OPENAI_MEAN, OPENAI_STD, Backbone, _load_into
    from clipad.backbones.weights import read_state_dict

    with safe_open(str(fixtures / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    weights = {k: v.float() for k, v in load_file(str(fixtures / "model.safetensors")).items()}
    expected = load_file(str(fixtures / "expected.safetensors"))
    shape = json.loads(meta["shape"])
    ids, rows = weights.pop("token_ids").long(), weights.pop("token_rows")
    table = torch.zeros(shape["vocab_size"], shape["transformer_width"])
    table[ids] = rows
    weights["token_embedding.weight"] = table
    path = tmp_dir / "clip.pt"
    torch.save({**weights, "input_resolution": torch.tensor(shape["image_resolution"]),
                "context_length": torch.tensor(shape["context_length"]), "vocab_size": torch.tensor(shape["vocab_size"])}, path)
    sd, is_openai = read_state_dict(path)
    assert is_openai
    cfg = {
        "embed_dim": shape["embed_dim"],
        "vision_cfg": {"image_size": shape["image_resolution"], "layers": shape["vision_layers"], "width": shape["vision_width"],
                       "head_width": 64, "patch_size": shape["vision_patch_size"]},
        "text_cfg": {"context_length": shape["context_length"], "vocab_size": shape["vocab_size"],
                     "width": shape["transformer_width"], "heads": shape["transformer_heads"], "layers": shape["transformer_layers"]},
    }
    with torch.random.fork_rng(devices=[]):
        model = open_clip.model.CLIP(**cfg, quick_gelu=is_openai)
    _load_into(model, sd, str(path))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=shape["context_length"])
    backbone = Backbone(model, name=name, pretrained=None, mean=OPENAI_MEAN, std=OPENAI_STD, tokenizer=tokenizer)
    return backbone, meta, expected


def start_tiny_server(extra: list[str] = (), env: dict[str, str] | None = None, timeout_s: float = 120.0):
    """``python -m clipad.serve`` (winclip on tiny, 64 px, CPU) on a free port of 127.0.0.1 ->
    (process, base URL, stderr lines so far). Stderr is drained by a thread, so the server
    never blocks on a full pipe; the caller terminates the process."""
    import os
    import subprocess
    import sys
    import threading

    cmd = [sys.executable, "-m", "clipad.serve", "--method", "winclip", "--backbone", "tiny", "--pretrained", "none",
           "--image-size", "64", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--log-level", "warning",
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if " at http://" in line and not found:
                found.append(line.rsplit(" at ", 1)[1].strip().rstrip("/"))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout_s) or not found:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines[-30:]))
    return proc, found[0], lines
