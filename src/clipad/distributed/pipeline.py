"""The job both entries share: prepare the output folder, ship the detector, run the Ray Data
pipeline (decode tasks -> detector actors) with one progress bar, collect the failures.

Test hooks (environment variables, read here on the driver and handed to the actors):
``CLIPAD_RAY_FAIL_ONCE=<dir>``, ``CLIPAD_RAY_FAIL_AFTER=<n>:<dir>`` and ``CLIPAD_RAY_COUNT_DIR=<dir>``
(see :mod:`clipad.distributed.worker`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ClipadError, SkippedInputWarning
from ..eval.files import write_text_atomic
from .shards import MAPS_DIR, SHARD_FILE, SHARDS_DIR, done_ids

JOB_DIR = "_job"
HOOK_VARS = {"fail_once": "CLIPAD_RAY_FAIL_ONCE", "fail_after": "CLIPAD_RAY_FAIL_AFTER", "count_dir": "CLIPAD_RAY_COUNT_DIR"}

#: actors are restarted this many times after dying and each batch is retried this many times;
#: Ray Data's default (-1, forever) would hang a job whose actors always die (out of memory)
MAX_RESTARTS = 3


@dataclass
class JobResult:
    """What one pipeline run did (the merge is the caller's)."""

    scored: int = 0
    resumed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, the reported line)
    seconds: float = 0.0


def prepare(out_dir: Path, det, config: dict[str, Any], resume: bool) -> tuple[bytes, set[str]]:
    """Create ``out_dir``; save the detector to ``_job/detector.safetensors`` and the run's
    ``config`` to ``_job/job.json``. Returns (the detector file's bytes, ids already done).

    ``resume``: keep the shards of an earlier run with the same ``config`` (ClipadError if it
    differs: scores of two detectors must not be merged); otherwise earlier shards are removed."""
    job_dir = out_dir / JOB_DIR
    job_file = job_dir / "job.json"
    config = json.loads(json.dumps(config, default=str))  # as it reads back
    if resume and job_file.is_file():
        before = json.loads(job_file.read_text(encoding="utf-8"))
        if before != config:
            diff = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
            raise ClipadError(
                f"resume: this run's {', '.join(diff)} differ(s) from the interrupted run's in '{job_file}'; "
                "run with the same settings, or without resume to start again"
            )
    elif not resume:  # only shard files: maps/ may also hold a single-process run's <name>.npy
        for sub, ext in ((SHARDS_DIR, "parquet"), (MAPS_DIR, "npz")):
            for p in (out_dir / sub).glob(f"*.{ext}") if (out_dir / sub).is_dir() else ():
                if SHARD_FILE.fullmatch(p.stem):
                    p.unlink()
    for sub in (JOB_DIR, SHARDS_DIR, MAPS_DIR):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    path = det.save(job_dir / "detector.safetensors")
    write_text_atomic(job_file, json.dumps(config, indent=2, sort_keys=True))
    return path.read_bytes(), (done_ids(out_dir) if resume else set())


def detector_config(det) -> dict[str, Any]:
    """What identifies a detector's scores (a resumed run must have the same)."""
    return {
        "method": det.name, "backbone": det.backbone.name, "pretrained": det.backbone.pretrained,
        "seed": det.seed, "image_size": det.image_size, "options": det.options,
        "references": sorted(det.references), "thresholds": {c: t.to_json() for c, t in det.thresholds.items()},
    }


def run(
    items: list[dict[str, Any]], *, blob: bytes, job: dict[str, Any], decode: Callable, decode_kwargs: dict[str, Any],
    actors: int, gpus_per_actor: float, cpus_per_actor: float, batch_size: int, progress: bool, desc: str,
    total: int, resumed: int, ray: Any,
) -> JobResult:
    """Score ``items`` (rows, see :mod:`clipad.distributed.worker`) on the running Ray instance.

    The progress bar counts ``total`` images and starts at ``resumed``; each unreadable input is
    announced by a SkippedInputWarning (the CLI prints it as one line) and listed in the result."""
    from tqdm import tqdm

    from .worker import ScoreActor

    result = JobResult(resumed=resumed)
    t0 = time.perf_counter()
    hooks = {k: os.environ[v] for k, v in HOOK_VARS.items() if os.environ.get(v)}
    gpu = gpus_per_actor > 0
    job = {**job, "device": "cuda" if gpu else "cpu", "hooks": hooks,
           "threads": None if gpu else max(1, int(cpus_per_actor))}
    bar = tqdm(total=total, initial=resumed, desc=desc, unit="img", file=sys.stderr, disable=not progress)
    if not items:
        bar.close()
        return result
    _check_fits(ray.cluster_resources(), actors, gpus_per_actor, cpus_per_actor)
    ref = ray.put(blob)
    with warnings.catch_warnings():
        # Ray 2.5x deprecates passing remote arguments without offering another way to bound
        # actor restarts; its default (restart forever) is worse
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = (
            ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 64 * actors)))
            .map(decode, fn_kwargs=decode_kwargs, num_cpus=1)
            .map_batches(
                ScoreActor, fn_constructor_args=([ref], job), batch_size=batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor or None,
                num_cpus=cpus_per_actor, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
            )
        )
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for path, error in zip(out["id"], out["error"]):
                if error:
                    result.failed.append((str(path), str(error)))
                    warnings.warn(str(error), SkippedInputWarning, stacklevel=2)
            result.scored += sum(1 for e in out["error"] if not e)
            bar.update(len(out["id"]))
    except ray.exceptions.RayError as exc:  # an actor that kept dying, an error in the model: one line
        cause = str(exc).strip().splitlines()
        raise ClipadError(
            f"the Ray job failed ({type(exc).__name__}: {cause[-1] if cause else 'no message'}); the shards written so "
            f"far are kept in '{job['out_dir']}': run again with resume to score the rest"
        ) from exc
    finally:
        bar.close()
        del ref
    result.seconds = time.perf_counter() - t0
    return result


def _check_fits(resources: dict[str, float], actors: int, gpus_per_actor: float, cpus_per_actor: float) -> None:
    """ClipadError when one actor cannot fit the cluster (Ray would wait for it forever); a
    warning when the pool does not fit at once (an autoscaling cluster may still grow)."""
    from ..errors import ClipadWarning

    have = {"GPU": resources.get("GPU", 0.0), "CPU": resources.get("CPU", 0.0)}
    for kind, each, name in (("GPU", gpus_per_actor, "gpus_per_actor"), ("CPU", cpus_per_actor, "cpus_per_actor")):
        if each > have[kind]:
            raise ClipadError(f"{name}={each:g} but the Ray cluster has {have[kind]:g} {kind}(s); "
                              f"ask for at most {have[kind]:g}" + (" (0: CPU actors)" if kind == "GPU" else ""))
        if actors * each > have[kind]:
            warnings.warn(f"{actors} actors x {each:g} {kind} = {actors * each:g} but the cluster has {have[kind]:g} "
                          f"{kind}(s) now: the job waits until it grows", ClipadWarning, stacklevel=3)
