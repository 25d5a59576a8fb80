"""The fast-path pieces of issue 7 that are not about precision: optional ``torch.compile``,
batched resizing, fewer device waits in Sinkhorn, the CLI switches. Timing is left to
``clipad bench`` and ``benchmarks/``; these tests check that the fast path computes the same thing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import random_images, tiny_detector

import clipad
from clipad.cli import build_parser, build_detector
from clipad.data.loading import Batch
from clipad.data.transforms import resize_batch, resize_map

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", clipad.list_methods())
def test_compiled_scoring_matches_eager(method):
    """Dynamo traces every method's scoring path (graph breaks allowed) without changing results."""
    det = tiny_detector(method, image_size=64)
    x = random_images(max(3, det.min_set_size), 64, seed=1)  # a transductive method needs a whole set
    if det.needs_reference:  # few-shot only (AnomalyDINO)
        det.set_reference(random_images(2, 64, seed=4))
    eager = det.predict(x)
    assert det.compile(backend="eager") is det
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = det.predict(x)
    torch.testing.assert_close(compiled.image_scores, eager.image_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled.anomaly_maps, eager.anomaly_maps, rtol=0, atol=1e-6)


def test_inductor_compiled_scoring_matches_eager():
    """The real compiler (inductor, C++ on CPU) on one method; the others are traced above."""
    x = random_images(2, 64, seed=2)
    det = tiny_detector("anomalyclip", image_size=64)
    eager = det.predict(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = det.compile().predict(x)
    torch.testing.assert_close(compiled.image_scores, eager.image_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled.anomaly_maps, eager.anomaly_maps, rtol=0, atol=1e-5)


def test_batched_resize_equals_one_image_at_a_time():
    images = list(random_images(4, 50, 70, seed=3))
    batched = resize_batch(images, (64, 64), torch.device("cpu"))
    loop = torch.stack([
        F.interpolate(t[None], size=(64, 64), mode="bicubic", antialias=True, align_corners=False)[0] for t in images
    ])
    torch.testing.assert_close(batched, loop, rtol=0, atol=1e-6)
    mixed = resize_batch(images[:2] + [random_images(1, 30, seed=4)[0]], (64, 64), torch.device("cpu"))
    torch.testing.assert_close(mixed[:2], loop[:2], rtol=0, atol=1e-6)


def test_resize_map_takes_leading_dimensions():
    maps = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(5))
    out = resize_map(maps, (20, 30))
    assert out.shape == (2, 3, 20, 30)
    for i in range(2):
        for j in range(3):
            one = F.interpolate(maps[i, j][None, None], size=(20, 30), mode="bilinear", align_corners=False)[0, 0]
            torch.testing.assert_close(out[i, j], one, rtol=0, atol=1e-6)
    assert resize_map(maps, (7, 7)) is maps


def test_predict_maps_at_each_input_size_in_one_chunk():
    """Mixed original sizes in one chunk: each map comes back at its own image's size, equal to
    predicting that image alone."""
    det = tiny_detector("winclip", image_size=64)
    imgs = [random_images(1, 40, 60, seed=6)[0], random_images(1, 40, 60, seed=7)[0], random_images(1, 80, seed=8)[0]]
    pred = det.predict(imgs)
    assert [tuple(m.shape) for m in pred.anomaly_maps] == [(40, 60), (40, 60), (80, 80)]
    alone = det.predict(imgs[2:])
    # batched or alone, the matmuls may sum in another order (2.4e-7 seen): the suite's 1e-5 for maps
    torch.testing.assert_close(pred.anomaly_maps[2], alone.anomaly_maps[0], rtol=0, atol=1e-5)


def test_sinkhorn_checked_every_10_iterations_agrees():
    x = random_images(2, 64, seed=9)
    every1 = tiny_detector("tokenclip", image_size=64).predict(x)
    every10 = tiny_detector("tokenclip", image_size=64, ot_check_every=10).predict(x)
    torch.testing.assert_close(every10.anomaly_maps, every1.anomaly_maps, rtol=0, atol=1e-4)
    with pytest.raises(clipad.ClipadError, match="ot_check_every must be an int >= 1"):
        tiny_detector("tokenclip", ot_check_every=0)


def test_cli_precision_and_compile_reach_the_detector():
    args = build_parser().parse_args(
        ["predict", "x.png", "--method", "adaptclip", "--backbone", "tiny", "--pretrained", "none",
         "--device", "cpu", "--precision", "bf16", "--compile"]
    )
    det = build_detector(args)
    assert det.precision == "bf16"
    assert det.options["precision"] == "bf16"
    assert "score_batch" in vars(det)  # the compiled callable shadows the method on this instance
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "x.png", "--precision", "fp16"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batch_pins_its_image_tensor():
    batch = Batch(images=torch.zeros(2, 3, 8, 8))
    assert batch.pin_memory().images.is_pinned()
