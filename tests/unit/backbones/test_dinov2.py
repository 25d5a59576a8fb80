"""The DINOv2 backbone family (clipad.backbones.dinov2) against the official dinov2 code.

Fixture ``tests/fixtures/dinov2/dinov2.safetensors``, made by ``tools/anomalydino_fixtures.py``
(AnomalyDINO @ b3435f0 and facebookresearch/dinov2's ``DinoVisionTransformer``): two small random
models in the official state-dict layout (a plain one: positional resize with ``scale_factor`` and
the +0.1 offset, no antialias; one with 4 registers: ``size=`` and antialias, as the hub's ``_reg``
builders), and their ``get_intermediate_layers`` outputs on non-square inputs of several sizes
(including the reg model's native grid, where no interpolation happens). The official code is not
needed at test time.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import clipad
from clipad import ClipadError, UnknownNameError, WeightsNotFound
from clipad.backbones import backbone_family, create_backbone, list_backbones
from clipad.backbones.dinov2 import DinoV2Config, convert_official_state_dict, create_dinov2_backbone

from _helpers import FIXTURES_DIR, report_max_diff
from _tolerance import float32_bound

FIXTURE = FIXTURES_DIR / "dinov2" / "dinov2.safetensors"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture():
    with safe_open(str(FIXTURE), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    return shapes, load_file(str(FIXTURE))


def _official_weights(tensors: dict[str, torch.Tensor], tag: str) -> dict[str, torch.Tensor]:
    prefix = f"{tag}.weights."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _backbone(shapes, tensors, tag: str, tmp_path: Path):
    """clipad's backbone loading the official-layout weights through its file path (.safetensors)."""
    s = shapes[tag]
    cfg = DinoV2Config(width=s["width"], depth=s["depth"], heads=s["heads"], patch_size=s["patch_size"],
                       img_size=s["img_size"], registers=s["registers"], interpolate_offset=s["interpolate_offset"],
                       interpolate_antialias=s["interpolate_antialias"])
    path = tmp_path / f"{tag}.safetensors"
    save_file(_official_weights(tensors, tag), str(path))
    return create_dinov2_backbone(f"fixture-{tag}", pretrained=path, config=cfg)


@pytest.mark.parametrize("tag", ["plain", "reg"])
def test_matches_official_dinov2(fixture, tag, tmp_path):
    shapes, tensors = fixture
    bb = _backbone(shapes, tensors, tag, tmp_path)
    depth = shapes[tag]["depth"]
    keys = sorted({k.rsplit(".", 1)[0] for k in tensors if k.startswith(f"{tag}.") and k.endswith(".input")})
    assert len(keys) == 3
    for key in keys:
        x = tensors[f"{key}.input"]
        with torch.no_grad():
            feats = bb.encode_image(x, layers=tuple(range(1, depth + 1)))
        h, w = x.shape[-2:]
        assert feats.grid == (h // 14, w // 14)
        # LayerNorm'd outputs are O(1); sums of width 32 .. 4 x 32 terms per output (MLP)
        tol = float32_bound(4 * 32 * depth, 8.0)
        assert report_max_diff("dinov2", f"{key} tokens", feats.tokens, tensors[f"{key}.tokens"]) <= tol
        assert report_max_diff("dinov2", f"{key} cls", feats.cls, tensors[f"{key}.cls"]) <= tol
        for layer in range(1, depth + 1):
            expected = tensors[f"{key}.tap{layer}"]
            assert feats.taps[layer].shape == expected.shape  # CLS + patches, registers removed
            assert report_max_diff("dinov2", f"{key} tap {layer}", feats.taps[layer], expected) <= tol


def test_positional_offset_matters(fixture, tmp_path):
    """The official scale_factor + 0.1 resize is not a size= resize: dropping the offset changes
    the tokens (so the fixture comparison above would catch it)."""
    shapes, tensors = fixture
    bb = _backbone(shapes, tensors, "plain", tmp_path)
    x = tensors["plain.70x98.input"]
    with torch.no_grad():
        ref = bb.encode_image(x).tokens
        bb.config = DinoV2Config(**{**bb.config.__dict__, "interpolate_offset": 0.0})
        other = bb.encode_image(x).tokens
    assert (ref - other).abs().max() > 1e-3


def test_official_layout_conversion_registers(fixture):
    """register_tokens -> reg_token; CLS's positional row folded into cls_token; mask_token dropped."""
    _, tensors = fixture
    official = _official_weights(tensors, "reg")
    converted = convert_official_state_dict(official)
    assert "mask_token" not in converted and "register_tokens" not in converted
    torch.testing.assert_close(converted["cls_token"], official["cls_token"] + official["pos_embed"][:, :1])
    assert converted["pos_embed"].shape[1] == official["pos_embed"].shape[1] - 1
    # a timm-layout dict passes unchanged
    assert convert_official_state_dict(converted).keys() == converted.keys()


def _tiny(**kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return create_backbone("tiny-dinov2", None, **kwargs)


def test_tiny_any_resolution_and_taps():
    bb = _tiny()
    assert bb.family == "dinov2" and bb.patch_size == (16, 16) and bb.native_grid == (7, 7)
    for h, w in ((64, 64), (112, 112), (48, 160)):
        x = bb.normalize(torch.rand(2, 3, h, w))
        with torch.no_grad():
            f = bb.encode_image(x, layers=(1, bb.depth))
        n = (h // 16) * (w // 16)
        assert f.grid == (h // 16, w // 16)
        assert f.tokens.shape == (2, n, bb.width) and f.cls.shape == (2, bb.width)
        assert f.taps[1].shape == (2, 1 + n, bb.width)
        # the final tokens are the last tap after the final norm
        torch.testing.assert_close(bb.model.norm(f.taps[bb.depth])[:, 1:], f.tokens)
    with pytest.raises(ClipadError, match="patch size"):
        bb.encode_image(torch.rand(1, 3, 50, 64))
    with pytest.raises(ClipadError, match="out of range"):
        bb.encode_image(torch.rand(1, 3, 64, 64), layers=(0,))
    with pytest.raises(ClipadError, match="text tower"):
        bb.encode_text(torch.zeros(1, 77, dtype=torch.long))


def test_tiny_is_seeded_and_warns():
    with pytest.warns(clipad.ClipadWarning, match="randomly initialised"):
        a = create_backbone("tiny-dinov2", None, seed=1)
    b, c = _tiny(seed=1), _tiny(seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.patch_embed.proj.weight"], sc["model.patch_embed.proj.weight"])


def test_names_and_errors(monkeypatch, tmp_path):
    names = list_backbones()
    for name in ("tiny", "ViT-B-16", "tiny-dinov2", "dinov2_vits14", "dinov2_vitg14_reg"):
        assert name in names
    assert backbone_family("dinov2_vitb14") == "dinov2" and backbone_family("ViT-B-16") == "clip"
    with pytest.raises(UnknownNameError, match="dinov2_vits14"):
        create_backbone("dinov2_vitx14", None)
    with pytest.raises(UnknownNameError, match="lvd142m"):
        create_backbone("dinov2_vits14", "laion2b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFound, match="dinov2_vits14.*lvd142m.*pretrained="):
        create_backbone("dinov2_vits14", "lvd142m")
    assert time.perf_counter() - t0 < 10
    with pytest.raises(Exception, match="quick_gelu"):
        create_backbone("tiny-dinov2", None, quick_gelu=True)


def test_official_file_from_torch_hub_cache(fixture, monkeypatch, tmp_path):
    """The official .pth where torch.hub leaves it is found for the tag, offline (tensor-only load)."""
    shapes, tensors = fixture
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    bb = _tiny()
    official = {k.removeprefix("model."): v for k, v in bb.state_dict().items()}
    official["mask_token"] = torch.zeros(1, bb.width)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from clipad.backbones import dinov2 as dmod

    cfg = dmod.dinov2_config("tiny-dinov2")
    monkeypatch.setitem(dmod._configs(), "fake_vits", DinoV2Config(**{**cfg.__dict__, "timm": "vit_small_patch14_dinov2",
                                                                       "file": "fake/fake_pretrain.pth"}))
    torch.save(official, hub / "fake_pretrain.pth")
    loaded = create_dinov2_backbone("fake_vits", "lvd142m")
    x = bb.normalize(torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x).tokens, bb.encode_image(x).tokens, rtol=0, atol=0)


def test_hf_hub_repo_from_local_cache(tmp_path, monkeypatch):
    """``hf-hub:<repo>`` (timm's layout) is read from the Hugging Face cache, offline."""
    bb = _tiny(seed=3)
    snapshot = tmp_path / "hub" / "models--timm--fake_dinov2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--timm--fake_dinov2" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--fake_dinov2" / "refs" / "main").write_text("abc123")
    save_file({k.removeprefix("model."): v.contiguous() for k, v in bb.state_dict().items()},
              str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = create_dinov2_backbone("tiny-dinov2", "hf-hub:timm/fake_dinov2", cache_dir=str(tmp_path / "hub"))
    x = bb.normalize(torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x).tokens, bb.encode_image(x).tokens)
    with pytest.raises(WeightsNotFound, match="offline"):
        create_dinov2_backbone("tiny-dinov2", "hf-hub:timm/other", cache_dir=str(tmp_path / "hub"))
