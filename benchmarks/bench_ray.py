"""Ray Data overhead: ``clipad.distributed.predict`` next to the single-process path, 1 and 2 CPU actors.

    python benchmarks/bench_ray.py --images 256 --size 256 --method winclip --backbone tiny

Generates ``--images`` PNG files (``--size`` px), then times, on the same files and detector:

- ``single``: the single-process path of ``clipad predict`` without its figures: read each batch
  with clipad's image reader, ``det.predict`` (torch threads = ``--threads``);
- ``ray N actor(s)``: ``clipad.distributed.predict`` with N CPU actors (``--threads`` CPUs and
  torch threads each), decode tasks, shards written; the time of the pipeline (actor start-up
  included), on a local Ray instance started once beforehand (its start-up is printed apart).

Prints a table: seconds, images/s, time relative to ``single``. Needs ``pip install "clipad[ray]"``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clipad


def _write_images(d: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = (rng.random((size // 8, size // 8, 3)) * 200 + 20).astype(np.uint8)
        p = d / f"{i:05d}.png"
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(p)
        paths.append(p)
    return paths


def _single(det, paths: list[Path], batch: int) -> float:
    from clipad.data.images import load_image

    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        det.predict([load_image(p) for p in paths[i : i + batch]], batch_size=batch)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="winclip")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=256, help="generated image size (px)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the single process and of each actor")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    import ray

    import clipad.distributed as dist

    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = clipad.create_detector(args.method, backbone=args.backbone, pretrained=None, device="cpu")
    work = Path(tempfile.mkdtemp(prefix="clipad_bench_ray_"))
    try:
        (work / "images").mkdir()
        paths = _write_images(work / "images", args.images, args.size)
        _single(det, paths[: args.batch], args.batch)  # warm-up
        single = _single(det, paths, args.batch)
        # logical CPUs: the largest pool's actors plus one for decode tasks (on however many cores there are)
        t0 = time.perf_counter()
        ray.init(num_cpus=max(args.actors) * args.threads + 1, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        startup = time.perf_counter() - t0
        rows = [("single process", single)]
        for n in args.actors:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = dist.predict(paths, work / f"out{n}", detector=det, actors=n, cpus_per_actor=args.threads,
                                 batch_size=args.batch, progress=False, save_maps=False)
            assert s["scored"] == len(paths) and not s["failed"], s
            rows.append((f"ray, {n} CPU actor(s)", s["seconds"]))
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"# {args.method} on {args.backbone} ({det.image_size} px model input), {args.images} PNG images of "
          f"{args.size} px, batch {args.batch}, {args.threads} torch thread(s) per process")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"ray {ray.__version__}; local Ray start-up {startup:.1f} s (not in the times below)")
    print(f"| {'path':<24} | {'seconds':>7} | {'images/s':>8} | {'x single':>8} |")
    print(f"|{'-' * 26}|{'-' * 8}:|{'-' * 9}:|{'-' * 9}:|")
    for name, sec in rows:
        print(f"| {name:<24} | {sec:7.1f} | {len(paths) / sec:8.1f} | {sec / single:8.2f} |")


if __name__ == "__main__":
    main()
