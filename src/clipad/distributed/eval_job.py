"""``clipad.distributed.evaluate``: :func:`clipad.eval.run.run` with the scoring on Ray Data
(``clipad eval --ray``).

Every test image is scored by a detector actor, exactly as the single-process evaluation scores
it (its transform, its resizing of maps and masks, float16 maps at the evaluation size); the
shards are merged into each image once (:func:`~clipad.distributed.shards.merge_rows` raises on
a missing image or on conflicting duplicates, so a padded or lost shard cannot bias a metric) and
every metric is computed once, per class, on the union, on the driver, then averaged as
:func:`clipad.eval.run.run` does. The result is a :class:`~clipad.eval.run.RunResult`, so
``clipad eval`` writes the same files either way.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError, SkippedInputWarning
from .predict_job import _UNSET, build_detector


def evaluate(
    dataset,
    out_dir: str | os.PathLike,
    *,
    detector=None,
    method: str = "winclip",
    backbone: str | None = None,
    pretrained: Any = _UNSET,
    options: Mapping[str, Any] | None = None,
    classes: list[str] | None = None,
    shots: int = 0,
    seed: int = 10,
    eval_size: int | None = None,
    protocol: str = "anomalyclip",
    resize: str = "torch",
    n_examples: int = 3,
    metrics_device: str | None = None,
    max_pixels: int | None = None,
    address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1,
    batch_size: int = 16,
    resume: bool = False,
    progress: bool = True,
):
    """Evaluate a detector on the test images of ``dataset`` with detector actors on Ray Data.

    Args:
        dataset: an :class:`~clipad.data.AnomalyDataset` (:func:`clipad.data.create_dataset`).
        out_dir: where the shards go (``shards/``, ``maps/``, ``_job/``); the CLI writes
            metrics.json and the report beside them.
        detector, method, backbone, pretrained, options: as :func:`clipad.distributed.predict`.
        classes, shots, seed, eval_size, protocol, resize, n_examples, metrics_device,
            max_pixels: as :func:`clipad.eval.run.run` (references are sampled and encoded on
            the driver, one set per class, and travel in the detector file).
        address, actors, gpus_per_actor, cpus_per_actor, batch_size, resume, progress: as
            :func:`clipad.distributed.predict`.

    Returns:
        A :class:`~clipad.eval.run.RunResult` (``seconds``: the whole call).
    """
    import torch

    from ..data import few_shot_split
    from ..eval import metrics as metrics_mod
    from ..eval.files import display_path, display_text
    from ..eval.run import RunResult, checked_classes, set_class_reference
    from . import pipeline
    from .runtime import check_resources, require_ray, session
    from .shards import MAPS_DIR, merge_rows, read_shards
    from .worker import decode_sample

    t0 = time.perf_counter()
    check_resources(actors, gpus_per_actor, cpus_per_actor, batch_size)
    require_ray()
    if not hasattr(dataset, "classes"):
        from ..errors import InvalidTypeError

        raise InvalidTypeError(f"dataset must be a clipad.data.AnomalyDataset (clipad.data.create_dataset); got {type(dataset).__name__}")
    det = build_detector(detector, method, backbone, pretrained, options)
    names = checked_classes(dataset, classes, resize)
    eval_size = eval_size or det.image_size
    failures: list[str] = []
    plan = []
    for cls in names:
        refs, test = few_shot_split(dataset, cls, shots, seed)
        if shots:  # on the driver, as the single-process run sets them; the file carries every class's
            try:
                set_class_reference(det, cls, refs, resize=resize, max_pixels=max_pixels)
            except ImageReadError as exc:
                failures.append(f"reference {exc}; class '{cls}' skipped")
                warnings.warn(failures[-1], SkippedInputWarning, stacklevel=2)
                continue
        plan.append((cls, list(test)))

    items: list[dict[str, Any]] = []
    seen: dict[str, int] = {}  # a sample listed twice is scored (and counted) twice, as in a single process
    for cls, test in plan:
        for smp in test:
            key = f"{display_text(cls)}/{display_path(smp.image_path)}"
            seen[key] = n = seen.get(key, -1) + 1
            items.append({
                "index": len(items), "id": key + (f"#{n}" if n else ""), "fspath": os.fsencode(smp.image_path),
                "class_name": cls, "label": int(smp.label),
                "mask_fspath": os.fsencode(smp.mask_path) if smp.mask_path is not None else b"",
            })
    out = Path(out_dir)
    config = {"kind": "eval", "dataset": getattr(dataset, "name", None), "root": str(getattr(dataset, "root", None)),
              "classes": [c for c, _ in plan], "shots": shots, "seed": seed, "eval_size": eval_size, "resize": resize,
              **pipeline.detector_config(det)}
    blob, done = pipeline.prepare(out, det, config, resume)
    for cls, _ in plan if shots else ():  # saved in the file; ``det`` is left as the single-process run leaves it
        det.clear_reference(cls)
    todo = [it for it in items if it["id"] not in done]
    job = {"kind": "eval", "out_dir": str(out), "eval_size": eval_size, "resize": resize}
    with session(address, min_cpus=actors * cpus_per_actor + 1) as ray:
        res = pipeline.run(
            todo, blob=blob, job=job, decode=decode_sample,
            decode_kwargs={"eval_size": eval_size, "resize": resize, "max_pixels": max_pixels},
            actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
            progress=progress, desc=f"{det.name} eval (ray)", total=len(items), resumed=len(items) - len(todo), ray=ray,
        )
    failures += [line for _, line in res.failed]
    shards = read_shards(out)
    merged = merge_rows(shards, expected=[it["id"] for it in items], failed=[p for p, _ in res.failed])
    arrays: dict[str, Any] = {}
    by_class: dict[str, list[tuple[int, dict[str, Any], str, int]]] = {}
    row_of = {(name, r["id"]): i for name, rows in shards for i, r in enumerate(rows)}
    for key, (shard, row) in merged.rows.items():
        by_class.setdefault(row["class_name"], []).append((row["index"], row, shard, row_of[shard, key]))

    results = []
    for cls, _ in plan:
        entries = sorted(by_class.get(cls, []), key=lambda e: e[0])
        if not entries:
            continue
        for _, _, shard, _ in entries:
            if shard not in arrays:
                with np.load(out / MAPS_DIR / f"{shard}.npz") as z:
                    arrays[shard] = {"maps": z["maps"], "masks": z["masks"]}
        rows = [e[1] for e in entries]
        maps = torch.from_numpy(np.stack([arrays[s]["maps"][i] for _, _, s, i in entries]))
        masks = torch.from_numpy(np.stack([arrays[s]["masks"][i] for _, _, s, i in entries]))
        results.append(_class_result(
            cls, rows, maps, masks, protocol=protocol, metrics_device=metrics_device or "cpu",
            n_examples=n_examples, eval_size=eval_size, max_pixels=max_pixels, items=items,
        ))
    summary = metrics_mod.mean_over_classes({r.name: r.metrics for r in results})
    return RunResult(det.name, results, summary.mean, summary.excluded, failures, time.perf_counter() - t0)


def _class_result(cls, rows, maps, masks, *, protocol, metrics_device, n_examples, eval_size, max_pixels, items):
    """One class's :class:`~clipad.eval.run.ClassResult` from its merged rows, as
    :func:`clipad.eval.run.evaluate_class` computes it (same metric calls, same examples)."""
    import torch

    from ..data.images import load_image
    from ..eval import metrics as metrics_mod
    from ..eval.report import select_examples
    from ..eval.run import ClassResult

    scores_np = np.asarray([r["score"] for r in rows], dtype=np.float32).astype(np.float64)
    labels_np = np.asarray([r["label"] for r in rows], dtype=np.int64)
    known = np.asarray([r["mask_known"] for r in rows], dtype=bool)
    maps_t = maps.to(metrics_device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = metrics_mod.compute(scores_np, labels_np, protocol=protocol)
        if known.any():
            kt = torch.from_numpy(known)
            pix = metrics_mod.compute(scores_np[known], labels_np[known], maps_t[kt.to(maps_t.device)],
                                      masks[kt].to(maps_t.device), protocol=protocol)
            row.update({k: v for k, v in pix.items() if k.startswith("pixel_")})
    for msg, category in {str(w.message): w.category for w in caught}.items():
        warnings.warn(f"class '{cls}': {msg}", category, stacklevel=3)
    examples = []
    for i in select_examples(scores_np, [cls] * len(rows), k=n_examples):
        path = os.fsdecode(items[rows[i]["index"]]["fspath"])
        try:
            img = load_image(path, max_pixels=max_pixels).resize((eval_size, eval_size))
        except ImageReadError:
            continue
        examples.append({
            "path": path, "class_name": cls, "score": float(scores_np[i]), "label": int(labels_np[i]), "image": img,
            "amap": maps_t[i].float().cpu().numpy(), "mask": masks[i].numpy() if known[i] and labels_np[i] == 1 else None,
        })
    return ClassResult(cls, row, len(rows), int(labels_np.sum()), scores_np, labels_np, examples)
