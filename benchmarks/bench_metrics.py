"""Time clipad.metrics on a synthetic, MVTec-AD-sized evaluation and print a table.

MVTec AD test set: 1,725 images, 1,258 anomalous; masks cover a few % of an image in 1-3 blobs.
Maps are smooth noise plus a signal on (and a little beside) the blobs; image scores are the map
max plus noise. Everything is seeded.

    python benchmarks/bench_metrics.py                      # CPU, 1725 x 256 x 256
    python benchmarks/bench_metrics.py --device cuda --dtype float16
    python benchmarks/bench_metrics.py --n-images 300 --repeats 1

Targets (issue): full suite < 60 s on a 2-core CPU, < 3 s on a GPU; image metrics < 0.1 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from clipad.eval import metrics as M
from clipad.eval.speed import measure


def synthetic_eval(n_images: int, size: int, seed: int, device: str, dtype: torch.dtype):
    """image_scores [N], image_labels [N] bool, maps [N, size, size] dtype, masks [N, size, size] bool."""
    g = torch.Generator().manual_seed(seed)
    n_anomalous = round(n_images * 1258 / 1725)
    labels = torch.zeros(n_images, dtype=torch.bool)
    labels[torch.randperm(n_images, generator=g)[:n_anomalous]] = True
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    maps = torch.empty(n_images, size, size, dtype=dtype)
    masks = torch.zeros(n_images, size, size, dtype=torch.bool)
    for start in range(0, n_images, 128):
        n = min(128, n_images - start)
        # 1-3 elliptical blobs with radii 4-24% of the side: ~0.3-5% of the image each.
        blobs = torch.zeros(n, size, size, dtype=torch.bool)
        for k in range(3):
            present = labels[start : start + n] & ((k == 0) | (torch.rand(n, generator=g) < 0.4))
            c = torch.rand(n, 2, generator=g) * size
            r = (0.04 + 0.2 * torch.rand(n, 2, generator=g)) * size / 2
            ell = ((yy - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + ((xx - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2
            blobs |= (ell <= 1) & present[:, None, None]
        noise = F.interpolate(torch.randn(n, 1, size // 16, size // 16, generator=g), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        fine = torch.randn(n, size, size, generator=g) * 0.1
        halo = F.avg_pool2d(blobs[:, None].float(), 15, stride=1, padding=7)[:, 0]
        strength = 0.5 + 2.0 * torch.rand(n, 1, 1, generator=g)
        maps[start : start + n] = torch.sigmoid(noise + fine + strength * halo).to(dtype)
        masks[start : start + n] = blobs
    scores = maps.float().flatten(1).amax(1) + 0.05 * torch.randn(n_images, generator=g)
    return scores.to(device), labels.to(device), maps.to(device), masks.to(device)


def timed(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, float, float]:
    """(median wall seconds, median process CPU seconds, peak memory in GiB: CUDA allocator peak,
    or process max RSS on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sec, cpu = measure(fn, device, repeats)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return sec, cpu, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-images", type=int, default=1725)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    scores, labels, maps, masks = synthetic_eval(args.n_images, args.size, args.seed, args.device, dtype)
    # One untimed pass warms up kernels and allocators.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.UndefinedMetricWarning)
        M.compute(scores[:8], labels[:8], maps[:8], masks[:8])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    rows = [
        ("image metrics (AUROC, AP, F1-max)", lambda: M.compute(scores, labels)),
        ("pixel AUROC alone", lambda: M.auroc(maps.flatten(), masks.flatten())),
        ("pixel AP alone", lambda: M.average_precision(maps.flatten(), masks.flatten())),
        ("pixel F1-max alone", lambda: M.f1_max(maps.flatten(), masks.flatten())),
        ("pixel AUPRO alone, official grid (default)", lambda: M.aupro(maps, masks)),
        ("pixel AUPRO alone, exact (adaptclip)", lambda: M.aupro(maps, masks, protocol="adaptclip")),
        ("full suite, protocol=anomalyclip", lambda: M.compute(scores, labels, maps, masks)),
        ("full suite, protocol=adaptclip", lambda: M.compute(scores, labels, maps, masks, protocol="adaptclip")),
    ]
    n_pix = masks.numel()
    threads = torch.get_num_threads() if args.device == "cpu" else None
    print(f"device={args.device} threads={threads} images={args.n_images} ({int(labels.sum())} anomalous) "
          f"maps={args.size}x{args.size} {args.dtype} pixels={n_pix / 1e6:.1f}M anomalous_pixels={masks.float().mean().item():.2%} "
          f"regions={M.label_regions(masks)[1]} repeats={args.repeats}")
    mem_label = "peak alloc GiB" if args.device.startswith("cuda") else "process max RSS GiB"
    print(f"(data held: {maps.element_size() * n_pix / 2**30:.2f} GiB maps + {n_pix / 2**30:.2f} GiB masks; "
          f"RSS before timing {base_rss:.2f} GiB)")
    print(f"load average before timing: {os.getloadavg()[0]:.1f}")
    print(f"| {'metric':<44} | {'median s':>9} | {'CPU s':>7} | {mem_label:>19} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 9}|{'-' * 21}|")
    for name, fn in rows:
        sec, cpu, mem = timed(fn, args.repeats, args.device)
        print(f"| {name:<44} | {sec:>9.3f} | {cpu:>7.2f} | {mem:>19.2f} |", flush=True)
    result = M.compute(scores, labels, maps, masks)
    print("values (anomalyclip):", {k: round(v, 4) for k, v in result.items()})


if __name__ == "__main__":
    main()
