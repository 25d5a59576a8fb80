"""`clipad bench`: the FLOP model and the command itself (no timing is asserted)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from clipad.backbones.clip import create_backbone
from clipad.eval.speed import vit_forward_flops
from clipad.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _explicit_forward(bb, x):
    """The image tower written out with plain matmuls, so FlopCounterMode sees every product."""
    v = bb.visual
    h = v.ln_pre(bb.embed(bb.normalize(x))[0])
    for blk in bb.blocks:
        a = blk.attn
        y = blk.ln_1(h)
        q, k, val = F.linear(y, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], a.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, val = split(q), split(k), split(val)
        att = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ val
        att = att.transpose(1, 2).reshape(h.shape)
        h = h + F.linear(att, a.out_proj.weight, a.out_proj.bias)
        h = h + blk.mlp(blk.ln_2(h))
    return v.ln_post(h[:, 0]) @ v.proj


@pytest.mark.parametrize("size", [224, 240])
def test_flop_model_matches_counted_flops(size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = create_backbone("tiny")
    x = torch.rand(2, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = _explicit_forward(bb, x)
    assert torch.allclose(out, bb.encode_image(bb.normalize(x)).cls, atol=1e-4)
    assert vit_forward_flops(bb, size) == pytest.approx(fc.get_total_flops() / 2, rel=1e-6)


def test_bench_command_reports_every_method(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--backbone", "tiny", "--image-size", "64", "--batch", "1", "2", "--repeats", "1",
               "--warmup", "0", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    import clipad

    assert {r["method"] for r in rows} == set(clipad.list_methods())
    assert {r["batch"] for r in rows} == {1, 2}
    for r in rows:
        assert r["ms_per_image"] > 0 and r["images_per_s"] > 0 and r["backbone_tflops"] > 0
        assert r["method"] in text


def test_bench_records_its_settings(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--method", "adaptclip", "--backbone", "tiny", "--image-size", "64", "--batch", "2",
               "--shots", "1", "--dtype", "bf16", "--channels-last", "--threads", "1", "--repeats", "1",
               "--warmup", "0", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["dtype"], row["shots"], row["channels_last"], row["compile"], row["threads"]) == ("bf16", 1, True, False, 1)
    # backbone FLOPs over the method's time can only be below the bare forward's rate times the overhead
    assert row["method_tflops"] == pytest.approx(row["backbone_tflops"] / row["overhead_vs_backbone"], rel=1e-9)
