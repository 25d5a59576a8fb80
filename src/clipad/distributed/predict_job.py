"""``clipad.distributed.predict``: score image files and folders on Ray Data (``clipad predict --ray``)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidValueError

_UNSET: Any = object()

#: columns of the merged scores.csv: ``shard`` and ``row`` find the map, maps/<shard>.npz[str(row)]
SCORES_COLUMNS = ("path", "score", "label", "shard", "row")


def build_detector(detector, method: str, backbone: str | None, pretrained: Any, options: Mapping[str, Any] | None):
    """The driver's detector: ``detector`` as given (a Detector, or a file saved with
    ``det.save``), else a new one of ``method`` on the CPU (it only encodes references and is
    saved; the actors build their own on their devices)."""
    import warnings

    from .. import api
    from ..methods.base import Detector

    kwargs = {} if pretrained is _UNSET else {"pretrained": pretrained}
    if isinstance(detector, Detector):
        if options or backbone is not None or kwargs:
            raise InvalidValueError("give either detector= or backbone=/pretrained=/options=, not both: a detector fixes them")
        det = detector
    elif detector is not None:
        if options or backbone is not None:
            raise InvalidValueError("detector= (a saved file) fixes the backbone and options; leave backbone= and options= out")
        det = api.load_detector(detector, device="cpu", **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")
            det = api.create_detector(method, backbone=backbone, device="cpu", **kwargs, **dict(options or {}))
    if getattr(det, "transductive", False):  # actors score batches; such a method needs a whole class at once
        raise InvalidValueError(
            f"method '{det.name}' is transductive (it scores a class's images against each other), so it cannot be "
            "split into batches across actors; run it without Ray (clipad predict / clipad eval without --ray)"
        )
    return det


def predict(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    detector=None,
    method: str = "winclip",
    backbone: str | None = None,
    pretrained: Any = _UNSET,
    options: Mapping[str, Any] | None = None,
    references=None,
    class_name: str | None = None,
    address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1,
    batch_size: int = 16,
    resume: bool = False,
    save_maps: bool = True,
    progress: bool = True,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Score every image under ``inputs`` with detector actors on Ray Data.

    Args:
        inputs: image files and/or directories (searched recursively, as ``clipad predict``).
        out_dir: output folder: ``scores.csv``, ``shards/``, ``maps/``, ``_job/`` (see
            :mod:`clipad.distributed`); created if missing.
        detector: a :class:`~clipad.methods.base.Detector` or a file saved with ``det.save``
            (references and calibrated thresholds travel with it); None builds ``method``.
        method, backbone, pretrained, options: as :func:`clipad.create_detector` (without a detector).
        references: known-good images (k-shot), set on the driver for ``class_name`` (on
            ``detector`` itself when one is given, as ``det.set_reference`` would).
        class_name: the product name of every input (prompts, references, thresholds).
        address: a Ray cluster (``ray start --head``'s address, ``auto``); None: a local
            instance on this machine's CPUs and GPUs (or the one already running in this process).
        actors: detector actors (model copies); gpus_per_actor: GPUs each (0: CPU actors);
            cpus_per_actor: CPUs each (CPU actors use as many torch threads).
        batch_size: images per actor call, and per shard.
        resume: skip the images that complete shards of an earlier, interrupted run with the
            same detector already hold.
        save_maps: write each batch's maps to ``maps/<shard>.npz``.
        progress: one progress bar (stderr) for the whole job.
        max_pixels: largest ``width * height`` of an input (None: Pillow's limit).

    Returns:
        ``images`` (inputs found), ``scored`` (by this run), ``skipped_resumed`` (already done),
        ``failed`` ([(path, reason line)]), ``seconds``, ``images_per_s`` (scored / seconds of
        the pipeline), ``shards`` (shard files in ``out_dir``), ``duplicates`` (identical rows
        merged away), ``scores`` (path of scores.csv), ``labelled`` (a label column applies).

    Raises:
        ClipadError: Ray is not installed (``pip install "clipad[ray]"``), an input path does
            not exist, the cluster cannot be reached, or the shards do not merge (see
            :func:`clipad.distributed.shards.merge_rows`).
    """
    from ..data.images import list_images
    from ..eval.files import atomic_write, display_path
    from . import pipeline
    from .runtime import check_resources, require_ray, session
    from .shards import merge_rows, read_shards
    from .worker import decode_image

    check_resources(actors, gpus_per_actor, cpus_per_actor, batch_size)
    require_ray()  # before anything is built: the one clear line when Ray is missing
    paths = list(dict.fromkeys(list_images(inputs)))
    if not paths:
        raise InvalidValueError(f"no images in inputs {inputs!r} (files, or directories holding images); nothing to score")
    det = build_detector(detector, method, backbone, pretrained, options)
    if references is not None:
        det.set_reference(references, class_name=class_name)
    out = Path(out_dir)
    config = {"kind": "predict", "class_name": class_name, **pipeline.detector_config(det)}
    blob, done = pipeline.prepare(out, det, config, resume)
    ids = [display_path(p) for p in paths]
    items = [{"index": i, "id": ids[i], "fspath": os.fsencode(p), "class_name": class_name or ""}
             for i, p in enumerate(paths) if ids[i] not in done]
    job = {"kind": "predict", "out_dir": str(out), "save_maps": save_maps}
    with session(address, min_cpus=actors * cpus_per_actor + 1) as ray:
        res = pipeline.run(
            items, blob=blob, job=job, decode=decode_image, decode_kwargs={"max_pixels": max_pixels}, actors=actors,
            gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size, progress=progress,
            desc=f"{det.name} (ray)", total=len(paths), resumed=len(paths) - len(items), ray=ray,
        )
    shards = read_shards(out, columns=["id", "index", "score", "label"])
    merged = merge_rows(shards, expected=ids, failed=[p for p, _ in res.failed], compare=("score", "label"))
    position = {k: i for i, k in enumerate(ids)}
    rows = sorted(merged.rows.items(), key=lambda kv: position[kv[0]])
    labelled = any(r["label"] >= 0 for _, (_, r) in rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SCORES_COLUMNS)
    row_of = {(name, r["id"]): i for name, shard_rows in shards for i, r in enumerate(shard_rows)}
    for key, (shard, r) in rows:
        w.writerow([key, f"{r['score']:.6f}", r["label"] if r["label"] >= 0 else "", shard, row_of[shard, key]])
    with atomic_write(out / "scores.csv", "wb") as f:
        f.write(buf.getvalue().encode("utf-8"))
    return {
        "images": len(paths), "scored": res.scored, "skipped_resumed": len(paths) - len(items), "failed": res.failed,
        "seconds": res.seconds, "images_per_s": res.scored / res.seconds if res.seconds > 0 else 0.0,
        "shards": len(shards), "duplicates": merged.duplicates, "scores": out / "scores.csv", "labelled": labelled,
    }

