"""The contract every registered method keeps, checked on the tiny random backbone.

Parametrised over ``clipad.list_methods()``: a new method gets these tests by being registered
(as timm tests its registry). They check properties only (shapes, dtypes, invariances, exact
save/load round trips, error messages), never numbers taken from our own output.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import clipad
from clipad import ClipadError, UnknownNameError
from clipad.methods import get_method

# Methods of other packages join the contract tests by name (tests/test_toy_method.py uses it):
# importing a method's package registers it.
for _package in filter(None, os.environ.get("CLIPAD_TEST_EXTRA_METHODS", "").split(",")):
    importlib.import_module(_package)
METHODS = clipad.list_methods()
# Model input size of most tests: a 4x4 patch grid on tiny (patch 16) keeps each predict in
# milliseconds; the acceptance test below uses the method's default size.
SIZE = 64
RANDOM_INIT = "randomly initialised"


def _build(method: str, **options) -> clipad.Detector:
    """The method on tiny; few-shot-only methods (``needs_reference``) get a default reference
    set, so that every test can predict."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{RANDOM_INIT}.*")
        return _ready(clipad.create_detector(method, backbone="tiny", pretrained=None, device="cpu", **options))


def _ready(d: clipad.Detector) -> clipad.Detector:
    if d.needs_reference:
        d.set_reference(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(42)))
    return d


def _backbone_weights(d: clipad.Detector) -> dict[str, torch.Tensor]:
    """The backbone's own state dict, as a weights file holds it (CLIP: open_clip keys; DINOv2: timm keys)."""
    return (d.backbone.clip if hasattr(d.backbone, "clip") else d.backbone.model).state_dict()


def _uint8_images(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _as_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] arrays -> float [B, 3, H, W] in [0, 1], independently of clipad's reader."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _predict(det: clipad.Detector, images, **kwargs) -> clipad.Prediction:
    """``det.predict(images, **kwargs)``. A transductive method scores a set of at least
    ``det.min_set_size`` images together: the inputs are completed with seeded random images of
    the first input's size (the same for every call), and the inputs' own outputs returned."""
    if not det.transductive:
        return det.predict(images, **kwargs)
    from clipad.data.transforms import as_image_list

    items = as_image_list(images)
    extra = max(0, det.min_set_size - len(items))
    context = torch.rand(extra, 3, *items[0].shape[-2:], generator=torch.Generator().manual_seed(99))
    pred = det.predict(items + list(context), **kwargs)
    n = len(items)
    maps = pred.anomaly_maps[:n]
    if isinstance(maps, list) and len({tuple(m.shape) for m in maps}) == 1:
        maps = torch.stack(maps)
    return clipad.Prediction(image_scores=pred.image_scores[:n], anomaly_maps=maps)


def _assert_prediction(pred: clipad.Prediction, n: int, size: tuple[int, int]) -> None:
    assert isinstance(pred, clipad.Prediction)
    assert len(pred) == n
    assert pred.image_scores.shape == (n,)
    assert pred.image_scores.dtype == torch.float32
    assert torch.isfinite(pred.image_scores).all()
    assert isinstance(pred.anomaly_maps, torch.Tensor)
    assert pred.anomaly_maps.shape == (n, *size)
    assert pred.anomaly_maps.dtype == torch.float32
    assert torch.isfinite(pred.anomaly_maps).all()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=METHODS)
def method(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def det(method: str) -> clipad.Detector:
    """One zero-shot detector per method, shared by the read-only tests of this module."""
    return _build(method, image_size=SIZE)


# --------------------------------------------------------------------------- construction


def test_registry_lists_winclip():
    assert "winclip" in METHODS
    assert METHODS == sorted(METHODS)


def test_acceptance_line(method: str):
    """The exact line of the acceptance criterion (default image size), on CPU."""
    with pytest.warns(UserWarning, match=RANDOM_INIT):
        d = _ready(clipad.create_detector(method, backbone="tiny", pretrained=None, device="cpu"))
    pred = _predict(d, torch.rand(2, 3, 240, 240))
    _assert_prediction(pred, 2, (240, 240))


def test_random_init_warns_only_for_random_weights(method: str, tmp_path: Path):
    with pytest.warns(UserWarning, match=RANDOM_INIT):
        d = clipad.create_detector(method, backbone="tiny", pretrained=None, device="cpu", image_size=SIZE)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in _backbone_weights(d).items()}, str(weights))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{RANDOM_INIT}.*")  # a file of weights is not random
        clipad.create_detector(method, backbone="tiny", pretrained=weights, device="cpu", image_size=SIZE)


def test_detector_facts(det: clipad.Detector, method: str):
    assert det.name == method
    assert det.device == torch.device("cpu")
    assert det.image_size == SIZE
    assert not det.training
    assert not any(p.requires_grad for p in det.backbone.parameters())


# --------------------------------------------------------------------------- input types


def test_tensor_batch_at_another_size(det: clipad.Detector):
    """Maps come back at the input's size, not the model's."""
    pred = _predict(det, torch.rand(3, 3, 80, 56))
    _assert_prediction(pred, 3, (80, 56))


def test_single_chw_tensor(det: clipad.Detector):
    x = torch.rand(3, 48, 72)
    pred = _predict(det, x)
    _assert_prediction(pred, 1, (48, 72))
    batched = _predict(det, x[None])
    torch.testing.assert_close(pred.image_scores, batched.image_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(pred.anomaly_maps, batched.anomaly_maps, rtol=0, atol=1e-6)


def test_pil_list_and_path_list_equal_tensor(det: clipad.Detector, tmp_path: Path):
    arrays = _uint8_images(3, (SIZE, SIZE), seed=1)
    from_tensor = _predict(det, _as_tensor(arrays))
    from_pil = _predict(det, [Image.fromarray(a) for a in arrays])
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"img{i}.png")  # PNG is lossless: same pixels back
        Image.fromarray(a).save(paths[-1])
    from_paths = _predict(det, paths)
    from_str_paths = _predict(det, [str(p) for p in paths])
    _assert_prediction(from_pil, 3, (SIZE, SIZE))
    for other in (from_pil, from_paths, from_str_paths):
        torch.testing.assert_close(other.image_scores, from_tensor.image_scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(other.anomaly_maps, from_tensor.anomaly_maps, rtol=0, atol=1e-6)


def test_single_path_and_single_pil(det: clipad.Detector, tmp_path: Path):
    (array,) = _uint8_images(1, (40, 52), seed=2)
    Image.fromarray(array).save(tmp_path / "one.png")
    for item in (Image.fromarray(array), tmp_path / "one.png", str(tmp_path / "one.png")):
        _assert_prediction(_predict(det, item), 1, (40, 52))


def test_mixed_list_with_different_sizes(det: clipad.Detector, tmp_path: Path):
    """Each map at its own input's size, as a list; each item scored as if it were alone (not for
    transductive methods, whose scores depend on the set)."""
    a_tensor = torch.rand(3, 64, 48)
    (b_array, c_array) = _uint8_images(1, (50, 70), seed=3) + _uint8_images(1, (33, 41), seed=4)
    Image.fromarray(c_array).save(tmp_path / "c.png")
    items = [a_tensor, Image.fromarray(b_array), tmp_path / "c.png"]
    pred = _predict(det, items)
    assert pred.image_scores.shape == (3,) and pred.image_scores.dtype == torch.float32
    assert isinstance(pred.anomaly_maps, list) and len(pred.anomaly_maps) == 3
    sizes = [(64, 48), (50, 70), (33, 41)]
    for amap, size, item in zip(pred.anomaly_maps, sizes, items):
        assert amap.shape == size and amap.dtype == torch.float32
        assert torch.isfinite(amap).all()
        if det.transductive:
            continue
        alone = det.predict([item])
        torch.testing.assert_close(alone.anomaly_maps[0], amap, rtol=0, atol=1e-5)
    if not det.transductive:
        alone_scores = torch.cat([det.predict([item]).image_scores for item in items])
        torch.testing.assert_close(pred.image_scores, alone_scores, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- invariances


def test_batch_size_invariance(det: clipad.Detector):
    x = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    one = det.predict(x, batch_size=1)
    four = det.predict(x, batch_size=4)
    _assert_prediction(one, 5, (SIZE, SIZE))
    torch.testing.assert_close(one.image_scores, four.image_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(one.anomaly_maps, four.anomaly_maps, rtol=0, atol=1e-5)


def test_deterministic(det: clipad.Detector, method: str):
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    first, second = _predict(det, x), _predict(det, x)
    assert torch.equal(first.image_scores, second.image_scores)
    assert torch.equal(first.anomaly_maps, second.anomaly_maps)
    # A second detector built with the same seed computes the same function.
    again = _predict(_build(method, image_size=SIZE), x)
    assert torch.equal(first.image_scores, again.image_scores)
    assert torch.equal(first.anomaly_maps, again.anomaly_maps)


def test_seed_changes_random_weights(method: str):
    a = _backbone_weights(_build(method, image_size=SIZE, seed=0))
    b = _backbone_weights(_build(method, image_size=SIZE, seed=1))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- save / load


def _assert_same_prediction(a: clipad.Prediction, b: clipad.Prediction) -> None:
    assert torch.equal(a.image_scores, b.image_scores)
    assert torch.equal(a.anomaly_maps, b.anomaly_maps)


def test_save_load_zero_shot_bit_identical(method: str, tmp_path: Path):
    d = _build(method, image_size=SIZE, seed=3)
    path = d.save(tmp_path / "det.safetensors")
    assert Path(path).is_file()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{RANDOM_INIT}.*")
        loaded = clipad.load_detector(path, device="cpu")
    assert type(loaded) is type(d)
    assert loaded.name == method and loaded.image_size == SIZE and loaded.options == d.options
    sd, sd2 = d.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    _assert_same_prediction(_predict(d, x), _predict(loaded, x))


def test_save_load_keeps_non_default_options(method: str, tmp_path: Path):
    d = _build(method, image_size=2 * SIZE, precision="fp32")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{RANDOM_INIT}.*")
        loaded = clipad.load_detector(d.save(tmp_path / "d.safetensors"), device="cpu")
    assert loaded.image_size == 2 * SIZE and loaded.precision == "fp32"
    assert loaded.options == d.options


def test_save_load_with_references_bit_identical(method: str, tmp_path: Path):
    if not get_method(method).few_shot:
        d = _build(method, image_size=SIZE)
        with pytest.raises(ClipadError, match="few-shot"):
            d.set_reference(torch.rand(1, 3, SIZE, SIZE))
        return
    d = _build(method, image_size=SIZE)
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    zero_shot = d.predict(x)
    d.set_reference(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)))
    d.set_reference(torch.rand(1, 3, 80, 80, generator=torch.Generator().manual_seed(10)), class_name="bottle")
    assert d.shots == 2
    few_default, few_bottle = d.predict(x), d.predict(x, class_name="bottle")
    _assert_prediction(few_default, 3, (SIZE, SIZE))
    # references must matter, or the round trip below would prove nothing about them
    assert not torch.equal(few_default.image_scores, zero_shot.image_scores)
    assert not torch.equal(few_default.image_scores, few_bottle.image_scores)

    path = d.save(tmp_path / "few.safetensors")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{RANDOM_INIT}.*")
        loaded = clipad.load_detector(path, device="cpu")
    assert loaded.shots == 2
    assert set(loaded._references) == set(d._references)
    for cls_name, memory in d._references.items():
        assert memory.keys() == loaded._references[cls_name].keys()
        assert all(torch.equal(v, loaded._references[cls_name][k]) for k, v in memory.items())
    _assert_same_prediction(few_default, loaded.predict(x))
    _assert_same_prediction(few_bottle, loaded.predict(x, class_name="bottle"))

    loaded.clear_reference()
    loaded.clear_reference("bottle")
    if loaded.needs_reference:  # few-shot only: no references is a clear error, not a guess
        with pytest.raises(ClipadError, match="reference"):
            loaded.predict(x)
    else:
        _assert_same_prediction(zero_shot, loaded.predict(x))


def test_load_detector_rejects_foreign_safetensors(tmp_path: Path):
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ClipadError, match="not a clipad checkpoint") as info:
        clipad.load_detector(foreign, device="cpu")
    assert str(foreign) in str(info.value)


def test_load_detector_rejects_non_safetensors(tmp_path: Path):
    bogus = tmp_path / "notes.safetensors"
    bogus.write_text("this is not a checkpoint")
    with pytest.raises(ClipadError) as info:
        clipad.load_detector(bogus, device="cpu")
    assert str(bogus) in str(info.value)


def test_load_detector_missing_file(tmp_path: Path):
    missing = tmp_path / "nowhere" / "det.safetensors"
    with pytest.raises(ClipadError, match="does not exist") as info:
        clipad.load_detector(missing, device="cpu")
    assert str(missing) in str(info.value)


# --------------------------------------------------------------------------- errors


def test_unknown_option_lists_valid_options(method: str):
    with pytest.raises(ClipadError, match="no_such_option") as info:
        clipad.create_detector(method, backbone="tiny", pretrained=None, device="cpu", no_such_option=1)
    valid = [f.name for f in dataclasses.fields(get_method(method).Options)]
    assert "image_size" in valid
    for name in valid:
        assert name in str(info.value)


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownNameError, match="no-such-method") as info:
        clipad.create_detector("no-such-method", backbone="tiny", pretrained=None)
    for name in METHODS:
        assert name in str(info.value)


@pytest.mark.parametrize("pretrained", [None, "unset"])
def test_unknown_backbone_lists_valid_names(method: str, pretrained):
    kwargs = {} if pretrained == "unset" else {"pretrained": pretrained}
    with pytest.raises(UnknownNameError, match="no-such-backbone") as info:
        clipad.create_detector(method, backbone="no-such-backbone", device="cpu", **kwargs)
    message = str(info.value)
    assert "tiny" in message and "ViT-B-16" in message and "ViT-L-14" in message


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(torch.rand(2, 1, SIZE, SIZE), id="one-channel"),
        pytest.param(torch.rand(2, 4, SIZE, SIZE), id="four-channels"),
        pytest.param(torch.rand(2, SIZE, SIZE, 3), id="channels-last"),
        pytest.param(torch.rand(SIZE, SIZE), id="2d"),
        pytest.param(torch.rand(1, 2, 3, SIZE, SIZE), id="5d"),
        pytest.param(torch.rand(2, 3, SIZE, SIZE) * 255, id="float-0-255"),  # uint8 is accepted (pixel values)
        pytest.param(torch.randint(0, 2, (2, 3, SIZE, SIZE)), id="int64"),
        pytest.param(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.bool), id="bool"),
        pytest.param(torch.rand(0, 3, SIZE, SIZE), id="empty-batch"),
        pytest.param(torch.rand(1, 3, 0, SIZE), id="zero-height"),
        pytest.param([], id="empty-list"),
        pytest.param([torch.rand(1, SIZE, SIZE)], id="list-one-channel"),
        pytest.param([torch.rand(3, SIZE, SIZE), torch.rand(1, 3, SIZE, SIZE)], id="list-4d-item"),
        pytest.param([torch.rand(3, SIZE, SIZE) * 2 - 1], id="list-float-minus1-1"),
        pytest.param([torch.rand(3, SIZE, 0)], id="list-zero-width"),
        pytest.param([42], id="list-int"),
        pytest.param([np.zeros((SIZE, SIZE, 3), np.uint8)], id="list-numpy"),
    ],
)
def test_bad_inputs_raise_clipad_error(det: clipad.Detector, bad):
    with pytest.raises(ClipadError):
        det.predict(bad)


def test_missing_and_unreadable_paths_raise_clipad_error(det: clipad.Detector, tmp_path: Path):
    (tmp_path / "text.png").write_text("not an image")
    for bad in (tmp_path / "missing.png", tmp_path / "text.png"):
        with pytest.raises(clipad.ImageReadError) as info:
            det.predict([bad])
        assert str(bad) in str(info.value)


def test_bad_options_raise_clipad_error(method: str):
    with pytest.raises(ClipadError, match="image_size"):
        _build(method, image_size=SIZE + 1)
    with pytest.raises(ClipadError, match="precision"):
        _build(method, image_size=SIZE, precision="fp8")
