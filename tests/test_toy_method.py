"""A method is one folder plus a registry line: a toy method written into a temporary package
(its own folder, options dataclass, converter of an "official" checkpoint, learned tensors) gets,
without touching any file of clipad: ``create_detector``, predict, save/load, ``clipad train``
for one step, ``clipad convert --from toy``, ``--set`` options with type checking, and the
registry contract tests (run on it in a subprocess through ``CLIPAD_TEST_EXTRA_METHODS``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import clipad
from clipad.cli import main as clipad_main
from clipad.methods import registry

from _helpers import random_images, write_folder_dataset

SIZE = 64

OPTIONS_PY = '''
from dataclasses import dataclass

from clipad.errors import InvalidValueError
from clipad.methods.base import LearnedOptions


@dataclass(frozen=True)
class ToyOptions(LearnedOptions):
    """Options of the toy method."""

    image_size: int | None = 64
    gain: float = 1.0
    """Scale of the patch logits (> 0)."""
    taps: tuple[float, ...] = (1.0,)
    """Tapped blocks as fractions of the depth."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gain <= 0:
            raise InvalidValueError(f"option gain must be > 0; got {self.gain}")
'''

CONVERT_PY = '''
import torch

from clipad.checkpoint import Converted
from clipad.errors import ClipadError


def convert_official(obj) -> Converted:
    """{"toy": {"w": [W]}, "gain": float} -> clipad's names."""
    if not isinstance(obj, dict) or "toy" not in obj:
        raise ClipadError("not a toy checkpoint: expected a dict with 'toy'")
    return Converted("toy", {"direction": obj["toy"]["w"].float()}, {"gain": float(obj.get("gain", 1.0))},
                     dropped=sorted(set(obj["toy"]) - {"w"}))
'''

MODEL_PY = '''
import torch
import torch.nn.functional as F
from torch import nn

from clipad.methods.base import LearnedDetector
from clipad.methods.registry import register_method

from .convert import convert_official
from .options import ToyOptions


@register_method("toy", converter=convert_official)
class Toy(LearnedDetector):
    """Patch logits along one learned direction; k-shot: cosine distance to the mean reference token."""

    Options = ToyOptions
    default_backbone = "tiny"
    default_pretrained = None
    few_shot = True
    training_defaults = {"epochs": 1, "batch_size": 4, "lr": 1e-2, "seed": 3}

    def __init__(self, backbone, options=None, **kwargs):
        super().__init__(backbone, options, **kwargs)
        self.layers = backbone.tap_layers(self.opts.taps)
        self.direction = nn.Parameter(torch.zeros(backbone.width))
        self.reset_parameters(0)

    def reset_parameters(self, seed):
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            self.direction.copy_(torch.randn(self.direction.shape, generator=g).to(self.direction.device))

    def trainable_parameters(self):
        return [self.direction]

    def learned_state(self):
        return {"direction": self.direction.detach()}

    def load_learned_state(self, state):
        self.copy_learned({"direction": self.direction}, state, "the backbone width")

    def _tokens(self, x):
        f = self.backbone.encode_image(x, self.layers)
        return torch.stack([f.taps[l][:, 1:] for l in self.layers]).mean(0), f.grid

    def encode_reference(self, x):
        tokens, _ = self._tokens(x)
        return {"mean": F.normalize(tokens.flatten(0, 1).mean(0), dim=-1), "shots": torch.tensor(x.shape[0])}

    def _maps(self, x, reference):
        tokens, grid = self._tokens(x)
        if reference is None:
            p = torch.sigmoid(self.opts.gain * (F.normalize(tokens, dim=-1) @ F.normalize(self.direction, dim=0)))
        else:
            p = self.opts.gain * (1 - F.normalize(tokens, dim=-1) @ reference["mean"]) / 2
        p = p.reshape(-1, 1, *grid)
        return F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def score_batch(self, x, class_name, reference):
        maps = self._maps(x, reference)
        return maps.flatten(1).amax(1), maps

    def training_loss(self, images, masks, labels, *, class_names=None, references=None):
        maps = self._maps(images, None)
        seg = F.binary_cross_entropy(maps.clamp(1e-6, 1 - 1e-6), masks)
        img = F.binary_cross_entropy(maps.flatten(1).amax(1).clamp(1e-6, 1 - 1e-6), labels.float())
        return seg + img, {"seg": seg.detach(), "img": img.detach()}
'''

INIT_PY = '''
"""A toy method: one folder, one registry line."""
from .model import Toy  # registers "toy"
'''


@pytest.fixture(scope="module")
def toy_package(tmp_path_factory):
    """Write the package, import it (registering "toy"), and unregister it afterwards."""
    root = tmp_path_factory.mktemp("plugins")
    pkg = root / "clipad_toy"
    pkg.mkdir()
    for name, text in [("__init__.py", INIT_PY), ("options.py", OPTIONS_PY), ("convert.py", CONVERT_PY),
                       ("model.py", MODEL_PY)]:
        (pkg / name).write_text(textwrap.dedent(text))
    sys.path.insert(0, str(root))
    try:
        import clipad_toy  # noqa: F401

        yield root
    finally:
        sys.path.remove(str(root))
        for mod in [m for m in sys.modules if m == "clipad_toy" or m.startswith("clipad_toy.")]:
            del sys.modules[mod]
        registry._METHODS.pop("toy", None)
        registry._CONVERTERS.pop("toy", None)


def _toy(**options) -> clipad.Detector:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return clipad.create_detector("toy", backbone="tiny", device="cpu", **options)


def test_create_predict_and_save_load(toy_package, tmp_path):
    assert "toy" in clipad.list_methods() and "toy" in registry.learned_methods()
    det = _toy(gain=2.0)
    assert det.options["gain"] == 2.0 and det.image_size == SIZE
    x = random_images(3, SIZE)
    pred = det.predict(x)
    assert pred.image_scores.shape == (3,) and pred.anomaly_maps.shape == (3, SIZE, SIZE)
    assert torch.isfinite(pred.anomaly_maps).all()
    det.set_reference(random_images(2, SIZE, seed=5), class_name="bolt")
    path = det.save(tmp_path / "toy.safetensors")
    back = clipad.load_detector(path, device="cpu")
    assert type(back).__name__ == "Toy" and back.options == det.options
    for cls in (None, "bolt"):
        a, b = det.predict(x, class_name=cls), back.predict(x, class_name=cls)
        assert torch.equal(a.image_scores, b.image_scores) and torch.equal(a.anomaly_maps, b.anomaly_maps)
    # the k-shot branch really differs from the zero-shot one
    assert not torch.equal(det.predict(x, class_name="bolt").anomaly_maps, det.predict(x).anomaly_maps)


def test_options_are_type_checked(toy_package):
    with pytest.raises(clipad.ClipadError, match="gain"):
        _toy(gain="loud")
    with pytest.raises(clipad.ClipadError, match="gain must be > 0"):
        _toy(gain=-1.0)
    with pytest.raises(clipad.UnknownNameError, match="Valid options: .*gain"):
        _toy(volume=3)


def test_cli_set_options(toy_package, tmp_path, capsys):
    img = tmp_path / "img"
    write_folder_dataset(img, n_normal=2, n_abnormal=0, size=SIZE)
    common = ["predict", str(img / "good"), "--method", "toy", "--backbone", "tiny", "--pretrained", "none",
              "--quiet", "--out", str(tmp_path / "out")]
    assert clipad_main([*common, "--set", "gain=2.5"]) == 0
    assert (tmp_path / "out" / "scores.csv").read_text().count("\n") == 3
    capsys.readouterr()
    assert clipad_main([*common, "--set", "gain=abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipad:") and "gain" in err and "Traceback" not in err


def test_cli_train_one_step(toy_package, tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "run"
    write_folder_dataset(root, size=SIZE)
    before = _toy().learned_state()["direction"].clone()
    rc = clipad_main([
        "train", "--method", "toy", "--backbone", "tiny", "--pretrained", "none", "--dataset", "folder",
        "--root", str(root), "--normal-dir", "good", "--abnormal-dir", "bad", "--mask-dir", "masks",
        "--out", str(out), "--max-steps", "1", "--workers", "0", "--quiet",
    ])
    assert rc == 0, capsys.readouterr().err
    trained = clipad.load_detector(out / "toy.safetensors", device="cpu")
    after = trained.learned_state()["direction"]
    # seed 3 from training_defaults, then one Adam step of lr 1e-2: its first step moves each
    # coordinate by lr * |g| / (|g| + eps), i.e. by lr unless the gradient is tiny
    fresh = _toy()
    fresh.reset_parameters(3)
    step = (after - fresh.learned_state()["direction"]).abs()
    assert torch.all(step > 0) and torch.all(step <= 1e-2 * (1 + 1e-4)), step
    assert (step > 0.9e-2).float().mean() > 0.9, step
    assert not torch.equal(after, before)


def test_cli_convert_from_toy(toy_package, tmp_path, capsys):
    width = _toy().learned_state()["direction"].shape[0]
    w = torch.randn(width, generator=torch.Generator().manual_seed(1))
    official = tmp_path / "official.pth"
    torch.save({"toy": {"w": w, "unused": torch.ones(2)}, "gain": 3.0}, official)
    out = tmp_path / "toy.safetensors"
    assert clipad_main(["convert", "--from", "toy", str(official), str(out)]) == 0
    det = clipad.load_detector(out, device="cpu")
    assert det.options["gain"] == 3.0 and torch.equal(det.learned_state()["direction"], w)
    det2 = _toy(checkpoint=str(out), gain=3.0)
    x = random_images(2, SIZE)
    assert torch.equal(det.predict(x).anomaly_maps, det2.predict(x).anomaly_maps)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        clipad_main(["convert", "--help"])
    assert "toy" in capsys.readouterr().out


def test_registry_contract_tests_run_on_the_toy(toy_package):
    here = Path(__file__).parent
    env = {**os.environ, "CLIPAD_TEST_EXTRA_METHODS": "clipad_toy",
           "PYTHONPATH": os.pathsep.join([str(toy_package), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_methods_contract.py"),
         "-k", "toy"], capture_output=True, text=True, env=env, cwd=here.parent, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 10, summary
