"""End-to-end ``clipad eval`` throughput on a generated MVTec-AD-sized set (decode, infer,
metrics, report), random weights.

    python benchmarks/bench_eval.py --method adaptclip --device cuda --precision bf16 --batch-size 32
    python benchmarks/bench_eval.py --method adaptclip --backbone ViT-B-16 --image-size 224 --classes 2 --per-class 40

The set (:func:`clipad.data.synthetic.write_mvtec_tree`; default 15 classes x 115 test images at
256 px = MVTec AD's 1,725 test images) is written once to ``--root`` (default: a cache folder
under the system temp dir) and reused. Prints the images/s of the whole ``clipad eval`` command (model creation included).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from clipad.cli.predict import main as clipad_main
from clipad.data.synthetic import write_mvtec_tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="adaptclip")
    ap.add_argument("--backbone", default=None, help="default: the method's paper backbone")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--classes", type=int, default=15, help="generated classes (default 15)")
    ap.add_argument("--per-class", type=int, default=115, help="test images per class, 1/3 normal (default 115)")
    ap.add_argument("--size", type=int, default=256, help="generated image size (default 256)")
    ap.add_argument("--root", default=None, help="where the generated set lives (default: a temp cache folder)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_good = args.per_class // 3
    root = Path(args.root or Path(tempfile.gettempdir()) / f"clipad_synth_{args.classes}x{args.per_class}_{args.size}")
    if not (root / ".complete").exists():
        t0 = time.perf_counter()
        write_mvtec_tree(root, args.classes, n_train=8, n_good=n_good, n_bad=args.per_class - n_good, size=args.size)
        (root / ".complete").write_text("ok")
        print(f"# wrote {args.classes * args.per_class} test images to {root} in {time.perf_counter() - t0:.1f} s")
    argv = ["eval", "--dataset", "mvtec", "--root", str(root), "--method", args.method, "--pretrained", "none",
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--shots", str(args.shots),
            "--quiet", "--out", str(Path(tempfile.mkdtemp(prefix="clipad_bench_eval_")))]
    for flag, value in (("--backbone", args.backbone), ("--image-size", args.image_size), ("--device", args.device),
                        ("--precision", args.precision)):
        if value is not None:
            argv += [flag, str(value)]
    if args.compile:
        argv.append("--compile")
    n = args.classes * args.per_class
    t0 = time.perf_counter()
    rc = clipad_main(argv)
    seconds = time.perf_counter() - t0
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"# bench_eval: {args.method}, {n} images, {dev} ({name}), {torch.get_num_threads()} threads, "
          f"{args.workers} workers, batch {args.batch_size}, precision {args.precision or 'auto'}")
    print(f"clipad eval end to end: {seconds:.1f} s = {n / seconds:.1f} images/s (exit code {rc})")


if __name__ == "__main__":
    main()
