"""onnxruntime (CPU) next to the torch detector (CPU) per image, with export time and file size.

    python benchmarks/bench_onnx.py                                   # tiny and ViT-B-16 at 224 px
    python benchmarks/bench_onnx.py --backbone ViT-B-16 --method winclip adaptclip --batch 4

For each backbone and method (random weights: the same compute as real ones): export with
``clipad.deploy.export.export_onnx`` (uint8 input, opset 17), then time ``Detector.predict``
(fp32) and ``OnnxDetector.predict`` on the same model-sized uint8 images, both with ``--threads``
intra-op threads, median of ``--repeats`` after one warm-up. Prints a markdown table:
export seconds, file MB, torch and onnxruntime ms per image, their ratio (torch / onnxruntime:
above 1, onnxruntime is faster) and max |Δscore| between the two. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import clipad
from clipad.deploy.export import export_onnx, verification_images
from clipad.deploy.runtime import OnnxDetector

METHODS = ("winclip", "anoclip", "anomalyclip", "adaptclip", "tokenclip")


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", nargs="+", default=["tiny", "ViT-B-16"])
    ap.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--shots", type=int, default=0, help="reference images for winclip and adaptclip")
    ap.add_argument("--batch", type=int, default=1, help="images per call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = (args.image_size, args.image_size)
    images = verification_images(args.batch, size, seed=0)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, {args.threads} threads, "
          f"batch {args.batch}, {platform.machine()} {os.cpu_count()} cores, load {load:.1f} at start")
    print("| method | backbone @ px | shots | export s | file MB | torch ms/img | onnxruntime ms/img | torch / ort | max abs Δscore |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbone:
            for method in args.method:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    det = clipad.create_detector(method, backbone=backbone, pretrained=None, device="cpu",
                                                 image_size=args.image_size, precision="fp32")
                shots = args.shots if det.few_shot and method != "anoclip" else 0
                if shots:
                    det.set_reference(torch.from_numpy(verification_images(shots, size, seed=1)).permute(0, 3, 1, 2))
                path = Path(tmp) / f"{method}-{backbone}.onnx"
                result = export_onnx(det, path)
                runtime = OnnxDetector(path, threads=args.threads)
                t_torch = _median_seconds(functools.partial(det.predict, tensor, batch_size=args.batch), args.repeats)
                t_ort = _median_seconds(functools.partial(runtime.predict, images, batch_size=args.batch), args.repeats)
                diff = float(np.abs(runtime.predict(images).image_scores - det.predict(tensor).image_scores.numpy()).max())
                per = 1000 / args.batch
                print(f"| {method} | {backbone} @ {args.image_size} | {shots} | {result.seconds:.1f} | "
                      f"{result.size_bytes / 1e6:.1f} | {t_torch * per:,.0f} | {t_ort * per:,.0f} | "
                      f"{t_torch / t_ort:.2f} | {diff:.1e} |", flush=True)
                path.unlink()


if __name__ == "__main__":
    main()
