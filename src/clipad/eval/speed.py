"""``clipad bench``: throughput of each method next to the bare backbone forward.

Random weights by default (same compute as real ones, no download). For each batch size, the
method on a device-resident, normalised batch and the bare image-tower forward on the same batch
are measured together (:func:`measure_interleaved`): the same number of warm-up calls each, then
``--repeats`` timed, device-synchronised calls taken in turns, so that neither is timed colder or
under other load than the other; medians reported as ms/image and images/s, and their ratio
("x bare", the overhead of the method); peak device memory; achieved TFLOP/s against an analytic
FLOP count of one image-tower forward. A transductive method (MuSc) scores a set of
``set_size`` = max(batch, its :attr:`~clipad.methods.base.Detector.min_set_size`) images together,
its backbone ``batch`` images at a time; its ms/image grows with the set (mutual scoring costs
set_size^2).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
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
    # open_clip's MLP names its first layer c_fc, timm's (DINOv2) fc1
    first = getattr(blk.mlp, "c_fc", None) or getattr(blk.mlp, "fc1", None)
    mlp = first.out_features if first is not None else 4 * w
    macs = (n - 1) * 3 * ph * pw * w  # patch embedding (no CLS)
    macs += backbone.depth * (4 * n * w * w + 2 * n * n * w + 2 * n * w * mlp)
    macs += w * backbone.embed_dim
    return 2.0 * macs


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def measure_interleaved(
    fns: Sequence[Callable[[], Any]], device: torch.device | str, repeats: int, warmup: int = 0, *,
    clock: Callable[[], float] = time.perf_counter, cpu_clock: Callable[[], float] = _cpu_seconds,
) -> list[tuple[float, float]]:
    """(median wall seconds, median process CPU seconds (user + sys)) of each of ``fns``, measured
    under the same conditions: ``warmup`` untimed rounds calling each once, then ``repeats`` timed
    rounds calling each once, device-synchronised, in an order that alternates between rounds
    (A B, B A, A B...) so that none is always timed right after the same neighbour. Measured one
    after the other, the second would run warmer (caches, clocks, allocator) or under other load
    than the first. On a shared machine the CPU seconds bound what the wall time would be
    without the other load. ``clock``/``cpu_clock``: the time sources (tests pass fakes)."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0, c0 = clock(), cpu_clock()
            fns[i]()
            sync()
            c1 = cpu_clock()
            wall[i].append(clock() - t0)
            cpu[i].append(c1 - c0)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def measure(fn, device: torch.device | str, repeats: int, warmup: int = 0) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds (user + sys)) of ``fn()`` over ``repeats``
    device-synchronised calls after ``warmup`` untimed ones (:func:`measure_interleaved` of one)."""
    return measure_interleaved([fn], device, repeats, warmup)[0]


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
    if channels_last:  # the patch embedding: CLIP's conv1, DINOv2's patch_embed.proj
        patchify = det.backbone.visual.conv1 if hasattr(det.backbone, "visual") else det.backbone.model.patch_embed.proj
        patchify.to(memory_format=torch.channels_last)
    if compile:
        det.compile()
    dev = det.device
    size = det.image_size
    shots = shots or (1 if det.needs_reference else 0)  # few-shot-only methods (AnomalyDINO): 1 shot
    if shots:
        det.set_reference(torch.rand(shots, 3, size, size))
    flops = vit_forward_flops(det.backbone, size)
    rows = []
    for b in batches:
        # a transductive method scores a set of n images together, its backbone b at a time
        n = max(b, det.min_set_size) if det.transductive else b
        x = det.backbone.normalize(torch.rand(n, 3, size, size, device=dev))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        def run_method():
            if det.transductive:
                det.score_normalized_set(list(x.split(b)), class_name="object")
            else:
                det.score_normalized(x, class_name="object")

        def run_backbone():
            with torch.no_grad(), det.autocast():
                det.backbone.encode_image(x[:b])

        # together, in turns: the bare forward warmed and timed exactly as the method
        (t_method, _), (t_bare, _) = measure_interleaved([run_method, run_backbone], dev, repeats, warmup)
        rows.append({
            "method": method, "backbone": det.backbone.name, "image_size": size, "shots": shots,
            "device": str(dev), "dtype": dtype, "batch": b, "set_size": n, "compile": compile,
            "channels_last": channels_last, "threads": torch.get_num_threads(),
            "ms_per_image": 1e3 * t_method / n, "images_per_s": n / t_method,
            "backbone_ms_per_image": 1e3 * t_bare / b,
            "overhead_vs_backbone": (t_method / n) / (t_bare / b),
            "backbone_tflops": flops * b / t_bare / 1e12,
            "method_tflops": flops * n / t_method / 1e12,  # backbone FLOPs only: a lower bound
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





