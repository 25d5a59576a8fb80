"""`clipad eval --resize pil`: the official AnomalyCLIP / AdaptCLIP test scripts' preprocessing.

The references here are torchvision's own transforms, built as the official ``utils.get_transform``
builds them (``Resize((S, S), BICUBIC)`` + ``ToTensor`` for images; ``Resize((S, S))`` + ``ToTensor``
then ``> 0.5`` for 0/255 masks), not clipad's code.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from _helpers import tiny_detector, write_folder_dataset
from clipad import ClipadError
from clipad.cli import main
from clipad.data import few_shot_split, folder_dataset
from clipad.data.images import load_image
from clipad.data.official import official_image_transform, official_mask
from clipad.eval.run import resize_mask, ToModelTensor, run

TINY = ["--backbone", "tiny", "--pretrained", "none", "--quiet", "--workers", "0", "--image-size", "64"]


def _generated_image(h: int = 97, w: int = 131, seed: int = 0) -> Image.Image:
    """Smooth colour noise with a bright rectangle (sharp edges, where resizers differ most)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 8, w // 8, 3)) * 200 + 30).astype(np.uint8)
    a = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).copy()
    a[h // 3 : h // 3 + h // 5, w // 4 : w // 4 + w // 6] = 250
    return Image.fromarray(a)


def _ellipse_mask(h: int = 97, w: int = 131) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((yy - h / 2) ** 2 / (h / 5) ** 2 + (xx - w / 3) ** 2 / (w / 7) ** 2) < 1


def _official_image(image: Image.Image, size: int) -> torch.Tensor:
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor()])(image)


def _official_test_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    img = Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L")
    return T.Compose([T.Resize((size, size)), T.ToTensor()])(img)[0] > 0.5


@pytest.mark.parametrize("hw", [(97, 131), (300, 300)])
def test_pil_resize_gives_the_official_model_input(hw):
    det = tiny_detector("anomalyclip", image_size=64)
    image = _generated_image(*hw)
    ours = ToModelTensor(det.input_size, "pil")(image)
    assert ours.shape == (3, 64, 64)
    assert torch.equal(ours, _official_image(image, 64))
    assert torch.equal(ours, official_image_transform(64)(image))  # the transform training uses


def test_pil_masks_follow_the_official_test_scripts():
    mask = _ellipse_mask()
    ours = resize_mask(mask, 64, "pil")
    assert ours.dtype == torch.bool and torch.equal(ours, _official_test_mask(mask, 64))
    assert torch.equal(ours, official_mask(mask, 64) > 0.5)  # training masks are read the same way
    # the default (nearest neighbour) differs at the boundary only
    nearest = resize_mask(mask, 64, "torch")
    assert 0 < int((ours != nearest).sum()) < 0.2 * int(ours.sum())


def test_the_two_resize_modes_give_different_but_close_inputs():
    image = _generated_image(300, 300)
    size = lambda hw: (64, 64)  # noqa: E731
    by_torch, by_pil = ToModelTensor(size, "torch")(image), ToModelTensor(size, "pil")(image)
    diff = (by_torch - by_pil).abs()
    assert not torch.equal(by_torch, by_pil)
    assert diff.mean() < 3e-3 and diff.max() < 0.1  # measured: mean 1.2e-3, max 0.06 (sharp edges)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "line"
    write_folder_dataset(root, n_normal=4, n_abnormal=4, size=72, seed=3)
    return root


def test_eval_resize_pil_end_to_end(folder, tmp_path):
    outs = {}
    for mode in ("pil", "torch"):
        out = tmp_path / mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main(["eval", "--dataset", "folder", "--root", str(folder), "--normal-dir", "good", "--abnormal-dir",
                       "bad", "--mask-dir", "masks", "--method", "anomalyclip", *TINY, "--resize", mode, "--out", str(out)])
        assert rc == 0
        outs[mode] = json.loads((out / "metrics.json").read_text())
    assert outs["pil"]["config"]["resize"] == "pil" and outs["torch"]["config"]["resize"] == "torch"
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= outs["pil"]["classes"]["line"][key] <= 1.0, key


@pytest.mark.parametrize("method, shots", [("anomalyclip", 0), ("winclip", 1)])
def test_pil_run_scores_the_official_inputs(folder, method, shots):
    """Scores of a --resize pil run are the detector's scores of the official transform's tensors
    (already at the model size, so predict does not resize them again), references included."""
    det = tiny_detector(method, image_size=64)
    ds = folder_dataset(folder, normal_dirs="good", abnormal_dirs="bad", mask_dirs="masks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run(det, ds, classes=None, shots=shots, seed=10, eval_size=None, batch_size=4, workers=0,
                  protocol="anomalyclip", n_examples=0, quiet=True, resize="pil")
    (cls,) = res.classes
    refs, test = few_shot_split(ds, cls.name, shots, 10)
    to_model = official_image_transform(64)
    if shots:
        det.set_reference([to_model(load_image(p)) for p in refs], class_name=cls.name)
    expected = det.predict([to_model(load_image(s.image_path)) for s in test], class_name=cls.name).image_scores
    torch.testing.assert_close(torch.as_tensor(cls.scores, dtype=torch.float32), expected.float(), rtol=0, atol=1e-6)
    det.clear_reference(cls.name)


def test_unknown_resize_mode_is_a_clear_error(folder):
    det = tiny_detector("anomalyclip", image_size=64)
    ds = folder_dataset(folder, normal_dirs="good", abnormal_dirs="bad", mask_dirs="masks")
    with pytest.raises(ClipadError, match="resize='bilinear'.*torch, pil"):
        run(det, ds, classes=None, shots=0, seed=10, eval_size=None, batch_size=4, workers=0,
            protocol="anomalyclip", n_examples=0, quiet=True, resize="bilinear")
