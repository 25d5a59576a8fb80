"""Tests of clipad.backbone on the tiny random CLIP.

The references are open_clip's own forward passes (``clip.encode_image``, ``clip.encode_text``,
forward hooks on its blocks, a model that open_clip itself builds at another resolution),
so what is checked is that clipad's token-stream view computes the same function.
"""

from __future__ import annotations

import math

import warnings

import open_clip
import pytest
import torch
from open_clip.model import resize_pos_embed

import clipad
from clipad import ClipadError
from clipad.backbones.clip import Backbone, _tiny_config, create_backbone, list_backbones

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0) -> Backbone:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return create_backbone("tiny", None, seed=seed)


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return _tiny(seed=0)


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Already-normalised inputs: what encode_image takes."""
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _hooked_block_outputs(blocks, run) -> list[torch.Tensor]:
    """Outputs of every block while ``run()`` executes open_clip's own forward."""
    outputs: list[torch.Tensor] = []
    handles = [blk.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for blk in blocks]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return outputs


def _open_clip_tiny_at(bb: Backbone, image_size) -> torch.nn.Module:
    """open_clip's CLIP with tiny's weights, built by open_clip for another input resolution
    (its loader interpolates the positional embedding with ``resize_pos_embed``)."""
    cfg = _tiny_config()
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": image_size}
    model = open_clip.model.CLIP(**cfg)
    state = {k: v.clone() for k, v in bb.clip.state_dict().items()}
    resize_pos_embed(state, model)
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- construction


def test_tiny_facts(bb: Backbone):
    assert bb.name == "tiny" and bb.pretrained is None
    assert bb.depth == len(bb.visual.transformer.resblocks) >= 2
    assert bb.patch_size == (16, 16)
    assert bb.native_grid == (14, 14)
    assert bb.embed_dim == bb.visual.proj.shape[1]
    assert not any(p.requires_grad for p in bb.parameters())
    assert not bb.clip.training
    assert 1 <= bb.layer_index(0.5) <= bb.depth
    assert bb.layer_index(0.0) == 1 and bb.layer_index(1.0) == bb.depth


def test_list_backbones():
    names = list_backbones()
    assert names[0] == "tiny"
    assert set(open_clip.list_models()) <= set(names)
    assert "ViT-B-16-plus-240" in clipad.list_backbones()


def test_random_init_warns():
    with pytest.warns(UserWarning, match="randomly initialised"):
        create_backbone("tiny", None, seed=0)


def test_same_seed_same_weights_different_seed_different():
    a, b, c = _tiny(7).clip.state_dict(), _tiny(7).clip.state_dict(), _tiny(8).clip.state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    random_params = [k for k, v in a.items() if v.is_floating_point() and v.numel() > 1 and v.std() > 0]
    assert random_params
    assert all(not torch.equal(a[k], c[k]) for k in random_params)


def test_seeding_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _tiny(5)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_backbone_lists_names():
    with pytest.raises(clipad.UnknownNameError, match="no-such-net") as info:
        create_backbone("no-such-net", None)
    assert "tiny" in str(info.value) and "ViT-L-14" in str(info.value)


def test_non_vit_tower_is_rejected():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        with pytest.raises(ClipadError, match="VisionTransformer"):
            create_backbone("RN50", None)


# --------------------------------------------------------------------------- image tower


def test_cls_matches_open_clip_at_native_resolution(bb: Backbone):
    x = _images(2, 224, 224)
    feats = bb.encode_image(x)
    ref = bb.clip.encode_image(x)
    assert feats.cls.shape == ref.shape == (2, bb.embed_dim)
    assert feats.grid == (14, 14)
    assert feats.tokens.shape == (2, 14 * 14, bb.width)
    torch.testing.assert_close(feats.cls, ref, rtol=0, atol=ATOL)


def test_taps_are_residual_stream_after_each_block(bb: Backbone):
    x = _images(2, 224, 224, seed=1)
    block_outputs = _hooked_block_outputs(bb.blocks, lambda: bb.clip.encode_image(x))
    assert len(block_outputs) == bb.depth
    layers = tuple(range(1, bb.depth + 1))
    feats = bb.encode_image(x, layers=layers)
    assert sorted(feats.taps) == list(layers)
    for layer in layers:
        tap = feats.taps[layer]
        assert tap.shape == (2, 1 + 14 * 14, bb.width)
        torch.testing.assert_close(tap, block_outputs[layer - 1], rtol=0, atol=ATOL)
    # a subset gives only those layers, with the same values
    some = bb.encode_image(x, layers=[bb.depth, 1])
    assert sorted(some.taps) == [1, bb.depth]
    torch.testing.assert_close(some.taps[1], feats.taps[1], rtol=0, atol=0)


def test_taps_checked_against_manual_block_loop(bb: Backbone):
    x = _images(1, 224, 224, seed=2)
    feats = bb.encode_image(x, layers=range(1, bb.depth + 1), keep_embeds=True)
    # before ln_pre, the embeddings are what open_clip's _embeds normalises
    torch.testing.assert_close(bb.visual.ln_pre(feats.embeds), bb.visual._embeds(x), rtol=0, atol=ATOL)
    h = bb.visual.ln_pre(feats.embeds)
    for i, blk in enumerate(bb.blocks, start=1):
        h = blk(h)
        torch.testing.assert_close(feats.taps[i], h, rtol=0, atol=ATOL)
    # the final tokens are the last residual stream after ln_post, class token dropped
    torch.testing.assert_close(feats.tokens, bb.visual.ln_post(h)[:, 1:], rtol=0, atol=ATOL)


def test_project_is_ln_post_then_proj(bb: Backbone):
    x = _images(2, 224, 224, seed=3)
    feats = bb.encode_image(x, layers=[1, bb.depth])
    tokens = feats.taps[1]
    expected = torch.nn.functional.layer_norm(
        tokens, (bb.width,), bb.visual.ln_post.weight, bb.visual.ln_post.bias, bb.visual.ln_post.eps
    ) @ bb.visual.proj
    projected = bb.project(tokens)
    assert projected.shape == (2, 1 + 14 * 14, bb.embed_dim)
    torch.testing.assert_close(projected, expected, rtol=0, atol=ATOL)
    # projecting the final class token gives the CLIP image embedding
    torch.testing.assert_close(bb.project(feats.taps[bb.depth][:, 0]), feats.cls, rtol=0, atol=ATOL)


def test_encode_sequences_runs_the_whole_tower(bb: Backbone):
    x = _images(2, 224, 224, seed=4)
    feats = bb.encode_image(x, keep_embeds=True)
    torch.testing.assert_close(bb.encode_sequences(feats.embeds), feats.cls, rtol=0, atol=ATOL)


def test_native_positional_embedding_is_identity(bb: Backbone):
    native = bb.visual.positional_embedding
    for mode in ("bicubic", "bilinear", "nearest"):
        pos = bb.positional_embedding(bb.native_grid, mode)
        assert pos.shape == native.shape
        assert torch.equal(pos, native)


@pytest.mark.parametrize("size", [(320, 320), (240, 320), (160, 160)], ids=["320", "240x320", "160"])
def test_other_resolutions_match_open_clip_built_at_that_size(bb: Backbone, size):
    """A non-native input equals open_clip's model built for that size (its own pos-embed resize)."""
    h, w = size
    grid = (h // 16, w // 16)
    x = _images(2, h, w, seed=5)
    ref_model = _open_clip_tiny_at(bb, size)
    block_outputs = _hooked_block_outputs(ref_model.visual.transformer.resblocks, lambda: ref_model.encode_image(x))
    ref_cls = ref_model.encode_image(x)

    feats = bb.encode_image(x, layers=[1, bb.depth])
    assert feats.grid == grid
    assert feats.tokens.shape == (2, grid[0] * grid[1], bb.width)
    assert feats.taps[1].shape == (2, 1 + grid[0] * grid[1], bb.width)
    pos = bb.positional_embedding(grid)
    assert pos.shape == (1 + grid[0] * grid[1], bb.width)
    assert torch.equal(pos[0], bb.visual.positional_embedding[0])  # the class position is kept
    torch.testing.assert_close(pos, ref_model.visual.positional_embedding, rtol=0, atol=ATOL)
    torch.testing.assert_close(feats.taps[1], block_outputs[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(feats.cls, ref_cls, rtol=0, atol=ATOL)


def test_other_interpolation_modes_work(bb: Backbone):
    x = _images(1, 240, 320, seed=6)
    bicubic = bb.encode_image(x).cls
    bilinear = bb.encode_image(x, pos_interp="bilinear").cls
    assert bilinear.shape == bicubic.shape and torch.isfinite(bilinear).all()
    assert not torch.allclose(bilinear, bicubic)
    expected = torch.nn.functional.interpolate(
        bb.visual.positional_embedding[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2),
        size=(15, 20), mode="bilinear", align_corners=False,
    ).permute(0, 2, 3, 1).reshape(15 * 20, -1)
    torch.testing.assert_close(bb.positional_embedding((15, 20), "bilinear")[1:], expected, rtol=0, atol=ATOL)


def _plain_bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of plain bicubic resampling (Keys, A = -0.75, half-pixel centres,
    edge indices clamped), written out as a loop: the reference of "bicubic-plain"."""
    a, scale = -0.75, n_in / n_out

    def cubic(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            m[o, min(max(k, 0), n_in - 1)] += cubic(src - k)
    return m


def test_plain_bicubic_positional_embedding(bb: Backbone):
    """MuSc's and AdaCLIP's vendored open_clip resize the table with plain bicubic (no antialias):
    "bicubic-plain" equals the explicit separable Keys kernel and differs from open_clip's."""
    g0 = bb.native_grid[0]
    table = bb.visual.positional_embedding[1:].double().reshape(g0, g0, -1)
    rows, cols = _plain_bicubic_matrix(g0, 15), _plain_bicubic_matrix(g0, 20)
    expected = torch.einsum("ri,ijc,sj->rsc", rows, table, cols).reshape(15 * 20, -1)
    got = bb.positional_embedding((15, 20), "bicubic-plain")
    torch.testing.assert_close(got[1:].double(), expected, rtol=0, atol=ATOL)
    assert torch.equal(got[0], bb.visual.positional_embedding[0])
    assert (got - bb.positional_embedding((15, 20), "bicubic")).abs().max() > 100 * ATOL
    x = _images(1, 240, 320, seed=6)
    assert not torch.allclose(bb.encode_image(x, pos_interp="bicubic-plain").cls, bb.encode_image(x).cls)


def test_normalize_uses_clip_mean_and_std(bb: Backbone):
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(bb.normalize(x), (x - mean) / std)


@pytest.mark.parametrize("layers", [(0,), (5,), (-1,), (1, 99)])
def test_layer_out_of_range(bb: Backbone, layers):
    bad = [layer for layer in layers if not 1 <= layer <= bb.depth]
    with pytest.raises(ClipadError, match=r"out of range") as info:
        bb.encode_image(_images(1, 224, 224), layers=layers)
    assert str(bad) in str(info.value) and f"1..{bb.depth}" in str(info.value)


@pytest.mark.parametrize("size", [(230, 224), (224, 230), (8, 8)])
def test_input_not_multiple_of_patch(bb: Backbone, size):
    with pytest.raises(ClipadError, match="multiple of the patch size") as info:
        bb.encode_image(_images(1, *size))
    assert "16x16" in str(info.value)


# --------------------------------------------------------------------------- text tower

PROMPTS = [
    "a",
    "a photo of a bottle.",
    "a cropped photo of the flawless metal nut without defect for visual inspection.",
    "",
    # longer than the context: the tokenizer truncates it, the EOT lands on the last position
    " ".join(["damaged"] * 100),
]


def test_tokenize_shape_and_device(bb: Backbone):
    ids = bb.tokenize(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    assert ids.device == bb.device
    eot = ids.argmax(dim=-1)
    assert len(set(eot.tolist())) == len(PROMPTS)  # really different lengths
    assert int(eot.max()) == 76


def test_encode_text_matches_open_clip(bb: Backbone):
    ids = bb.tokenize(PROMPTS)
    ours = bb.encode_text(ids)
    ref = bb.clip.encode_text(ids)
    assert ours.shape == ref.shape == (len(PROMPTS), bb.embed_dim)
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)


def test_encode_text_of_short_batch_matches_open_clip(bb: Backbone):
    """All prompts short: the truncated sequence is much shorter than the context."""
    ids = bb.tokenize(PROMPTS[:3])
    assert int(ids.argmax(dim=-1).max()) < 20
    torch.testing.assert_close(bb.encode_text(ids), bb.clip.encode_text(ids), rtol=0, atol=ATOL)


def test_encode_text_is_per_prompt(bb: Backbone):
    """A prompt's embedding does not depend on the other prompts of the batch (cut length)."""
    together = bb.encode_text(bb.tokenize(PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        alone = bb.encode_text(bb.tokenize([prompt]))[0]
        torch.testing.assert_close(alone, together[i], rtol=0, atol=ATOL)


def test_non_vit_backbones_are_rejected_before_building():
    import clipad
    from clipad.errors import ClipadError

    for name in ("RN50", "convnext_base"):
        with pytest.raises(ClipadError, match="no plain ViT image tower"):
            clipad.create_detector("winclip", backbone=name, pretrained=None, device="cpu")


def test_non_finite_pixels_are_rejected():
    import clipad
    from clipad.errors import ClipadError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = clipad.create_detector("winclip", backbone="tiny", pretrained=None, device="cpu")
    x = torch.rand(1, 3, 240, 240)
    x[0, 1, 5, 5] = float("nan")
    with pytest.raises(ClipadError, match="NaN or infinite"):
        det.predict(x)
    with pytest.raises(ClipadError, match=r"images\[1\] contains NaN"):
        det.predict([torch.rand(3, 240, 240), x[0]])


# -- fused blocks (clipad.blocks) ----------------------------------------------------------------
def test_fused_block_equals_open_clip_block():
    """residual_block (batch-first, SDPA) computes open_clip's own block forward."""
    import open_clip

    from clipad.backbones.blocks import fusable, residual_block

    torch.manual_seed(0)
    blk = open_clip.transformer.ResidualAttentionBlock(64, 4, ls_init_value=0.5).eval()
    x = torch.randn(3, 17, 64)
    assert fusable(blk)
    with torch.no_grad():
        torch.testing.assert_close(residual_block(blk, x), blk(x), rtol=1e-5, atol=1e-5)


def test_unfusable_block_runs_its_own_forward():
    from clipad.backbones.blocks import fusable, residual_block

    class Custom(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    x = torch.randn(2, 5, 8)
    assert not fusable(Custom())
    assert torch.equal(residual_block(Custom(), x), 2 * x)
