"""WinCLIP agrees with anomalib's WinClipModel (the reference implementation) on identical weights.

Runs when the optional ``fidelity`` extra (anomalib) is installed. anomalib transposes window
sequences to sequence-first before the transformer, as the open_clip releases it pins (< 2.26.1)
expected; with today's batch-first open_clip that would mix windows (anomalib issue #2571). The
test therefore runs anomalib's own code with its window-path transformer call sequence-first,
exactly what anomalib computes with the open_clip it declares.
"""

from __future__ import annotations

import copy

import pytest
import torch

anomalib_winclip = pytest.importorskip("anomalib.models.image.winclip.torch_model")

import clipad  # noqa: E402

ATOL = 1e-4


class _SequenceFirstWhenAsked(torch.nn.Module):
    """Wraps a batch-first open_clip Transformer; takes [L, N, W] input while ``flag['on']``."""

    def __init__(self, inner: torch.nn.Module, flag: dict) -> None:
        super().__init__()
        self.inner, self.flag = inner, flag

    def forward(self, x, attn_mask=None):
        if self.flag["on"]:
            return self.inner(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        return self.inner(x, attn_mask=attn_mask)


def _reference_model(clip_model, monkeypatch, class_name):
    clip_copy = copy.deepcopy(clip_model)
    monkeypatch.setattr(anomalib_winclip.open_clip, "create_model_and_transforms", lambda *a, **k: (clip_copy, None, None))
    ref = anomalib_winclip.WinClipModel(class_name=None).eval()
    flag = {"on": False}
    ref.clip.visual.transformer = _SequenceFirstWhenAsked(ref.clip.visual.transformer, flag)
    original = ref._get_window_embeddings

    def windows_sequence_first(feature_map, masks):
        flag["on"] = True
        try:
            return original(feature_map, masks)
        finally:
            flag["on"] = False

    ref._get_window_embeddings = windows_sequence_first
    ref.setup(class_name)
    return ref


@pytest.fixture(scope="module")
def detector():
    return clipad.create_detector("winclip", backbone="ViT-B-16-plus-240", pretrained=None, device="cpu", seed=3)


@pytest.fixture(scope="module")
def reference(detector):
    # anomalib's text encoding of the 231 prompts is the slow part: build the reference once
    with pytest.MonkeyPatch.context() as mp:
        return _reference_model(detector.backbone.clip, mp, "bottle")


@pytest.mark.parametrize("shots", [0, 1])
def test_winclip_matches_anomalib(detector, reference, shots):
    g = torch.Generator().manual_seed(11)
    images = torch.rand(2, 3, 240, 240, generator=g)
    refs = torch.rand(shots, 3, 240, 240, generator=g) if shots else None

    det = copy.deepcopy(detector)
    if refs is not None:
        det.set_reference(refs)
    ours = det.predict(images, class_name="bottle")

    norm = det.backbone.normalize
    ref = copy.deepcopy(reference)
    if refs is not None:
        ref.setup(reference_images=norm(refs))
    with torch.no_grad():
        theirs = ref(norm(images))

    assert ours.anomaly_maps.shape == theirs.anomaly_map.shape == (2, 240, 240)
    score_diff = (ours.image_scores - theirs.pred_score).abs().max().item()
    map_diff = (ours.anomaly_maps - theirs.anomaly_map).abs().max().item()
    print(f"winclip {shots}-shot: max |score diff| {score_diff:.2e}, max |map diff| {map_diff:.2e}")
    assert score_diff < ATOL
    assert map_diff < ATOL
    # the maps carry real spatial structure, so agreement is not trivial
    assert theirs.anomaly_map.std() > 1e-4
