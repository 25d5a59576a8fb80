"""Scale-out on Ray Data: batch prediction and evaluation over many CPUs, GPUs and machines.

An optional extra (``pip install "clipad[ray]"``). Importing this package imports no Ray (nor
torch): only calling :func:`predict` or :func:`evaluate` does, and without Ray installed the
call fails with one :class:`~clipad.errors.ClipadError` line naming the extra to install. The
single-process paths (``clipad predict``, ``clipad eval``, :func:`clipad.eval.run.run`) never
import this package.

The pipeline (both entries)::

    image paths (driver) -> ray.data.from_items -> decode on CPU tasks (clipad's image reader,
    its pixel budget; an unreadable file becomes a failure row) -> map_batches into detector
    actors (one model per actor, built from a detector file made on the driver: references and
    calibrated thresholds travel in it) -> each actor batch writes one shard (scores as Parquet,
    maps as .npz) -> the driver counts rows for one progress bar, then merges the shards.

Output folder (``out_dir``):

- ``shards/<shard>.parquet``: per-image rows of one actor batch (``id``, ``index``, ``score``,
  ...); written atomically (temporary name, then rename), after its maps, so a shard file that
  exists is complete: the set of shard files is the manifest of finished images that
  ``resume=True`` skips.
- ``maps/<shard>.npz``: that batch's maps (predict: one float32 ``[H, W]`` array per row, keyed
  by its row number; eval: ``maps`` float16 ``[n, E, E]`` and ``masks`` bool ``[n, E, E]``).
- ``_job/detector.safetensors`` and ``_job/job.json``: what the actors loaded and the run's
  configuration (a resumed run must match it).
- ``scores.csv`` (predict): every image once, in input order (``path, score[, label], shard, row``).

Shard names are deterministic (first input index, count and a hash of the indices), so a batch
that Ray retries after an actor died overwrites its own shard; the merge keeps each image once
(identical duplicates collapse, conflicting ones raise) and checks that every input is either
scored or reported as failed.

See docs/scale.md for clusters, actor sizing and measured figures.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["evaluate", "predict"]

#: public name -> its module, imported on first access (neither imports ray at import time)
_LAZY = {"predict": "predict_job", "evaluate": "eval_job"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
