"""What runs inside Ray workers: decoding on CPU tasks, and the detector actor that scores batches
and writes one shard per batch.

Rows are dicts of one input: ``index`` (position in the run's input list), ``id`` (its path as
text, :func:`~clipad.eval.files.display_path`), ``fspath`` (the path as bytes: any file name
survives Arrow), ``class_name`` ("" = none); eval rows add ``label`` and ``mask_fspath``. Decoding
adds ``image`` (uint8 ``[H, W, 3]``) and ``error`` ("" or the one line that reports the file);
eval decoding adds ``mask`` (bool ``[E, E]`` at the evaluation size) and ``mask_known``.

Test hooks (read on the driver, handed to the actor, so they work however Ray starts workers):
``fail_once``: a directory; the first batch of the whole job kills its actor process (a marker
file created with O_EXCL makes it happen once across processes and restarts); Ray restarts the
actor and retries the batch. ``fail_after``: ``<n>:<dir>``; batches after the first ``n`` of
the job raise an error (not retried: the job fails, as a killed run would, after ``n`` shards).
``count_dir``: a directory; every scored image leaves an empty file
``<index>.<random>`` there, so a test can count how often each image was scored.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClipadError, ImageReadError

#: the image of a row that could not be decoded (Arrow needs an array of the column's rank)
_NO_IMAGE = np.zeros((1, 1, 3), np.uint8)


def decode_image(row: dict[str, Any], max_pixels: int | None = None) -> dict[str, Any]:
    """Ray Data ``map`` function: the row with ``image`` and ``error`` (predict)."""
    from ..data.images import load_image

    path = os.fsdecode(row["fspath"])
    try:
        row["image"] = np.asarray(load_image(path, max_pixels=max_pixels))
        row["error"] = ""
    except ImageReadError as exc:
        row["image"], row["error"] = _NO_IMAGE, f"{exc}; skipped"
    return row


def decode_sample(row: dict[str, Any], eval_size: int, resize: str = "torch", max_pixels: int | None = None) -> dict[str, Any]:
    """Ray Data ``map`` function: the row with ``image``, ``mask`` (at ``eval_size``, resized as
    the single-process evaluation does), ``mask_known`` and ``error`` (eval)."""
    import torch

    from ..data.images import load_image, load_mask
    from ..eval.run import resize_mask  # the single-process evaluation's own resizing: identical masks

    path = os.fsdecode(row["fspath"])
    row["mask"], row["mask_known"] = np.zeros((eval_size, eval_size), bool), False
    try:
        image = load_image(path, max_pixels=max_pixels)
    except ImageReadError as exc:
        row["image"], row["error"] = _NO_IMAGE, f"{exc}; skipped"
        return row
    row["image"], row["error"] = np.asarray(image), ""
    if row["label"] == 0:
        row["mask_known"] = True  # all normal: the zero mask stands
    elif row["mask_fspath"]:
        mask_path = os.fsdecode(row["mask_fspath"])
        try:
            mask = torch.from_numpy(load_mask(mask_path, size=(image.height, image.width), max_pixels=max_pixels))
        except ImageReadError as exc:
            row["image"], row["error"] = _NO_IMAGE, f"mask '{exc.path}' of image '{row['id']}': {exc.reason}; image skipped"
            return row
        row["mask"], row["mask_known"] = resize_mask(mask, eval_size, resize).numpy(), True
    return row


class ScoreActor:
    """A Ray Data actor: builds the detector once from the job's detector file, then scores
    batches (split by class: each call of the model sees one class's references and prompts)
    and writes one shard per batch.

    Args:
        detector: ``[ObjectRef]`` of the detector file's bytes (a list, so Ray hands the
            reference over instead of resolving it: the driver keeps the object alive, so a
            restarted actor can fetch it again).
        job: ``kind`` ("predict" | "eval"), ``out_dir``, ``device``, ``threads``,
            ``save_maps`` (predict), ``eval_size`` and ``resize`` (eval), ``hooks``.
    """

    def __init__(self, detector: list, job: dict[str, Any]) -> None:
        import ray
        import torch

        from ..api import load_detector

        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        blob = ray.get(detector[0])
        with tempfile.TemporaryDirectory(prefix="clipad_actor_") as tmp:
            path = Path(tmp) / "detector.safetensors"
            path.write_bytes(blob)
            self.det = load_detector(path, device=job["device"])
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hooks = self.job.get("hooks") or {}
        if hooks.get("fail_once"):
            _die_once(Path(hooks["fail_once"]))
        if hooks.get("fail_after"):
            _fail_after(hooks["fail_after"])
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        if ok:
            name, table, arrays = (self._predict if self.job["kind"] == "predict" else self._eval)(batch, ok)
            from .shards import write_shard

            write_shard(self.job["out_dir"], name, table, arrays)
            if hooks.get("count_dir"):
                for i in ok:
                    (Path(hooks["count_dir"]) / f"{int(batch['index'][i])}.{secrets.token_hex(4)}").touch()
        else:
            name = ""
        n = len(batch["index"])
        return {
            "index": batch["index"], "id": batch["id"], "error": batch["error"],
            "shard": np.array([name if not batch["error"][i] else "" for i in range(n)], dtype=object),
        }

    def _groups(self, batch: dict[str, np.ndarray], ok: list[int]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i in ok:
            groups.setdefault(str(batch["class_name"][i]), []).append(i)
        return groups

    def _predict(self, batch, ok):
        from PIL import Image

        from .shards import shard_name

        order, scores, labels, maps = [], [], [], []
        for cls, rows in self._groups(batch, ok).items():
            images = [Image.fromarray(np.ascontiguousarray(batch["image"][i])) for i in rows]
            pred = self.det.predict(images, class_name=cls or None, batch_size=len(images))
            order += rows
            scores += pred.image_scores.tolist()
            labels += pred.labels.int().tolist() if pred.labels is not None else [-1] * len(rows)
            maps += [np.asarray(m, dtype=np.float32) for m in pred.anomaly_maps]
        name = shard_name(batch["index"][i] for i in order)
        table = {
            "id": [str(batch["id"][i]) for i in order], "index": [int(batch["index"][i]) for i in order],
            "class_name": [str(batch["class_name"][i]) for i in order],
            "score": np.asarray(scores, np.float32), "label": np.asarray(labels, np.int8),
        }
        arrays = {str(r): m for r, m in enumerate(maps)} if self.job.get("save_maps") else None
        return name, table, arrays

    def _eval(self, batch, ok):
        import torch
        import torch.nn.functional as F
        from PIL import Image

        from ..data.transforms import equal_runs
        from ..eval.run import ToModelTensor  # the single-process evaluation's transform: identical inputs
        from .shards import shard_name

        det, size = self.det, self.job["eval_size"]
        to_tensor = ToModelTensor(det.input_size, self.job["resize"])
        order, scores, maps = [], [], []
        for cls, rows in self._groups(batch, ok).items():
            tensors = [to_tensor(Image.fromarray(np.ascontiguousarray(batch["image"][i]))) for i in rows]
            for a, b in equal_runs([tuple(t.shape) for t in tensors]):
                x = det.backbone.normalize(torch.stack(tensors[a:b]).to(det.device))
                s, m = det.score_normalized(x, class_name=cls)
                if tuple(m.shape[-2:]) != (size, size):
                    m = F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
                scores.append(s.cpu())
                maps.append(m.to(torch.float16).cpu())
            order += rows
        name = shard_name(batch["index"][i] for i in order)
        table = {
            "id": [str(batch["id"][i]) for i in order], "index": [int(batch["index"][i]) for i in order],
            "class_name": [str(batch["class_name"][i]) for i in order],
            "label": [int(batch["label"][i]) for i in order],
            "mask_known": [bool(batch["mask_known"][i]) for i in order],
            "score": torch.cat(scores).numpy().astype(np.float32),
        }
        arrays = {"maps": torch.cat(maps).numpy(), "masks": np.stack([np.asarray(batch["mask"][i], bool) for i in order])}
        return name, table, arrays


def _die_once(marker_dir: Path) -> None:
    """Test hook: end this process abruptly, once per marker directory (an actor "dying mid-run")."""
    try:
        fd = os.open(marker_dir / "failed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


class InjectedFailure(ClipadError):
    """The crash the test hooks (``CLIPAD_RAY_FAIL_*``) inject into an actor."""


def _fail_after(spec: str) -> None:
    """Test hook: the first ``n`` batches of the job (counted across processes by marker files
    created with O_EXCL) go through; every later one raises."""
    n, _, directory = spec.partition(":")
    for k in range(int(n)):
        try:
            os.close(os.open(Path(directory) / f"batch{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return
        except FileExistsError:
            continue
    raise InjectedFailure(f"CLIPAD_RAY_FAIL_AFTER: batch after the first {n} (test hook)")
