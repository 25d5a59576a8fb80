"""``clipad eval``: run a detector over a benchmark dataset and report per-class metrics.

Protocol (as the official AnomalyCLIP / AdaptCLIP evaluations): images are resized to the
method's input size (square; methods that tile non-square images, AnoCLIP, keep the aspect ratio); maps are compared with masks at the evaluation size (default: that same
input size), masks resized there by nearest neighbour; metrics per class, then their mean over
classes (classes where a metric is undefined are left out of that mean and named).

Resizing (``resize``): ``"torch"`` (default) is ``predict``'s antialiased bicubic resize of
float tensors (:func:`clipad.data.transforms.resize_batch`), masks by nearest neighbour;
``"pil"`` is the official test scripts' (:mod:`clipad.data.official`): images and references PIL
bicubic, masks PIL bilinear then > 0.5, the inputs behind the papers' numbers.

Maps are held as float16 at the evaluation size for one class at a time, so memory is bounded
by the largest class, not by the dataset (VisA's largest class at 518 px: about 0.3 GB).
A transductive method (MuSc) gets each class's whole test set in one call
(:meth:`~clipad.methods.base.Detector.score_normalized_set`), its backbone still batch by batch.

A file that cannot be read is skipped, listed in ``RunResult.failures`` and announced at once by a
:class:`~clipad.errors.SkippedInputWarning`; undefined metrics by an ``UndefinedMetricWarning``
naming the class. Nothing here prints: the CLI shows warnings as ``clipad:`` lines.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as metrics_mod
from .files import atomic_write, display_text, write_error_message, write_text_atomic
from ..errors import ClipadError, ImageReadError, OutputWriteError, SkippedInputWarning
from ..data.transforms import equal_runs

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


@dataclass
class ClassResult:
    """Everything one class of one run produced."""

    name: str
    metrics: dict[str, float]
    n_images: int
    n_anomalous: int
    scores: np.ndarray  # [N]
    labels: np.ndarray  # [N]
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunResult:
    method: str
    classes: list[ClassResult]
    mean: dict[str, float]
    excluded: dict[str, list[str]]
    failures: list[str]
    seconds: float


RESIZE_MODES = ("torch", "pil")


class ToModelTensor:
    """PIL image -> [3, h, w] float at the detector's input size for it (square, or aspect kept
    for methods that tile), resized as ``predict`` does (``resize="torch"``) or as the official
    test scripts do (``"pil"``). A class so DataLoader workers can pickle it."""

    def __init__(self, input_size, resize: str = "torch") -> None:
        self.input_size = input_size
        self.resize = resize

    def __call__(self, image):
        from ..data.transforms import pil_to_tensor, resize_batch

        if self.resize == "pil":
            from ..data.official import pil_resize_to_tensor

            return pil_resize_to_tensor(image, self.input_size((image.height, image.width)))
        t = pil_to_tensor(image)
        return resize_batch([t], self.input_size(tuple(t.shape[-2:])), t.device)[0]


def resize_mask(mask: torch.Tensor, size: int, resize: str = "torch") -> torch.Tensor:
    """bool [H, W] -> bool [size, size]: nearest neighbour, or (``"pil"``) the official PIL bilinear + > 0.5."""
    if resize == "pil":
        from ..data.official import official_mask

        return official_mask(mask, size) > 0.5
    if tuple(mask.shape) == (size, size):
        return mask
    return F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0.5


def evaluate_class(
    det, samples, class_name: str, *, eval_size: int, batch_size: int, workers: int,
    protocol: str, n_examples: int, progress, failures: list[str], metrics_device: str | None = None,
    resize: str = "torch", max_pixels: int | None = None,
) -> ClassResult | None:
    """Score one class's test samples and compute its metrics (``resize``: see the module docstring;
    ``max_pixels``: the size limit of images and masks, None = Pillow's, see :func:`clipad.data.images.load_image`)."""
    from ..data import make_loader

    cuda = det.device.type == "cuda"
    loader = make_loader(
        samples, batch_size, transform=ToModelTensor(det.input_size, resize), num_workers=workers, pin_memory=cuda,
        max_pixels=max_pixels,
    )
    # scores and maps stay on the device until the class is done: no host synchronisation per batch
    scores, labels, maps, masks, known, kept = [], [], [], [], [], []
    pending: list[torch.Tensor] = []  # a transductive method scores the whole class at once, below

    def keep(s: torch.Tensor, m: torch.Tensor) -> None:
        if tuple(m.shape[-2:]) != (eval_size, eval_size):
            m = F.interpolate(m[:, None], size=(eval_size, eval_size), mode="bilinear", align_corners=False)[:, 0]
        scores.append(s)
        maps.append(m.to(torch.float16))

    for batch in loader:
        for fail in batch.failures:
            failures.append(str(fail))
            warnings.warn(str(fail), SkippedInputWarning, stacklevel=2)
        if isinstance(batch.images, torch.Tensor):
            runs = [batch.images]
        else:
            images = list(batch.images)
            runs = [torch.stack(images[i:j]) for i, j in equal_runs([tuple(t.shape) for t in images])]
        for run in runs:
            x = det.backbone.normalize(run.to(det.device, non_blocking=True))
            if getattr(det, "transductive", False):
                pending.append(x)
            else:
                keep(*det.score_normalized(x, class_name=class_name))
        for smp, mk in zip(batch.samples, batch.masks):
            labels.append(smp.label)
            known.append(mk is not None)
            masks.append(resize_mask(mk, eval_size, resize) if mk is not None else torch.zeros(eval_size, eval_size, dtype=torch.bool))
            kept.append(smp)
        progress.update(len(batch) + len(batch.failures))
    if pending:
        keep(*det.score_normalized_set(pending, class_name=class_name))
    if not kept:
        return None
    scores_np = torch.cat(scores).cpu().numpy().astype(np.float64)
    labels_np = np.asarray(labels, dtype=np.int64)
    # pixel metrics where the maps are (the detector's device unless metrics_device says otherwise):
    # at 518 px they sort ~0.3 G values per MVTec-sized run, too slow for a CPU to keep up with a GPU
    maps_t = torch.cat(maps).to(metrics_device or det.device)
    masks_t = torch.stack(masks)
    known_t = torch.tensor(known)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = metrics_mod.compute(scores_np, labels_np, protocol=protocol)
        if bool(known_t.any()):
            pix = metrics_mod.compute(
                scores_np[known_t.numpy()], labels_np[known_t.numpy()], maps_t[known_t.to(maps_t.device)],
                masks_t[known_t].to(maps_t.device), protocol=protocol
            )
            row.update({k: v for k, v in pix.items() if k.startswith("pixel_")})
    # re-issued naming the class, each once: the pixel call repeats the image metrics' warnings
    for msg, category in {str(w.message): w.category for w in caught}.items():
        warnings.warn(f"class '{class_name}': {msg}", category, stacklevel=2)

    from .report import select_examples

    examples = []
    for i in select_examples(scores_np, [class_name] * len(kept), k=n_examples):
        smp = kept[i]
        try:
            from ..data.images import load_image

            img = load_image(smp.image_path, max_pixels=max_pixels).resize((eval_size, eval_size))
        except ImageReadError:
            continue
        examples.append({
            "path": str(smp.image_path), "class_name": class_name, "score": float(scores_np[i]),
            "label": int(labels_np[i]), "image": img, "amap": maps_t[i].float().cpu().numpy(),
            "mask": masks_t[i].numpy() if known[i] and labels_np[i] == 1 else None,
        })
    return ClassResult(class_name, row, len(kept), int(labels_np.sum()), scores_np, labels_np, examples)


def checked_classes(dataset, classes: list[str] | None, resize: str) -> list[str]:
    """The classes to evaluate (None: all of ``dataset``'s), each checked to exist, and the
    ``resize`` mode checked; one :class:`ClipadError` naming the valid values otherwise."""
    names = classes or list(dataset.classes)
    missing = [c for c in names if c not in dataset.classes]
    if missing:
        raise ClipadError(f"class(es) {missing} not in the dataset; it has: {', '.join(dataset.classes)}")
    if resize not in RESIZE_MODES:
        raise ClipadError(f"resize={resize!r} is not a resize mode; use one of {', '.join(RESIZE_MODES)}")
    return names


def set_class_reference(det, class_name: str, paths: list[Path], *, resize: str, max_pixels: int | None) -> None:
    """Read the reference images ``paths`` and set them as ``class_name``'s references, resized as
    the test images are (``resize="pil"``: tensors at the model size, not resized again).

    Raises:
        ImageReadError: a reference cannot be read (the caller skips the class).
    """
    from ..data.images import load_image

    images = [load_image(p, max_pixels=max_pixels) for p in paths]
    if resize == "pil":
        from ..data.official import pil_resize_to_tensor

        det.set_reference([pil_resize_to_tensor(img, det.model_size) for img in images], class_name=class_name)
    else:
        det.set_reference(images, class_name=class_name)


def run(
    det, dataset, *, classes: list[str] | None, shots: int, seed: int, eval_size: int | None,
    batch_size: int, workers: int, protocol: str, n_examples: int, quiet: bool, metrics_device: str | None = None,
    resize: str = "torch", max_pixels: int | None = None,
) -> RunResult:
    """Evaluate ``det`` on the test images of ``classes`` (default: all) of ``dataset``.

    ``max_pixels``: largest ``width * height`` of any image, reference or mask read, checked
    before decoding, in the worker processes too (None: Pillow's decompression-bomb limit; see
    :func:`clipad.data.images.load_image`).
    """
    from tqdm import tqdm

    from ..data import few_shot_split

    t0 = time.perf_counter()
    names = checked_classes(dataset, classes, resize)
    eval_size = eval_size or det.image_size
    plan = [(c, *few_shot_split(dataset, c, shots, seed)) for c in names]
    total = sum(len(test) for _, _, test in plan)
    failures: list[str] = []
    results: list[ClassResult] = []
    with tqdm(total=total, desc=f"{det.name} eval", unit="img", file=sys.stderr, disable=quiet) as bar:
        for cls, refs, test in plan:
            if shots:
                try:
                    set_class_reference(det, cls, refs, resize=resize, max_pixels=max_pixels)
                except ImageReadError as exc:
                    failures.append(f"reference {exc}; class '{cls}' skipped")
                    warnings.warn(failures[-1], SkippedInputWarning, stacklevel=2)
                    bar.update(len(test))
                    continue
            bar.set_postfix_str(cls)
            res = evaluate_class(
                det, test, cls, eval_size=eval_size, batch_size=batch_size, workers=workers, metrics_device=metrics_device,
                protocol=protocol, n_examples=n_examples, progress=bar, failures=failures, resize=resize,
                max_pixels=max_pixels,
            )
            if shots:
                det.clear_reference(cls)
            if res is not None:
                results.append(res)
    summary = metrics_mod.mean_over_classes({r.name: r.metrics for r in results})
    return RunResult(det.name, results, summary.mean, summary.excluded, failures, time.perf_counter() - t0)


# -- output ------------------------------------------------------------------------------------
def table_rows(result: RunResult) -> list[dict[str, Any]]:
    rows = []
    for r in result.classes:
        rows.append({"class": r.name, "n_images": r.n_images, "n_anomalous": r.n_anomalous, **r.metrics})
    rows.append({
        "class": "mean", "n_images": sum(r.n_images for r in result.classes),
        "n_anomalous": sum(r.n_anomalous for r in result.classes), **result.mean,
    })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in METRIC_KEYS if any(k in r for r in rows)]
    header = ["class", "n", "anom"] + [k.replace("_", " ") for k in keys]
    body = []
    for r in rows:
        cells = [display_text(r["class"]), str(r["n_images"]), str(r["n_anomalous"])]
        for k in keys:
            v = r.get(k, math.nan)
            cells.append("n/a*" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}")
        body.append(cells)
    widths = [max(len(c[i]) for c in [header] + body) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [line(c) for c in body[:-1]] + ["-" * (sum(widths) + 2 * (len(widths) - 1)), line(body[-1])]
    return "\n".join(out)


def _displayable(value: Any) -> Any:
    """``value`` with every string (dict keys too) as :func:`~.files.display_text` shows it, so
    class names and paths from undecodable file names serialise as visible ``\\xNN``."""
    if isinstance(value, str):
        return display_text(value)
    if isinstance(value, dict):
        return {_displayable(k): _displayable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_displayable(v) for v in value]
    return value


def write_outputs(result: RunResult, out: Path, config: dict[str, Any]) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.csv``, ``curves.png`` and ``report.html`` into ``out``.

    Each file is written to a temporary name and renamed into place, so none is ever left
    truncated; one that cannot be written (disk full, no permission) does not stop the others.

    Returns:
        ``{"json", "csv", "curves", "report"}`` -> path of each file written.

    Raises:
        OutputWriteError: after trying every file, if any could not be written; its
            ``problems`` say which and why (one line each), its ``written`` holds the rest.
    """
    from .report import write_report
    from .viz import save_roc_pr_png

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError([write_error_message(out, exc)]) from exc
    written: dict[str, Path] = {}
    problems: list[str] = []
    first_error: BaseException | None = None

    def attempt(key: str, path: Path, write) -> None:
        nonlocal first_error
        try:
            write(path)
            written[key] = path
        except Exception as exc:  # noqa: BLE001 - one output's failure must not lose the others
            problems.append(write_error_message(path, exc))
            first_error = first_error or exc

    rows = table_rows(result)
    nan = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    payload = _displayable({
        "config": config,
        "classes": {r.name: {k: nan(v) for k, v in r.metrics.items()} | {"n_images": r.n_images, "n_anomalous": r.n_anomalous} for r in result.classes},
        "mean": {k: nan(v) for k, v in result.mean.items()},
        "excluded_from_mean": {k: v for k, v in result.excluded.items() if v},
        "failures": result.failures,
        "seconds": round(result.seconds, 3),
    })
    attempt("json", out / "metrics.json", lambda p: write_text_atomic(p, json.dumps(payload, indent=2)))

    keys = ["class", "n_images", "n_anomalous"] + [k for k in METRIC_KEYS if any(k in r for r in rows)]

    def write_csv(path: Path) -> None:
        with atomic_write(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                cells = {k: ("" if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k, "")) for k in keys}
                w.writerow(cells | {"class": display_text(r["class"])})

    attempt("csv", out / "metrics.csv", write_csv)
    attempt("curves", out / "curves.png", lambda p: save_roc_pr_png(
        p, {r.name: (r.scores, r.labels) for r in result.classes}, title=f"{result.method}: image-level ROC and PR",
    ))
    notes = [f"{len(result.failures)} file(s) could not be read and were skipped."] if result.failures else []
    for k, v in result.excluded.items():
        if v:
            notes.append(f"{k}: undefined for {', '.join(v)} (no anomalous or no normal samples); left out of the mean.")
    if "curves" not in written:
        notes.append("curves.png could not be written; the curves are missing from this report.")
    attempt("report", out / "report.html", lambda p: write_report(
        p.parent, title=f"{result.method} on {config.get('dataset')} ({config.get('shots', 0)}-shot)", config=config,
        table=rows, notes=notes, curve_pngs=[written["curves"]] if "curves" in written else [],
        examples=[e for r in result.classes for e in r.examples],
    ))
    if problems:
        raise OutputWriteError(problems, written) from first_error
    return written


# -- CLI ---------------------------------------------------------------------------------------


