"""Tests of weight resolution (clipad.weights via create_backbone / create_detector).

Local files of every supported kind are made here from the tiny model; nothing is downloaded.
The offline tests give clipad an empty Hugging Face cache and home directory and a network that
is down (or hangs), and check that it fails fast with a message that says what to do.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import clipad
from clipad import ClipadError, UnknownNameError, WeightsNotFound
from clipad.backbones import weights as weights_mod
from clipad.backbones.clip import _tiny_config, create_backbone

SOURCE_SEED = 11  # != create_backbone's default seed 0, so a load that did nothing is caught
OPENAI_KEYS = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_tiny(seed: int):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return create_backbone("tiny", None, seed=seed)


@pytest.fixture(scope="module")
def source_sd() -> dict[str, torch.Tensor]:
    """tiny's weights with a non-default seed: what every file below holds."""
    return {k: v.clone().contiguous() for k, v in _random_tiny(SOURCE_SEED).clip.state_dict().items()}


def _load_strict(pretrained):
    """create_backbone from a file: must not warn about random weights."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*randomly initialised.*")
        return create_backbone("tiny", pretrained)


def _assert_same_weights(bb, expected: dict[str, torch.Tensor]) -> None:
    got = bb.clip.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def _gelu_name(bb) -> str:
    return type(bb.clip.visual.transformer.resblocks[0].mlp.gelu).__name__


# --------------------------------------------------------------------------- random init


def test_none_is_random_with_warning(source_sd):
    with pytest.warns(UserWarning, match="randomly initialised") as record:
        bb = create_backbone("tiny", None, seed=SOURCE_SEED)
    assert "pretrained=None" in str(record[0].message)
    assert bb.pretrained is None
    _assert_same_weights(bb, source_sd)  # seeded: the same seed gives the same weights
    assert _gelu_name(bb) == "GELU"


def test_random_weights_differ_from_file_weights(source_sd):
    default = _random_tiny(0).clip.state_dict()
    assert not torch.equal(default["visual.conv1.weight"], source_sd["visual.conv1.weight"])


# --------------------------------------------------------------------------- local files


def test_safetensors_file(tmp_path: Path, source_sd):
    path = tmp_path / "tiny.safetensors"
    save_file(source_sd, str(path))
    bb = _load_strict(path)
    _assert_same_weights(bb, source_sd)
    assert _gelu_name(bb) == "GELU"
    assert bb.pretrained == str(path)
    _assert_same_weights(_load_strict(str(path)), source_sd)  # str or Path


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_torch_state_dict_file(tmp_path: Path, source_sd, suffix: str):
    path = tmp_path / f"tiny{suffix}"
    torch.save(source_sd, path)
    bb = _load_strict(path)
    _assert_same_weights(bb, source_sd)
    assert _gelu_name(bb) == "GELU"


def test_training_checkpoint_with_wrapped_prefixed_state_dict(tmp_path: Path, source_sd):
    """open_clip training checkpoints: {"epoch", "state_dict": {"module.<name>": ...}}."""
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source_sd.items()}}, path)
    _assert_same_weights(_load_strict(path), source_sd)


def test_openai_state_dict_loads_with_quick_gelu(tmp_path: Path, source_sd):
    path = tmp_path / "openai-style.pt"
    torch.save({**source_sd, **OPENAI_KEYS}, path)
    bb = _load_strict(path)
    assert _gelu_name(bb) == "QuickGELU"
    _assert_same_weights(bb, source_sd)
    # QuickGELU is really used: the image embedding differs from the GELU model's
    plain = tmp_path / "plain.pt"
    torch.save(source_sd, plain)
    x = torch.randn(1, 3, 224, 224)
    assert not torch.allclose(bb.encode_image(x).cls, _load_strict(plain).encode_image(x).cls)


def test_quick_gelu_can_be_forced(tmp_path: Path, source_sd):
    path = tmp_path / "tiny.safetensors"
    save_file(source_sd, str(path))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*randomly initialised.*")
        bb = create_backbone("tiny", path, quick_gelu=True)
    assert _gelu_name(bb) == "QuickGELU"


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose state_dict() is ``state``, as OpenAI's released .pt files:
    a module tree with the same parameter names, compiled with torch.jit.script."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if name not in module._modules:
                module.add_module(name, _Holder())
            module = module._modules[name]
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecation notes of torch.jit itself
def test_torchscript_archive_loads_with_quick_gelu(tmp_path: Path, source_sd):
    path = tmp_path / "ViT-tiny.pt"
    _torchscript_archive({**source_sd, **OPENAI_KEYS}, path)
    assert weights_mod.is_torchscript_archive(path)
    bb = _load_strict(path)
    assert _gelu_name(bb) == "QuickGELU"
    _assert_same_weights(bb, source_sd)


class _Payload:
    """Unpickling this object creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_object_is_never_unpickled(tmp_path: Path, source_sd):
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists(), "the payload must work, or this test proves nothing"

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({**source_sd, "payload": _Payload(marker)}, path)
    with pytest.raises(WeightsNotFound, match="tensor-only") as info:
        create_backbone("tiny", path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    with pytest.raises(ClipadError):
        clipad.create_detector("winclip", backbone="tiny", pretrained=path, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param([torch.zeros(2)], id="list"),
        pytest.param({}, id="empty-dict"),
        pytest.param({1: torch.zeros(2)}, id="int-keys"),
        pytest.param({"visual.proj": [1, 2, 3]}, id="non-tensor-value"),
        pytest.param(torch.zeros(3), id="bare-tensor"),
    ],
)
def test_pickle_without_a_state_dict(tmp_path: Path, content):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(WeightsNotFound) as info:
        create_backbone("tiny", path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.pt", "garbage.bin"])
def test_corrupt_file(tmp_path: Path, name: str):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 definitely not a checkpoint " * 10)
    with pytest.raises(WeightsNotFound) as info:
        create_backbone("tiny", path)
    assert str(path) in str(info.value)


def test_directory_is_an_error(tmp_path: Path):
    with pytest.raises(WeightsNotFound, match="directory") as info:
        create_backbone("tiny", tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("name", ["missing.safetensors", "missing.pt", os.path.join("sub", "weights")])
def test_missing_path_names_it(tmp_path: Path, name: str):
    missing = str(tmp_path / name)
    with pytest.raises(WeightsNotFound, match="does not exist") as info:
        create_backbone("tiny", missing)
    assert missing in str(info.value)
    with pytest.raises(WeightsNotFound, match="does not exist"):
        clipad.create_detector("winclip", backbone="ViT-B-16-plus-240", pretrained=missing, device="cpu")


def test_unknown_tag_lists_real_tags():
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-16-plus-240")
    assert tags
    with pytest.raises(UnknownNameError, match="laion400m_e99") as info:
        clipad.create_detector("winclip", backbone="ViT-B-16-plus-240", pretrained="laion400m_e99", device="cpu")
    for tag in tags:
        assert tag in str(info.value)


def test_tiny_has_no_tags():
    with pytest.raises(UnknownNameError, match="local file"):
        create_backbone("tiny", "openai")


def _other_tiny_state(**vision) -> dict[str, torch.Tensor]:
    cfg = _tiny_config()
    cfg["vision_cfg"] = {**cfg["vision_cfg"], **vision}
    return {k: v.contiguous() for k, v in open_clip.model.CLIP(**cfg).state_dict().items()}


@pytest.mark.parametrize("vision", [{"layers": 3}, {"width": 32}], ids=["depth", "width"])
def test_wrong_architecture_does_not_fit(tmp_path: Path, vision):
    path = tmp_path / "other.safetensors"
    save_file(_other_tiny_state(**vision), str(path))
    with pytest.raises(ClipadError, match="do not fit") as info:
        create_backbone("tiny", path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- QuickGELU or GELU
#
# Architectures and tags below are tiny's config registered in open_clip's own tables for the
# test, so that every rule runs through open_clip's real lookups at tiny's cost:
# - "ViT-tiny-qg-quickgelu": a '-quickgelu' name (config flag quick_gelu=True), like ViT-L-14-336-quickgelu;
# - "ViT-tiny-qg-openai": releases are only 'openai' (QuickGELU), like ViT-L-14-336;
# - "ViT-tiny-qg-mixed": releases of both kinds, like ViT-L-14 ('openai' vs 'laion2b...').

QG_NAME, QG_OPENAI, QG_MIXED = "ViT-tiny-qg-quickgelu", "ViT-tiny-qg-openai", "ViT-tiny-qg-mixed"


@pytest.fixture
def qg_archs(monkeypatch):
    from open_clip import factory, pretrained

    monkeypatch.setitem(factory._MODEL_CONFIGS, QG_NAME, {**_tiny_config(), "quick_gelu": True})
    monkeypatch.setitem(factory._MODEL_CONFIGS, QG_OPENAI, _tiny_config())
    monkeypatch.setitem(factory._MODEL_CONFIGS, QG_MIXED, _tiny_config())
    monkeypatch.setitem(pretrained._PRETRAINED, QG_NAME, {"openai": {"quick_gelu": True}})
    monkeypatch.setitem(pretrained._PRETRAINED, QG_OPENAI, {"openai": {"quick_gelu": True}})
    monkeypatch.setitem(pretrained._PRETRAINED, QG_MIXED, {"openai": {"quick_gelu": True}, "laion2b_x": {"quick_gelu": False}})


def _open_clip_tiny(state: dict[str, torch.Tensor], quick_gelu: bool) -> nn.Module:
    """The reference: open_clip's own CLIP, built with the given activation and loaded with ``state``."""
    model = open_clip.model.CLIP(**_tiny_config(), quick_gelu=quick_gelu)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _assert_computes(bb, reference: nn.Module) -> None:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    ids = bb.tokenize(["a photo of a flawless object", "a photo of a damaged object"])
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(x).cls, reference.encode_image(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bb.encode_text(ids), reference.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_quickgelu_architecture_name_builds_with_quick_gelu(tmp_path: Path, source_sd, qg_archs):
    """The '-quickgelu' config flag used to be passed twice (TypeError: multiple values for 'quick_gelu')."""
    path = tmp_path / "weights.pt"
    torch.save(source_sd, path)
    bb = create_backbone(QG_NAME, path)
    assert bb.quick_gelu and _gelu_name(bb) == "QuickGELU"
    _assert_computes(bb, _open_clip_tiny(source_sd, quick_gelu=True))
    det = clipad.create_detector("winclip", backbone=QG_NAME, pretrained=path, device="cpu", image_size=224)
    assert det.backbone.quick_gelu
    assert create_backbone(QG_NAME, path, quick_gelu=True).quick_gelu


def test_quickgelu_name_contradicted_is_one_clear_error(tmp_path: Path, source_sd, qg_archs):
    path = tmp_path / "weights.pt"
    torch.save(source_sd, path)
    with pytest.raises(clipad.InvalidValueError, match="quick_gelu=False contradicts the backbone name") as info:
        create_backbone(QG_NAME, path, quick_gelu=False)
    assert QG_NAME in str(info.value) and "ViT-tiny-qg'" in str(info.value)  # names the GELU architecture
    with pytest.raises(clipad.InvalidValueError, match="contradicts"):
        clipad.create_detector("winclip", backbone=QG_NAME, pretrained=path, device="cpu", quick_gelu=False)


def test_real_quickgelu_architecture_builds():
    """open_clip's own '-quickgelu' config (random weights: no download; ~3 s on one core)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        bb = create_backbone("ViT-B-32-quickgelu", None)
        assert bb.quick_gelu
        assert not create_backbone("ViT-B-32", None).quick_gelu  # the plain name stays GELU
        with pytest.raises(clipad.InvalidValueError, match="ViT-B-32-quickgelu"):
            create_backbone("ViT-B-32-quickgelu", None, quick_gelu=False)


def test_openai_code_state_dict_without_input_resolution_gets_quick_gelu(tmp_path: Path, source_sd, qg_archs):
    """``model.state_dict()`` of OpenAI's code has no input_resolution entry and open_clip's keys; for
    an architecture whose only release is OpenAI's it is run with QuickGELU, i.e. it computes what
    open_clip's model built with quick_gelu=True computes."""
    path = tmp_path / "openai-code.pt"
    torch.save(source_sd, path)
    sd, is_openai = weights_mod.read_state_dict(path)
    assert not is_openai  # nothing in the file says so: the architecture's releases decide
    bb = create_backbone(QG_OPENAI, path)
    assert bb.quick_gelu
    _assert_computes(bb, _open_clip_tiny(source_sd, quick_gelu=True))
    # and it is not what the GELU model computes (the activation really matters here)
    gelu = _open_clip_tiny(source_sd, quick_gelu=False)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert not torch.allclose(bb.encode_image(x).cls, gelu.encode_image(x), atol=1e-4)


def test_file_of_mixed_releases_needs_a_choice(tmp_path: Path, source_sd, qg_archs):
    path = tmp_path / "weights.safetensors"
    save_file(source_sd, str(path))
    with pytest.raises(ClipadError, match="cannot tell") as info:
        create_backbone(QG_MIXED, path)
    message = str(info.value)
    assert str(path) in message and QG_MIXED in message
    assert "openai" in message and "laion2b_x" in message  # which releases use which activation
    assert "quick_gelu=True" in message and "--quick-gelu on" in message
    with pytest.raises(ClipadError, match="cannot tell"):
        clipad.create_detector("winclip", backbone=QG_MIXED, pretrained=path, device="cpu")
    quick = create_backbone(QG_MIXED, path, quick_gelu=True)
    _assert_computes(quick, _open_clip_tiny(source_sd, quick_gelu=True))
    plain = create_backbone(QG_MIXED, path, quick_gelu=False)
    assert not plain.quick_gelu
    _assert_computes(plain, _open_clip_tiny(source_sd, quick_gelu=False))
    det = clipad.create_detector("winclip", backbone=QG_MIXED, pretrained=path, device="cpu", quick_gelu=True)
    assert det.backbone.quick_gelu


@pytest.mark.parametrize("flag, expected", [("on", True), ("off", False), ("auto", None)])
def test_cli_quick_gelu_flag(tmp_path: Path, source_sd, qg_archs, flag, expected):
    from clipad.cli import build_parser
    from clipad.cli.common import build_detector

    path = tmp_path / "weights.safetensors"
    save_file(source_sd, str(path))
    args = build_parser().parse_args(
        ["predict", "x.png", "--backbone", QG_MIXED, "--pretrained", str(path), "--device", "cpu", "--quick-gelu", flag]
    )
    if expected is None:  # auto, and nothing tells: the error says which flag to pass
        with pytest.raises(ClipadError, match="--quick-gelu on"):
            build_detector(args)
    else:
        assert build_detector(args).backbone.quick_gelu is expected


def test_file_marked_openai_wins_over_mixed_releases(tmp_path: Path, source_sd, qg_archs):
    path = tmp_path / "openai-style.pt"
    torch.save({**source_sd, **OPENAI_KEYS}, path)
    assert create_backbone(QG_MIXED, path).quick_gelu


def test_tag_decides_and_cannot_be_contradicted(tmp_path: Path, source_sd, qg_archs, monkeypatch):
    """open_clip's record for a tag: 'openai' -> QuickGELU, a GELU release -> GELU."""
    path = tmp_path / "cached.safetensors"
    save_file(source_sd, str(path))
    monkeypatch.setattr(weights_mod, "_cached_tag_file", lambda cfg, cache_dir: path)
    assert create_backbone(QG_MIXED, "openai").quick_gelu
    assert not create_backbone(QG_MIXED, "laion2b_x").quick_gelu
    with pytest.raises(clipad.InvalidValueError, match="tag 'openai'"):
        create_backbone(QG_MIXED, "openai", quick_gelu=False)
    with pytest.raises(clipad.InvalidValueError, match="tag 'laion2b_x'"):
        create_backbone(QG_MIXED, "laion2b_x", quick_gelu=True)


def test_openai_file_contradicted_is_an_error(tmp_path: Path, source_sd):
    path = tmp_path / "openai-style.pt"
    torch.save({**source_sd, **OPENAI_KEYS}, path)
    with pytest.raises(clipad.InvalidValueError, match="OpenAI checkpoint") as info:
        create_backbone("tiny", path, quick_gelu=False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("value", ["on", 1, "auto"])
def test_quick_gelu_must_be_none_or_bool(value):
    with pytest.raises(clipad.ClipadError, match="quick_gelu must be None"):
        create_backbone("tiny", None, quick_gelu=value)


def test_quick_gelu_of_random_weights_follows_the_request():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        assert create_backbone("tiny", None, quick_gelu=True).quick_gelu
        assert not create_backbone("tiny", None).quick_gelu


# --------------------------------------------------------------------------- offline


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch):
    """No cached weights anywhere clipad or open_clip looks, and no download can start."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "home"
    (home / ".cache" / "clip").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("CLIPAD_OFFLINE", raising=False)
    # huggingface_hub reads its cache location once, at import
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    downloads: list = []

    def no_download(cfg, cache_dir):
        downloads.append(cfg)
        raise AssertionError("a test must never download")

    monkeypatch.setattr(weights_mod, "_download_tag", no_download)
    return downloads


def _assert_offline_error(exc: WeightsNotFound) -> None:
    message = str(exc)
    assert "ViT-B-16-plus-240" in message
    assert "laion400m_e31" in message
    assert "pretrained=" in message and "local file" in message and ".safetensors" in message


def _create_default_winclip():
    return clipad.create_detector("winclip", backbone="ViT-B-16-plus-240", pretrained="laion400m_e31", device="cpu")


def test_offline_unreachable_fails_fast(empty_caches, monkeypatch):
    attempts: list = []

    def unreachable(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.monotonic()
    with pytest.raises(WeightsNotFound) as info:
        _create_default_winclip()
    elapsed = time.monotonic() - start
    assert elapsed < 10.0
    _assert_offline_error(info.value)
    assert "cannot be reached" in str(info.value)
    assert len(attempts) == 1  # one probe, no retry storm
    assert empty_caches == []


def test_offline_hanging_network_fails_fast(empty_caches, monkeypatch):
    """DNS or connect that never answers: the probe gives up on its own time limit."""
    release = threading.Event()

    def hang(address, *args, **kwargs):
        release.wait(60)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        start = time.monotonic()
        with pytest.raises(WeightsNotFound) as info:
            _create_default_winclip()
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert elapsed < 10.0
    _assert_offline_error(info.value)
    assert empty_caches == []


def test_hf_hub_offline_fails_without_touching_the_network(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE=1 must not open a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.monotonic()
    with pytest.raises(WeightsNotFound) as info:
        _create_default_winclip()
    assert time.monotonic() - start < 10.0
    _assert_offline_error(info.value)
    assert "offline" in str(info.value)
    assert empty_caches == []


def test_cached_tag_file_is_found_offline(empty_caches, monkeypatch, tmp_path: Path):
    """A tag whose file sits in ~/.cache/clip (OpenAI-era URL download) is used without network."""
    cfg = open_clip.get_pretrained_cfg("ViT-B-16-plus-240", "laion400m_e31")
    cached = Path(os.environ["HOME"]) / ".cache" / "clip" / os.path.basename(cfg["url"])
    cached.write_bytes(b"stand-in")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = weights_mod.resolve("ViT-B-16-plus-240", "laion400m_e31")
    assert source.kind == "tag" and source.tag == "laion400m_e31"
    assert source.path == cached


# --------------------------------------------------------------------------- config activation (MuSc, AdaCLIP)


def test_config_activation_runs_gelu_with_openai_weights(tmp_path: Path, source_sd):
    """The official code of MuSc and AdaCLIP rebuilds CLIP from the JSON config (GELU) and loads
    OpenAI's QuickGELU-trained weights into it: config_activation=True reproduces that."""
    path = tmp_path / "openai-style.pt"
    torch.save({**source_sd, **OPENAI_KEYS}, path)
    bb = create_backbone("tiny", path, config_activation=True)
    assert _gelu_name(bb) == "GELU"
    _assert_same_weights(bb, source_sd)
    # what such a detector records (quick_gelu=False) reloads without the contradiction error
    again = create_backbone("tiny", path, quick_gelu=False, config_activation=True)
    assert _gelu_name(again) == "GELU"
    # an explicit request still wins, and a '-quickgelu' name is still checked
    assert create_backbone("tiny", path, quick_gelu=True, config_activation=True).quick_gelu


def test_config_activation_keeps_a_quickgelu_architecture(tmp_path: Path, source_sd, qg_archs):
    path = tmp_path / "w.safetensors"
    save_file(source_sd, str(path))
    assert create_backbone(QG_NAME, path, config_activation=True).quick_gelu
    with pytest.raises(clipad.InvalidValueError, match="quickgelu"):
        create_backbone(QG_NAME, path, quick_gelu=False, config_activation=True)
