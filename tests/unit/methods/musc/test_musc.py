"""MuSc: fidelity to the official code and the properties of its set-level maths.

Fidelity fixtures: ``tests/fixtures/musc/`` made by ``tools/musc_fixtures.py`` from the official
code (github.com/xrli-U/MuSc, commit b76b93da8bd3096a99964a96ae29d46f197a0651) run unmodified on
a random 12-block CLIP (native 48 px, run at 64 px: GELU MLPs and a plain-bicubic positional
embedding, quirks 1-2; and at the native 48 px: QuickGELU) and 10 generated images. clipad
must reproduce its maps and scores (before and after RsCIN) within 1e-5, fp32 on CPU.

The other tests check properties against independent slow references: permutation
equivariance of a set, the too-few-images error, chunked mutual scoring against an explicit
loop over image pairs, RsCIN against a numpy loop.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import clipad
from clipad.backbones.clip import create_backbone
from clipad.errors import InvalidValueError
from clipad.methods.musc import MuSc
from clipad.methods.musc.model import interval_bounds, lnamd, min_images, mutual_scores, rscin
from clipad.methods.musc.options import MuScOptions

from _helpers import FIXTURES_DIR, random_images, report_max_diff, tiny_detector

FIXTURES = FIXTURES_DIR / "musc"
OFFICIAL_COMMIT = "b76b93da8bd3096a99964a96ae29d46f197a0651"
ATOL = 1e-5  # the fidelity contract: fp32 on CPU

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory) -> tuple[str, Path, dict, dict[str, torch.Tensor]]:
    """(architecture name, OpenAI-layout weights file, header, expected) of the fixture: the
    architecture joins open_clip's registry (a JSON config, public ``add_model_config``) so that
    clipad builds it through its ordinary factory, weights file and all."""
    import open_clip

    with safe_open(str(FIXTURES / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["official_commit"] == OFFICIAL_COMMIT
    arch, cfg = meta["arch"], json.loads(meta["config"])
    tmp = tmp_path_factory.mktemp("musc")
    if arch not in open_clip.list_models():
        (tmp / f"{arch}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(tmp / f"{arch}.json")
    stored = {k: v.float() for k, v in load_file(str(FIXTURES / "model.safetensors")).items()}
    # the fixture holds the image tower; the text tower (random here) cannot affect any output
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = open_clip.model.CLIP(**cfg).state_dict()
    weights.update({k: v for k, v in stored.items() if k.startswith("visual.")})
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    path = tmp / "clip.pt"
    torch.save({**weights, "input_resolution": torch.tensor(vision["image_size"]),
                "context_length": torch.tensor(text["context_length"]), "vocab_size": torch.tensor(text["vocab_size"])}, path)
    dino = tmp / "dinov2_tiny_pretrain.pth"  # the official layout, as torch.hub's file
    torch.save({k.removeprefix("dinov2."): v for k, v in stored.items() if k.startswith("dinov2.")}, dino)
    return arch, {"clip": path, "dinov2": dino}, meta, load_file(str(FIXTURES / "expected.safetensors"))


def _images(expected: dict[str, torch.Tensor], run: str) -> torch.Tensor:
    run = "native" if run == "dinov2" else run  # the DINOv2 run scored the native run's images
    return expected[f"{run}/images"].permute(0, 3, 1, 2).float() / 255.0


def _check_run(det: clipad.Detector, expected: dict[str, torch.Tensor], run: str) -> None:
    x = _images(expected, run)
    # the batches do not matter: the backbone runs 3 images at a time, MSM sees all 10
    pred = det.predict(x, batch_size=3, calibrated=False)
    assert report_max_diff("musc", f"{run} maps", pred.anomaly_maps, expected[f"{run}/maps"]) <= ATOL
    assert report_max_diff("musc", f"{run} scores", pred.image_scores, expected[f"{run}/scores"]) <= ATOL
    # the raw scores (before RsCIN) and the class tokens, from the parts
    norm = det.backbone.normalize(x)
    _, cls = det._features(norm)
    assert report_max_diff("musc", f"{run} class tokens", cls, expected[f"{run}/class_tokens"]) <= ATOL
    raw = pred.anomaly_maps.flatten(1).amax(1).double()
    assert report_max_diff("musc", f"{run} raw scores", raw, expected[f"{run}/raw_scores"]) <= ATOL


def test_fidelity_main_run_through_create_detector(fixture_model):
    """64 px on a 48 px model: GELU MLPs (config_activation) and a plain-bicubic positional embedding."""
    arch, paths, _, expected = fixture_model
    det = clipad.create_detector("musc", backbone=arch, pretrained=str(paths["clip"]), device="cpu", image_size=64,
                                 precision="fp32")
    assert not det.backbone.quick_gelu  # quirk 1: OpenAI weights run with the config's GELU
    _check_run(det, expected, "main")


def test_fidelity_native_size_keeps_quick_gelu(fixture_model):
    """At the checkpoint's own size the official loader keeps OpenAI's QuickGELU."""
    arch, paths, _, expected = fixture_model
    opts = MuScOptions(image_size=48, precision="fp32")
    assert MuSc.backbone_options(opts, arch) == {}
    assert MuSc.backbone_options(MuScOptions(image_size=64), arch) == {"config_activation": True}
    det = MuSc(create_backbone(arch, str(paths["clip"]), **MuSc.backbone_options(opts, arch)), opts).eval()
    assert det.backbone.quick_gelu
    _check_run(det, expected, "native")


def test_fidelity_dinov2(fixture_model):
    """The official DINOv2 branch: taps through the final norm, un-normalised class tokens."""
    _, paths, _, expected = fixture_model
    det = clipad.create_detector("musc", backbone="tiny-dinov2", pretrained=str(paths["dinov2"]), device="cpu",
                                 image_size=48, precision="fp32")
    _check_run(det, expected, "dinov2")


def test_fidelity_rscin_visa_k_list(fixture_model):
    *_, expected = fixture_model
    ours = rscin(expected["main/raw_scores"], expected["main/class_tokens"], (1, 8, 9))
    assert report_max_diff("musc", "RsCIN k (1, 8, 9)", ours, expected["main/scores_visa"]) <= ATOL
    ours = rscin(expected["main/raw_scores"], expected["main/class_tokens"], (1, 2, 3))
    assert report_max_diff("musc", "RsCIN k (1, 2, 3)", ours, expected["main/scores"]) <= ATOL


def test_quirks_matter_on_the_fixture(fixture_model):
    """The faithful activation is visible at the fixture's size: QuickGELU (what the weights
    were made with) moves the maps by far more than the tolerance."""
    arch, paths, _, expected = fixture_model
    x = _images(expected, "main")
    quick = clipad.create_detector("musc", backbone=arch, pretrained=str(paths["clip"]), device="cpu", image_size=64,
                                   precision="fp32", quick_gelu=True)
    assert quick.backbone.quick_gelu
    diff = (quick.predict(x, calibrated=False).anomaly_maps - expected["main/maps"]).abs().max().item()
    assert diff > 10 * ATOL


# --------------------------------------------------------------------------- set behaviour


@pytest.fixture(scope="module")
def tiny() -> MuSc:
    return tiny_detector("musc", image_size=64)


def test_min_set_size_and_error(tiny: MuSc):
    # k = int(0.3 (N - 1)) >= 1 needs N - 1 >= 4 (0.3 * 3 = 0.9)
    assert min_images((0.0, 0.3)) == 5 == tiny.min_set_size
    assert interval_bounds(4, (0.0, 0.3)) == (0, 1) and interval_bounds(3, (0.0, 0.3)) == (0, 0)
    assert min_images((0.0, 0.5)) == 3
    with pytest.raises(InvalidValueError, match=r"at least 5 images.*got 4"):
        tiny.predict(random_images(4, 64))
    assert len(tiny.predict(random_images(5, 64))) == 5
    halves = tiny_detector("musc", image_size=64, divide_num=2)
    assert halves.min_set_size == 10
    with pytest.raises(InvalidValueError, match="at least 10 images"):
        halves.predict(random_images(9, 64))


def test_permutation_equivariance(tiny: MuSc):
    x = random_images(7, 64, seed=3)
    perm = torch.tensor([4, 2, 6, 0, 1, 5, 3])
    a, b = tiny.predict(x, batch_size=2), tiny.predict(x[perm], batch_size=5)
    torch.testing.assert_close(b.image_scores, a.image_scores[perm], rtol=0, atol=1e-5)
    torch.testing.assert_close(b.anomaly_maps, a.anomaly_maps[perm], rtol=0, atol=1e-5)


def test_every_image_depends_on_the_set(tiny: MuSc):
    """Transductive: replacing one image changes the maps of the others."""
    x = random_images(6, 64, seed=4)
    y = x.clone()
    y[5] = random_images(1, 64, seed=5)[0]
    a, b = tiny.predict(x, calibrated=False), tiny.predict(y, calibrated=False)
    assert (a.anomaly_maps[:5] - b.anomaly_maps[:5]).abs().max() > 1e-4


def test_divide_num_scores_subsets_on_their_own(tiny: MuSc):
    """divide_num=2: images 0, 2, 4... are mutually scored among themselves (same maps as that
    subset alone); RsCIN runs over the whole set."""
    x = random_images(10, 64, seed=6)
    halves = tiny_detector("musc", image_size=64, divide_num=2)
    whole = halves.predict(x, calibrated=False)
    alone = tiny.predict(x[0::2], calibrated=False)
    torch.testing.assert_close(whole.anomaly_maps[0::2], alone.anomaly_maps, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- maths against slow references


def _slow_mutual_scores(z: torch.Tensor, interval) -> torch.Tensor:
    """Explicit loop over image pairs and patches (float64 distances)."""
    z = z.double()
    n, length, _ = z.shape
    k_min, k_max = interval_bounds(n - 1, interval)
    out = torch.zeros(n, length, dtype=torch.float64)
    for i in range(n):
        per_image = []
        for j in range(n):
            if j != i:
                d = ((z[i][:, None, :] - z[j][None, :, :]) ** 2).sum(-1).sqrt()  # [L, L]
                per_image.append(d.min(1).values)
        vals = torch.stack(per_image, 1).sort(1).values[:, k_min:k_max]
        out[i] = vals.mean(1)
    return out


@pytest.mark.parametrize("interval", [(0.0, 0.3), (0.2, 0.7)])
def test_chunked_mutual_scores_equal_slow_loop(interval):
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(9, 25, 16, generator=g), dim=-1)
    slow = _slow_mutual_scores(z, interval)
    one_pair = mutual_scores(z, interval, max_bytes=1)  # blocks of one image pair
    whole = mutual_scores(z, interval, max_bytes=1 << 30)  # one block
    some = mutual_scores(z, interval, max_bytes=4 * 25 * 25 * 4)  # 2 x 2 images
    assert whole.dtype == torch.float64
    for ours in (one_pair, whole, some):
        torch.testing.assert_close(ours, slow, rtol=0, atol=1e-5)


def test_lnamd_against_explicit_windows():
    """LayerNorm over (C, H, W) per image, zero-padded r x r window means, L2 over C."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 20, 6, generator=g) * 3 + 1  # grid 4 x 5
    r = 3
    out = lnamd(tokens, (4, 5), r)
    t = tokens.double()
    for b in range(2):
        x = (t[b] - t[b].mean()) / torch.sqrt(t[b].var(unbiased=False) + 1e-5)  # [L, C] over all of C, H, W
        grid = x.reshape(4, 5, 6)
        for i in range(4):
            for j in range(5):
                acc = torch.zeros(6, dtype=torch.float64)
                for di in range(-1, 2):
                    for dj in range(-1, 2):
                        if 0 <= i + di < 4 and 0 <= j + dj < 5:
                            acc += grid[i + di, j + dj]  # outside: zero padding
                ref = acc / acc.norm()
                torch.testing.assert_close(out[b, i * 5 + j].double(), ref, rtol=0, atol=1e-5)


def _numpy_rscin(scores: np.ndarray, cls: np.ndarray, k_list) -> np.ndarray:
    s = (scores - scores.min()) / (scores.max() - scores.min())
    w = cls.astype(np.float64) @ cls.astype(np.float64).T
    n = len(s)
    out = np.zeros((len(k_list), n))
    for a, k in enumerate(k_list):
        for i in range(n):
            nbrs = np.argsort(-w[i], kind="stable")[: min(k, n)]
            out[a, i] = sum(w[i, j] * s[j] for j in nbrs) / sum(w[i, j] for j in nbrs)
    return out.mean(0)


@pytest.mark.parametrize("k_list", [(1, 2, 3), (1, 8, 9), (4,)])
def test_rscin_against_numpy_loop(k_list):
    rng = np.random.default_rng(2)
    cls = rng.normal(size=(8, 5)) + 2.0  # positive similarities, as CLIP class tokens mostly are
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    scores = rng.random(8)
    ours = rscin(torch.from_numpy(scores), torch.from_numpy(cls).float(), k_list)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), _numpy_rscin(scores, cls, k_list), rtol=0, atol=1e-5)
    if k_list[0] == 1:  # k = 1: only itself
        s = (scores - scores.min()) / np.ptp(scores)
        np.testing.assert_allclose(rscin(torch.from_numpy(scores), torch.from_numpy(cls).float(), (1,)).numpy(), s, atol=1e-6)


def test_rscin_edge_cases():
    cls = torch.nn.functional.normalize(torch.rand(6, 4), dim=-1)
    assert torch.equal(rscin(torch.full((6,), 0.7, dtype=torch.float64), cls, (1, 2)), torch.zeros(6))
    raw = torch.rand(6, dtype=torch.float64)
    assert torch.equal(rscin(raw, cls, ()), raw.float())  # no re-scoring


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("bad", [{"r_list": (2,)}, {"r_list": ()}, {"layers": (0.0,)}, {"interval": (0.3, 0.1)},
                                 {"interval": (0.0, 1.0)}, {"k_list": (0, 1)}, {"divide_num": 0}, {"chunk_mb": 0}])
def test_bad_options(bad):
    with pytest.raises(clipad.ClipadError, match=next(iter(bad))):
        MuScOptions(**bad)


def test_registry_facts():
    from clipad.methods import get_method

    assert get_method("musc") is MuSc and MuSc.transductive and not MuSc.few_shot
    assert MuSc.backbone_families == ("clip", "dinov2")
    assert MuSc.default_backbone == "ViT-L-14-336" and MuSc.default_pretrained == "openai"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tiny_detector("musc").image_size == 512  # 518 is not a multiple of tiny's patch 16
    assert MuSc.backbone_options(MuScOptions()) == {"config_activation": True}  # 518 on ViT-L-14-336
    assert MuSc.backbone_options(MuScOptions(image_size=336), "ViT-L-14-336") == {}


# --------------------------------------------------------------------------- eval feeds a whole class


def test_eval_scores_each_class_as_one_set(tiny: MuSc, tmp_path: Path):
    """``clipad eval`` (batch size 4 < 12 images) gives the whole class in one call: the same
    scores as ``predict`` of all the class's test images together."""
    from _helpers import write_folder_dataset
    from clipad.data import few_shot_split, folder_dataset
    from clipad.data.images import load_image
    from clipad.eval.run import run

    write_folder_dataset(tmp_path / "widget", n_normal=6, n_abnormal=6, size=64, seed=3)
    ds = folder_dataset(tmp_path / "widget", normal_dirs="good", abnormal_dirs="bad", mask_dirs="masks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run(tiny, ds, classes=None, shots=0, seed=0, eval_size=None, batch_size=4, workers=0,
                  protocol="anomalyclip", n_examples=0, quiet=True)
    (cls,) = res.classes
    _, test = few_shot_split(ds, cls.name, 0, 0)
    direct = tiny.predict([load_image(s.image_path) for s in test], batch_size=5)
    np.testing.assert_allclose(cls.scores, direct.image_scores.double().numpy(), rtol=0, atol=1e-6)
