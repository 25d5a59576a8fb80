"""``clipad predict``: score image files and folders; scores.csv plus a heatmap per image.

With thresholds (a detector from ``clipad calibrate``, or ``--threshold`` / ``--pixel-threshold``)
scores.csv gains a ``label`` column (1 anomalous, 0 normal) and each image a mask,
``masks/<name>.png`` (255 anomalous, 0 normal), named as its heatmap.

Outputs are never lost to an output error: ``scores.csv`` is appended as images are scored
(header first, flushed after every batch, so an interrupted run keeps every row scored so far);
each heatmap and map is written atomically (a temporary file renamed into place); one that
cannot be written is reported on one line, its row keeps an empty ``heatmap`` cell, the run goes
on and exits 1. File names that are not UTF-8 appear as ``\\xNN`` in every output and message.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

from .common import (
    EXIT_FAILED_INPUTS,
    EXIT_OK,
    add_max_image_pixels_arg,
    add_model_args,
    add_ray_args,
    build_detector,
    existing_file,
    existing_path,
    finite_float,
    max_image_pixels,
    non_empty,
    output_dir,
    positive_int,
    ray_options,
    report,
)

#: Columns of scores.csv; ``path`` and ``score`` stay first so readers of the older two-column
#: file keep working. ``heatmap``: the overlay's path relative to --out (empty if not written).
#: With an image threshold (calibrated, or --threshold) a ``label`` column follows: 1 anomalous, 0 normal.
SCORES_COLUMNS = ("path", "score", "heatmap")

# Output names are cut to this many bytes (before "_<n>.png"), within the usual 255-byte limit.
_MAX_STEM_BYTES = 200

# At most this many distinct skipped extensions are named in the summary line.
_MAX_LISTED_EXTENSIONS = 8


def _unique_name(stem: str, used: set[str]) -> str:
    name, i = stem, 1
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name


def _output_stem(path: Path) -> str:
    """The stem of ``path`` as an output file name: undecodable bytes as ``\\xNN`` (so the
    ``heatmap`` column names the file exactly, in valid UTF-8) and cut to fit the name limit."""
    from ..eval.files import display_text

    stem = display_text(path.stem) or "image"
    while len(stem.encode("utf-8")) > _MAX_STEM_BYTES:
        stem = stem[:-1]
    return stem


def _skipped_summary(item: str, skipped: list[Path], reference: bool = False) -> str:
    exts = sorted({p.suffix.lower() for p in skipped if p.suffix})
    exts = exts[:_MAX_LISTED_EXTENSIONS] + (["..."] if len(exts) > _MAX_LISTED_EXTENSIONS else [])
    exts += ["no extension"] if any(not p.suffix for p in skipped) else []
    listed = ", ".join(exts)
    return (
        f"{'reference ' if reference else ''}'{item}': skipped {len(skipped)} file(s) with unsupported "
        f"extensions ({listed}); supported: {', '.join(sorted(_exts()))}; name a file explicitly to try it anyway"
    )


def _list_inputs(item: str, reference: bool = False) -> list[Path]:
    """``list_images(item)``, reporting on one line what a directory held but was left out."""
    from ..data.images import list_images

    skipped: list[Path] = []
    found = list_images(item, skipped=skipped)
    if skipped:
        report(_skipped_summary(item, skipped, reference))
    return found


def collect_inputs(items: list[str]) -> tuple[list[Path], int]:
    """(image paths, number of failed items) of the files and folders ``items``; each item that
    cannot be listed or holds no image is reported on one line and counts as a failure."""
    from ..errors import ClipadError

    failures, paths = 0, []
    for item in items:
        try:
            found = _list_inputs(item)
        except ClipadError as exc:
            report(str(exc))
            failures += 1
            continue
        if not found:
            report(f"'{item}' holds no images ({', '.join(sorted(e.lstrip('.') for e in _exts()))}); skipped")
            failures += 1
        paths.extend(found)
    return paths, failures


def read_references(args: argparse.Namespace) -> tuple[list, list[Path], int]:
    """(images, their paths, failures) of ``--reference``; each unreadable one is reported on one line."""
    from ..data.images import load_image
    from ..errors import ImageReadError

    images, paths, failures = [], [], 0
    for item in args.reference or []:
        for p in _list_inputs(item, reference=True):
            try:
                images.append(load_image(p, max_pixels=max_image_pixels(args)))
                paths.append(p)
            except ImageReadError as exc:
                report(f"reference {exc}; skipped")
                failures += 1
    return images, paths, failures


def _load_batch(paths: list[Path], max_pixels: int | None = None):
    from ..errors import ImageReadError
    from ..data.images import load_image

    ok, images, errors = [], [], []
    for p in paths:
        try:
            images.append(load_image(p, max_pixels=max_pixels))
            ok.append(p)
        except ImageReadError as exc:
            errors.append(exc)
    return ok, images, errors


def _prefetched_batches(paths: list[Path], batch_size: int, max_pixels: int | None = None):
    """(paths, PIL images, read errors) per batch; the next batch is decoded in a background
    thread while the caller scores the current one (PIL releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_batch, chunks[0], max_pixels) if chunks else None
        for i in range(len(chunks)):
            batch = pending.result()
            pending = pool.submit(_load_batch, chunks[i + 1], max_pixels) if i + 1 < len(chunks) else None
            yield batch


class _ScoresCSV:
    """scores.csv, appended one batch at a time.

    Incremental rather than written once at the end: a crash, a kill or an interrupt at image 900
    keeps the 899 rows before it. The header is written first and each batch's rows go out in one
    write + flush, so between batches the file is complete CSV; if a write fails (disk full) the
    file is cut back to its last complete row and later rows are not attempted (one error line).
    """

    def __init__(self, path: Path, columns: tuple[str, ...] = SCORES_COLUMNS) -> None:
        self.path = path
        self.rows = 0
        self.error: str | None = None
        self._pending: list[tuple[str, ...]] = []
        self._file = open(path, "wb")  # bytes: the text is encoded as UTF-8 whatever the locale
        try:  # the header, or OSError: a file that cannot take its header is not worth a run
            self._file.write((",".join(columns) + "\r\n").encode("utf-8"))
            self._file.flush()
        except OSError:
            self._file.close()
            raise
        self._good = self._file.tell()

    def add(self, path: Path, score: float, heatmap: str, *more: str) -> None:
        from ..eval.files import display_path

        self._pending.append((display_path(path), f"{score:.6f}", heatmap, *more))

    def flush(self) -> None:
        rows, self._pending = self._pending, []
        if rows and not self.error and self._write(rows):
            self.rows += len(rows)

    def close(self) -> None:
        self.flush()
        try:
            self._file.close()
        except OSError as exc:
            self._fail(exc)

    def _write(self, rows) -> bool:
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        try:
            self._file.write(buf.getvalue().encode("utf-8"))
            self._file.flush()
            self._good = self._file.tell()
            return True
        except OSError as exc:
            self._fail(exc)
            return False

    def _fail(self, exc: OSError) -> None:
        from ..eval.files import write_error_message

        if self.error is None:
            self.error = write_error_message(self.path, exc) + f"; it holds the first {self.rows} row(s)"
        try:  # drop a partly written row so the file stays valid CSV
            os.truncate(self.path, self._good)
        except OSError:
            pass


def _decisions(det, args: argparse.Namespace) -> tuple[bool, bool]:
    """(labels?, masks?): whether an image / pixel threshold applies, the detector's calibrated
    ones for --class-name or --threshold / --pixel-threshold; a note when the detector's
    thresholds are for other classes only."""
    th = det.thresholds_for(args.class_name)
    if th is None and det.thresholds:
        from ..eval.files import display_text

        classes = ", ".join(repr(display_text(c)) for c in sorted(det.thresholds))
        report(f"note: the detector's thresholds are for class(es) {classes}, none for "
               f"'{display_text(args.class_name or 'object')}': no labels unless given --class-name or --threshold")
    return (args.threshold is not None or (th is not None and th.image is not None),
            args.pixel_threshold is not None or (th is not None and th.pixel is not None))


def _write_mask(path: Path, mask) -> int:
    """masks/<name>.png: the bool mask [H, W] as an 8-bit PNG, 255 = anomalous; 1 if not written."""
    import numpy as np
    from PIL import Image

    from ..eval.files import atomic_write, write_error_message

    try:
        with atomic_write(path, "wb") as f:
            Image.fromarray(mask.astype(np.uint8) * 255).save(f, format="PNG")
        return 0
    except OSError as exc:
        report(write_error_message(path, exc))
        return 1


def _read_inputs(args: argparse.Namespace) -> tuple[list, list | None, int] | int:
    """The images to score and the ``--reference`` images (None without the flag), with the count
    of inputs that failed (each reported); or the exit code when there is nothing to do."""
    paths, failures = collect_inputs(args.images)
    if not paths:
        report("no images to process")
        return EXIT_FAILED_INPUTS
    refs = None
    if args.reference:
        refs, _, failed = read_references(args)
        failures += failed
        if not refs:
            report("none of the --reference images could be read")
            return EXIT_FAILED_INPUTS
    return paths, refs, failures


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from ..eval.files import atomic_write, display_path, write_error_message
    from ..eval import viz

    if args.ray is not None:
        return _cmd_predict_ray(args)
    read = _read_inputs(args)
    if isinstance(read, int):
        return read
    paths, refs, failures = read
    det = _onnx_model(args) if args.model else build_detector(args)
    if refs:
        det.set_reference(refs, class_name=None)

    out = Path(args.out)
    try:
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
        if args.save_maps:
            (out / "maps").mkdir(parents=True, exist_ok=True)
        labelled, masked = _decisions(det, args)
        if masked:
            (out / "masks").mkdir(parents=True, exist_ok=True)
        scores = _ScoresCSV(out / "scores.csv", SCORES_COLUMNS + (("label",) if labelled else ()))
    except OSError as exc:  # nothing could be saved: stop before scoring anything
        report(f"{write_error_message(exc.filename or out, exc)}; choose another --out")
        return EXIT_FAILED_INPUTS

    output_failures = anomalous = 0
    used: set[str] = set()
    bar = tqdm(total=len(paths), desc=f"{det.name}", unit="img", file=sys.stderr, disable=args.quiet)
    try:
        # a transductive method (MuSc) scores all the inputs together, as one set of one class
        chunk = len(paths) if getattr(det, "transductive", False) else args.batch_size
        for batch_paths, images, errors in _prefetched_batches(paths, chunk, max_image_pixels(args)):
            for exc in errors:
                report(f"{exc}; skipped")
                failures += 1
            if images:
                pred = det.predict(images, class_name=args.class_name, batch_size=args.batch_size,
                                   threshold=args.threshold, pixel_threshold=args.pixel_threshold)
                for i, (p, img) in enumerate(zip(batch_paths, images)):
                    amap = np.asarray(pred.anomaly_maps[i])  # a tensor, or an array (--model)
                    score = float(pred.image_scores[i])
                    name = _unique_name(_output_stem(p), used)
                    heatmap = out / "heatmaps" / f"{name}.png"
                    try:
                        viz.save_overlay_png(heatmap, img, amap, score=score, title=p.name,
                                             vmin=args.vmin, vmax=args.vmax)
                        heatmap_cell = f"heatmaps/{name}.png"
                    except Exception as exc:  # noqa: BLE001 - one lost figure must not lose the run
                        report(f"{write_error_message(heatmap, exc)}; the score of '{display_path(p)}' is in scores.csv")
                        output_failures += 1
                        heatmap_cell = ""
                    if args.save_maps:
                        npy = out / "maps" / f"{name}.npy"
                        try:
                            with atomic_write(npy, "wb") as f:
                                np.save(f, amap.astype(np.float32))
                        except OSError as exc:
                            report(write_error_message(npy, exc))
                            output_failures += 1
                    if pred.masks is not None:
                        output_failures += _write_mask(out / "masks" / f"{name}.png", np.asarray(pred.masks[i]))
                    if pred.labels is not None:
                        anomalous += bool(pred.labels[i])
                    scores.add(p, score, heatmap_cell, *([str(int(pred.labels[i]))] if labelled else []))
            scores.flush()
            bar.update(len(batch_paths) + len(errors))
    finally:
        bar.close()
        scores.close()
    if scores.error:
        report(scores.error)
        output_failures += 1
    print(f"{scores.rows} image(s) scored -> {display_path(out / 'scores.csv')}, "
          f"heatmaps in {display_path(out / 'heatmaps')}")
    if labelled:
        print(f"{anomalous} labelled anomalous (label column)" + (f", masks in {display_path(out / 'masks')}" if masked else ""))
    if failures or output_failures:
        parts = [f"{failures} input(s) failed"] if failures else []
        parts += [f"{output_failures} output file(s) not written"] if output_failures else []
        report(f"{', '.join(parts)}; see the lines above")
        return EXIT_FAILED_INPUTS
    return EXIT_OK


def _cmd_predict_ray(args: argparse.Namespace) -> int:
    """``--ray``: :func:`clipad.distributed.predict`; scores.csv, shards/ and maps/ under --out."""
    from ..distributed.runtime import require_ray
    from ..eval.files import display_path

    require_ray()  # the one clear line before anything is read or built
    read = _read_inputs(args)
    if isinstance(read, int):
        return read
    paths, refs, failures = read
    det = build_detector(args)
    from .. import distributed

    summary = distributed.predict(
        paths, args.out, detector=det, references=refs, class_name=args.class_name, batch_size=args.batch_size,
        save_maps=args.save_maps, progress=not args.quiet, max_pixels=max_image_pixels(args), **ray_options(args),
    )
    failures += len(summary["failed"])
    resumed = f", {summary['skipped_resumed']} done by an earlier run" if summary["skipped_resumed"] else ""
    print(f"{summary['scored']} image(s) scored{resumed} -> {display_path(summary['scores'])}; "
          f"{summary['images_per_s']:.1f} images/s, {summary['shards']} shard(s)"
          + (f", maps in {display_path(Path(args.out) / 'maps')}" if args.save_maps else ""))
    if failures:
        report(f"{failures} input(s) failed; see the lines above")
        return EXIT_FAILED_INPUTS
    return EXIT_OK


#: options of the single-process path that --ray does not take: (dest, flag)
_NOT_WITH_RAY = (("model", "--model"), ("threshold", "--threshold"), ("pixel_threshold", "--pixel-threshold"),
                 ("vmin", "--vmin"), ("vmax", "--vmax"), ("compile", "--compile"))


def _check_ray(ns: argparse.Namespace) -> str | None:
    """--ray writes scores and maps (no heatmaps, no masks) with the detector's own thresholds."""
    if getattr(ns, "ray", None) is None:
        return None
    given = [flag for dest, flag in _NOT_WITH_RAY if getattr(ns, dest, None) not in (None, False)]
    if given:
        return (f"argument {given[0]}: not with --ray, which writes scores (with the detector's calibrated labels) "
                "and maps, no heatmaps or masks; leave it out, or run without --ray")
    return None


def _exts():
    from ..data.images import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS



def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="score images and write heatmaps",
                       description="Score images (files or directories) and write scores.csv plus a heatmap overlay per image.")
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and/or directories (searched recursively)")
    try:
        add_model_args(p)
    except ModuleNotFoundError as exc:  # a deployment without torch: exported models only
        if exc.name != "torch":
            raise
        p.add_argument("--batch-size", type=positive_int, default=8, help="images per model call (default: 8)")
        p.set_defaults(torch_missing=True)
    p.add_argument("--model", type=existing_file, default=None, metavar="MODEL.onnx",
                   help="score with a model from `clipad export` (onnxruntime, no torch needed) instead of a method or "
                   "--detector; it fixes the method, class, references and thresholds, so model options are refused")
    p.add_argument("--reference", nargs="+", action="extend", type=existing_path, metavar="GOOD", default=None,
                   help="known-good reference images or directories (k-shot; methods with few-shot support); "
                   "takes every path after it, so give it after the images (predict IMAGES --reference GOOD...) "
                   "or end its list with --; repeatable")
    p.add_argument("--class-name", default=None, type=non_empty, help="product name used in text prompts (default: 'object')")
    p.add_argument("--out", default="clipad_out", type=output_dir,
                   help="output directory, created if missing (default: clipad_out)")
    p.add_argument("--save-maps", action="store_true", help="also save each raw anomaly map as maps/<name>.npy (float32, image size)")
    p.add_argument("--vmin", type=finite_float, default=None,
                   help="colour scale minimum of heatmaps, below --vmax (default: per image)")
    p.add_argument("--vmax", type=finite_float, default=None, help="colour scale maximum of heatmaps (default: per image)")
    p.add_argument("--threshold", type=finite_float, default=None,
                   help="score at or above which an image is labelled anomalous: a 'label' column (1/0) in scores.csv "
                   "(default: the detector's calibrated threshold, see clipad calibrate; else no labels)")
    p.add_argument("--pixel-threshold", type=finite_float, default=None,
                   help="map value at or above which a pixel is anomalous: masks/<name>.png (255 anomalous, 0 normal) "
                   "(default: the detector's calibrated pixel threshold; else no masks)")
    add_max_image_pixels_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_args(p)
    p.set_defaults(func=cmd_predict)
    p.checks.append(_check_colour_scale)
    p.checks.append(_check_ray)
    p.checks.insert(0, _check_onnx_model)  # before the model options' check fills in their defaults
    p.hints.append(_hint_swallowed_images)


#: options that an exported model fixes: (dest, flag)
_MODEL_FIXES = (("detector", "--detector"), ("method", "--method"), ("backbone", "--backbone"),
                ("pretrained", "--pretrained"), ("image_size", "--image-size"), ("device", "--device"),
                ("precision", "--precision"), ("init_seed", "--init-seed"), ("set", "--set"), ("reference", "--reference"))


def _check_onnx_model(ns: argparse.Namespace) -> str | None:
    """--model excludes the options of a torch model; without torch, --model is the only way."""
    if getattr(ns, "torch_missing", False) and not ns.model:
        return ("argument --model: torch is not installed, so only an exported model can score: give --model "
                "MODEL.onnx (from `clipad export`), or install torch for the methods")
    if not ns.model:
        return None
    given = [flag for dest, flag in _MODEL_FIXES if getattr(ns, dest, None) not in (None, [])]
    given += ["--compile"] if getattr(ns, "compile", False) else []
    given += ["--quick-gelu"] if getattr(ns, "quick_gelu", "auto") != "auto" else []
    if not getattr(ns, "torch_missing", False):
        from .common import option_items

        given += [flag for flag, _, _ in option_items(ns) if flag != "--set"]
    if given:
        return (f"argument {given[0]}: not allowed with --model, whose export fixed the method, backbone, class, "
                "references and image size; leave it out (with --model: --class-name, --batch-size, --threshold, "
                "--pixel-threshold and the output options)")
    return None


def _onnx_model(args: argparse.Namespace):
    """The exported model of ``--model`` (onnxruntime; imports no torch), checked against --class-name."""
    from ..deploy.runtime import OnnxDetector

    det = OnnxDetector(args.model)
    det.check_class(args.class_name)
    return det


def _check_colour_scale(ns: argparse.Namespace) -> str | None:
    if ns.vmin is not None and ns.vmax is not None and not ns.vmin < ns.vmax:
        return f"argument --vmin/--vmax: --vmin must be below --vmax; got --vmin {ns.vmin:g} --vmax {ns.vmax:g}"
    return None


def _hint_swallowed_images(message: str, ns: argparse.Namespace | None) -> str | None:
    """No images but a --reference list: it took the paths meant as images (nargs '+')."""
    if "IMAGES_OR_DIRS" in message and "required" in message and ns is not None and getattr(ns, "reference", None):
        return (f"argument IMAGES_OR_DIRS: none given: --reference took every path after it "
                f"({', '.join(ns.reference)}); give the images before --reference, or end its list with --")
    return None
