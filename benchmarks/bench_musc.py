"""MuSc's cost as the set grows: seconds per set and ms/image for sets of 8, 32, 128 images,
split into the backbone (taps and class tokens, batch by batch) and the set-level head (LNAMD,
mutual scoring, RsCIN), random weights.

    python benchmarks/bench_musc.py --backbone tiny --image-size 224 --sets 8 32 128
    python benchmarks/bench_musc.py --backbone ViT-B-16 --image-size 224 --sets 8 32
    python benchmarks/bench_musc.py --device cuda --sets 8 32 128      # ViT-L-14-336 @ 518

Mutual scoring costs N^2 L^2 C multiply-adds per tap and degree (N images of L patches of width
C; 4 taps x 3 degrees by default): the head's ms/image grows linearly with N, the backbone's is
constant. The table prints that analytic count (GFLOP, 2 per multiply-add) next to the times.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
import warnings

import torch

import clipad


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ViT-L-14-336")
    ap.add_argument("--image-size", type=int, default=None, help="default: MuSc's 518 (nearest patch multiple)")
    ap.add_argument("--sets", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--batch-size", type=int, default=8, help="backbone batch (default 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per set; the fastest is reported")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    opts = {"precision": args.precision}
    if args.image_size:
        opts["image_size"] = args.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = clipad.create_detector("musc", backbone=args.backbone, pretrained=None, device=args.device, **opts)
    dev = det.device
    grid = det.grid
    length, width = grid[0] * grid[1], det.backbone.width
    taps_degrees = len(det.layers) * len(det.opts.r_list)
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    print(f"# MuSc on {machine}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {det.backbone.name} "
          f"@ {det.image_size} px ({grid[0]}x{grid[1]} patches, width {width}), {args.precision}, backbone batch "
          f"{args.batch_size}, random weights; best of {args.repeats}")
    head = (f"{'images':>7}{'set s':>9}{'ms/img':>9}{'backbone ms/img':>17}{'head ms/img':>13}"
            f"{'MSM GFLOP':>11}{'peak MB':>9}")
    print(head)
    print("-" * len(head))
    g = torch.Generator().manual_seed(0)
    for n in args.sets:
        x = det.backbone.normalize(torch.rand(n, 3, det.image_size, det.image_size, generator=g).to(dev))
        batches = list(x.split(args.batch_size))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        best_total = best_bb = float("inf")
        for _ in range(args.repeats):
            _sync(dev)
            t0 = time.perf_counter()
            det.score_normalized_set(batches, class_name="object")
            _sync(dev)
            total = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad(), det.autocast():
                for b in batches:
                    det._features(b)
            _sync(dev)
            bb = time.perf_counter() - t0
            best_total, best_bb = min(best_total, total), min(best_bb, bb)
        msm_gflop = 2.0 * n * (n - 1) * length * length * width * taps_degrees / 1e9
        print(f"{n:>7}{best_total:>9.2f}{1e3 * best_total / n:>9.1f}{1e3 * best_bb / n:>17.1f}"
              f"{1e3 * max(best_total - best_bb, 0.0) / n:>13.1f}{msm_gflop:>11.1f}{_peak_mb(dev):>9.0f}")


if __name__ == "__main__":
    main()
