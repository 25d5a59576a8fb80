"""What ``predict`` / ``set_reference`` accept as image tensors, through the public API.

Images are float tensors in [0, 1] (float16/bfloat16 are converted to float32) or uint8 tensors of
0..255 pixel values. Other ranges (0..255 floats, -1..1, mean/std-normalised) would give
meaningless scores without any error, so they are rejected with a message that says how to rescale.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import clipad
from clipad.data.transforms import as_image_list, range_tolerance

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def det():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return clipad.create_detector("winclip", backbone="tiny", device="cpu", image_size=SIZE)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    """[2, 3, SIZE, SIZE] in [0, 1], multiples of 1 / 255 so that a uint8 tensor holds the same image."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3, SIZE, SIZE), generator=g).float() / 255


@pytest.fixture(scope="module")
def expected(det, x):
    return det.predict(x)


@pytest.mark.parametrize(
    "scale, fix",
    [
        pytest.param(lambda x: x * 255, "x / 255", id="0..255 float"),
        pytest.param(lambda x: x * 2 - 1, "(x + 1) / 2", id="-1..1"),
        pytest.param(lambda x: (x - 0.45) / 0.27, "before normalisation", id="mean/std-normalised"),
        pytest.param(lambda x: x * 1.05 - 0.02, "x.clamp(0, 1)", id="slightly out"),
    ],
)
def test_out_of_range_float_is_rejected_with_the_fix(det, x, scale, fix):
    bad = scale(x)
    with pytest.raises(clipad.InvalidValueError, match="must be in \\[0, 1\\]") as info:
        det.predict(bad)
    assert fix in str(info.value)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):  # an InvalidValueError is a ValueError
        det.set_reference(bad)
    with pytest.raises(clipad.InvalidValueError, match=r"images\[1\]") as info:  # list items are named
        det.predict([x[0], bad[1]])
    assert fix in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_is_rejected(det, x, value):
    bad = x.clone()
    bad[1, 2, 5, 7] = value
    with pytest.raises(clipad.InvalidValueError, match="NaN or infinite"):
        det.predict(bad)
    with pytest.raises(clipad.InvalidValueError, match=r"images\[1\] contains NaN or infinite"):
        det.predict([x[0], bad[1]])


def test_tolerance_for_rounding(det, x, expected):
    """Values a rounding step outside [0, 1] (e.g. x * std + mean undone in float32) are accepted."""
    nudged = x.clone()
    nudged[0, 0, 0, 0], nudged[1, 1, 1, 1] = 1.0 + 5e-4, -5e-4
    det.predict(nudged)
    beyond = x.clone()
    beyond[0, 0, 0, 0] = 1.0 + 2 * range_tolerance(torch.float32)
    with pytest.raises(clipad.InvalidValueError):
        det.predict(beyond)


def test_tolerance_scales_with_the_dtype():
    assert range_tolerance(torch.float32) == range_tolerance(torch.float64) == 1e-3
    assert 1e-3 < range_tolerance(torch.float16) < 3e-3
    # one bfloat16 step above 1.0 (1 + 2**-7) is still a [0, 1] image
    one_step = torch.full((3, 4, 4), 1 + 2**-7, dtype=torch.bfloat16)
    assert float(as_image_list(one_step)[0].max()) == 1 + 2**-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_accepted(det, x, dtype):
    """float16 used to raise a bare NotImplementedError (CPU bicubic resizing has no Half kernel)."""
    low = x.to(dtype)[..., : SIZE - 4, :]  # not at model size: the resize runs too
    got = det.predict(low)
    ref = det.predict(low.float())  # the same values (k / 255 is not exact in float16), as float32
    assert torch.equal(got.image_scores, ref.image_scores)
    assert torch.equal(got.anomaly_maps, ref.anomaly_maps)
    assert got.image_scores.dtype == torch.float32
    for t in as_image_list(x.to(dtype)):
        assert t.dtype == torch.float32


def test_uint8_is_pixel_values(det, x, expected):
    u8 = (x * 255).round().to(torch.uint8)
    got = det.predict(u8)
    torch.testing.assert_close(got.image_scores, expected.image_scores, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.anomaly_maps, expected.anomaly_maps, atol=1e-6, rtol=1e-6)
    mixed = det.predict([u8[0], x[1]])  # uint8 and float items in one list
    torch.testing.assert_close(mixed.image_scores, expected.image_scores, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_other_dtypes_are_rejected(det, x, dtype):
    with pytest.raises(clipad.ClipadError, match="uint8") as info:
        det.predict((x * 255).to(dtype))
    assert str(dtype) in str(info.value)
    with pytest.raises(TypeError, match=r"images\[0\]"):  # an InvalidTypeError is a TypeError
        det.predict([(x[0] * 255).to(dtype)])


def test_zero_and_one_are_in_range(det):
    det.predict(torch.zeros(1, 3, SIZE, SIZE))
    det.predict(torch.ones(3, SIZE, SIZE))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_predict_batch_size_must_be_a_positive_integer(bad):
    det = clipad.create_detector("winclip", backbone="tiny", device="cpu", image_size=64)
    with pytest.raises(clipad.InvalidValueError, match="batch_size must be a positive integer"):
        det.predict(torch.rand(1, 3, 64, 64), batch_size=bad)
