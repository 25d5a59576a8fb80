"""``clipad predict``: score image files and folders; scores.csv plus a heatmap per image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import EXIT_FAILED_INPUTS, EXIT_OK, add_model_args, build_detector, report


def _unique_name(stem: str, used: set[str]) -> str:
    name, i = stem, 1
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name


def _load_batch(paths: list[Path]):
    from ..errors import ImageReadError
    from ..data.images import load_image

    ok, images, errors = [], [], []
    for p in paths:
        try:
            images.append(load_image(p))
            ok.append(p)
        except ImageReadError as exc:
            errors.append(exc)
    return ok, images, errors


def _prefetched_batches(paths: list[Path], batch_size: int):
    """(paths, PIL images, read errors) per batch; the next batch is decoded in a background
    thread while the caller scores the current one (PIL releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_batch, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            batch = pending.result()
            pending = pool.submit(_load_batch, chunks[i + 1]) if i + 1 < len(chunks) else None
            yield batch


def cmd_predict(args: argparse.Namespace) -> int:
    import csv

    import numpy as np
    from tqdm import tqdm

    from ..errors import ClipadError, ImageReadError
    from ..data.images import list_images, load_image
    from ..eval.viz import save_overlay_png

    failures = 0
    paths: list[Path] = []
    for item in args.images:
        try:
            found = list_images(item)
        except ClipadError as exc:
            report(str(exc))
            failures += 1
            continue
        if not found:
            report(f"'{item}' holds no images ({', '.join(sorted(e.lstrip('.') for e in _exts()))}); skipped")
            failures += 1
        paths.extend(found)
    if not paths:
        report("no images to process")
        return EXIT_FAILED_INPUTS

    det = build_detector(args)
    if args.reference:
        refs, ref_paths = [], []
        for item in args.reference:
            for p in list_images(item):
                try:
                    refs.append(load_image(p))
                    ref_paths.append(p)
                except ImageReadError as exc:
                    report(f"reference {exc}; skipped")
                    failures += 1
        if not refs:
            report("none of the --reference images could be read")
            return EXIT_FAILED_INPUTS
        det.set_reference(refs, class_name=None)

    out = Path(args.out)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    if args.save_maps:
        (out / "maps").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows: list[tuple[str, float]] = []
    bar = tqdm(total=len(paths), desc=f"{det.name}", unit="img", file=sys.stderr, disable=args.quiet)
    for batch_paths, images, errors in _prefetched_batches(paths, args.batch_size):
        for exc in errors:
            bar.clear()
            report(f"{exc}; skipped")
            failures += 1
        if images:
            pred = det.predict(images, class_name=args.class_name, batch_size=args.batch_size)
            for i, (p, img) in enumerate(zip(batch_paths, images)):
                amap = pred.anomaly_maps[i].numpy()
                score = float(pred.image_scores[i])
                name = _unique_name(p.stem, used)
                save_overlay_png(out / "heatmaps" / f"{name}.png", img, amap, score=score, title=p.name,
                                 vmin=args.vmin, vmax=args.vmax)
                if args.save_maps:
                    np.save(out / "maps" / f"{name}.npy", amap.astype(np.float32))
                rows.append((str(p), score))
        bar.update(len(batch_paths) + len(errors))
    bar.close()

    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score"])
        w.writerows((p, f"{s:.6f}") for p, s in rows)
    print(f"{len(rows)} image(s) scored -> {out / 'scores.csv'}, heatmaps in {out / 'heatmaps'}")
    if failures:
        report(f"{failures} input(s) failed; see the lines above")
        return EXIT_FAILED_INPUTS
    return EXIT_OK


def _exts():
    from ..data.images import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS



def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="score images and write heatmaps",
                       description="Score images (files or directories) and write scores.csv plus a heatmap overlay per image.")
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and/or directories (searched recursively)")
    add_model_args(p)
    p.add_argument("--reference", nargs="+", metavar="GOOD", default=None,
                   help="known-good reference images or directories (k-shot; methods with few-shot support)")
    p.add_argument("--class-name", default=None, help="product name used in text prompts (default: 'object')")
    p.add_argument("--out", default="clipad_out", help="output directory (default: clipad_out)")
    p.add_argument("--save-maps", action="store_true", help="also save each raw anomaly map as maps/<name>.npy (float32, image size)")
    p.add_argument("--vmin", type=float, default=None, help="colour scale minimum of heatmaps (default: per image)")
    p.add_argument("--vmax", type=float, default=None, help="colour scale maximum of heatmaps (default: per image)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
