"""``clipad bench``: throughput of each method next to the bare backbone forward.

Random weights by default (same compute as real ones, no download). For each batch size:
warm-up calls, then ``--repeats`` timed calls of the method on a device-resident, normalised
batch (device-synchronised), median reported as ms/image and images/s; the same for the bare
image-tower forward, so the overhead of each method is visible; peak device memory; achieved
TFLOP/s against an analytic FLOP count of one image-tower forward.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
import warnings
from typing import Any

import torch

from ..backbones.clip import Backbone


def vit_forward_flops(backbone: Backbone, image_size: int) -> float:
    """FLOPs (2 x multiply-adds) of one image-tower forward at ``image_size``: patch embedding,
    per block qkv/out projections, attention scores and mixing, MLP; final projection."""
    ph, pw = backbone.patch_size
    n = (image_size // ph) * (image_size // pw) + 1
    w = backbone.width
    blk = backbone.blocks[0]
    mlp = blk.mlp.c_fc.out_features if hasattr(blk.mlp, "c_fc") else 4 * w
    macs = (n - 1) * 3 * ph * pw * w  # patch embedding (no CLS)
    macs += backbone.depth * (4 * n * w * w + 2 * n * n * w + 2 * n * w * mlp)
    macs += w * backbone.embed_dim
    return 2.0 * macs


def measure(fn, device: torch.device | str, repeats: int, warmup: int = 0) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds (user + sys)) of ``fn()`` over ``repeats``
    device-synchronised calls after ``warmup`` untimed ones. On a shared machine the CPU seconds
    bound what the wall time would be without the other load."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), os.times()
        fn()
        sync()
        c1 = os.times()
        wall.append(time.perf_counter() - t0)
        cpu.append(c1.user - c0.user + c1.system - c0.system)
    return statistics.median(wall), statistics.median(cpu)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def bench_method(
    method: str, *, backbone: str | None, image_size: int | None, batches: list[int], shots: int,
    device: str | None, dtype: str, warmup: int, repeats: int, options: dict[str, Any],
    compile: bool = False, channels_last: bool = False,
) -> list[dict[str, Any]]:
    from ..api import create_detector

    opts = dict(options)
    if image_size:
        opts["image_size"] = image_size
    opts["precision"] = "bf16" if dtype == "bf16" else "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = create_detector(method, backbone=backbone, pretrained=None, device=device, **opts)
    if channels_last:
        det.backbone.visual.conv1.to(memory_format=torch.channels_last)
    if compile:
        det.compile()
    dev = det.device
    size = det.image_size
    if shots:
        det.set_reference(torch.rand(shots, 3, size, size))
    flops = vit_forward_flops(det.backbone, size)
    rows = []
    for b in batches:
        x = det.backbone.normalize(torch.rand(b, 3, size, size, device=dev))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        def run_method():
            det.score_normalized(x, class_name="object")

        def run_backbone():
            with torch.no_grad(), det.autocast():
                det.backbone.encode_image(x)

        t_method = measure(run_method, dev, repeats, warmup)[0]
        t_bare = measure(run_backbone, dev, repeats, warmup)[0]
        rows.append({
            "method": method, "backbone": det.backbone.name, "image_size": size, "shots": shots,
            "device": str(dev), "dtype": dtype, "batch": b, "compile": compile, "channels_last": channels_last,
            "threads": torch.get_num_threads(),
            "ms_per_image": 1e3 * t_method / b, "images_per_s": b / t_method,
            "backbone_ms_per_image": 1e3 * t_bare / b,
            "overhead_vs_backbone": t_method / t_bare,
            "backbone_tflops": flops * b / t_bare / 1e12,
            "method_tflops": flops * b / t_method / 1e12,  # backbone FLOPs only: a lower bound
            "peak_memory_mb": _peak_memory_mb(dev),
        })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = f"{'method':<12}{'backbone':<20}{'px':>5}{'k':>3}{'batch':>6}{'ms/img':>10}{'img/s':>9}" \
           f"{'bare ms/img':>12}{'x bare':>8}{'TFLOP/s':>9}{'bare TF/s':>10}{'peak MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<12}{r['backbone']:<20}{r['image_size']:>5}{r['shots']:>3}{r['batch']:>6}"
            f"{r['ms_per_image']:>10.2f}{r['images_per_s']:>9.1f}{r['backbone_ms_per_image']:>12.2f}"
            f"{r['overhead_vs_backbone']:>8.2f}{r['method_tflops']:>9.3f}{r['backbone_tflops']:>10.3f}{r['peak_memory_mb']:>9.0f}"
        )
    return "\n".join(lines)





