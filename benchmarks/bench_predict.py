"""Latency of ``Detector.predict`` per image for a method and backbone (random weights).

    python benchmarks/bench_predict.py --method winclip --backbone ViT-B-16-plus-240 --batch 1 4 --repeats 3

Prints a table: batch, median seconds per batch, ms per image, images/s. Random weights have the
same compute as real ones. Warm-up runs are not timed; CUDA runs are synchronised.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch

import clipad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="winclip")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = {"image_size": args.image_size} if args.image_size else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = clipad.create_detector(args.method, backbone=args.backbone, pretrained=None, device=args.device, **opts)
    size = det.image_size
    if args.shots:
        det.set_reference(torch.rand(args.shots, 3, size, size))
    det.predict(torch.rand(1, 3, size, size), class_name="object")  # warm-up + text cache
    print(f"# {args.method} on {args.backbone} at {size}px, {args.shots}-shot, device {args.device}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'batch':>5} {'s/batch':>9} {'ms/img':>9} {'img/s':>8}")
    for b in args.batch:
        x = torch.rand(b, 3, size, size)
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            det.predict(x, class_name="object", batch_size=b)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"{b:>5} {med:>9.3f} {1000 * med / b:>9.1f} {b / med:>8.2f}")


if __name__ == "__main__":
    main()
