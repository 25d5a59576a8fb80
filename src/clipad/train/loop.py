"""``clipad train``: the training loop shared by the learned methods, with resumable checkpoints.

What a method provides is the contract of :class:`~clipad.methods.base.LearnedDetector`
(AnomalyCLIP, AdaptCLIP and TokenCLIP subclass it): ``training_defaults`` (the official recipe),
``trainable_parameters()`` / ``param_groups(lr)``, ``training_loss(images, masks, labels, *,
class_names, references)`` (``images`` [B, 3, S, S] CLIP-normalised at ``image_size``, ``masks``
[B, S, S] float {0, 1}, ``labels`` [B] long), ``min_train_batch`` (smaller batches are skipped),
``training_references`` (k > 0 normal reference images per query, drawn by
:class:`ReferenceSampler`, passed as ``references`` [B, k, 3, S, S]), ``reset_parameters(seed)``
(a run that does not start from a checkpoint calls it with the training seed) and
``learned_state()`` / ``load_learned_state()``.

Protocol (the official AnomalyCLIP / AdaptCLIP scripts): train on the *test* split of an
auxiliary dataset with its masks (MVTec AD test -> evaluate on VisA; VisA test -> MVTec AD);
images resized to S x S with PIL bicubic, masks with PIL bilinear then binarised at 0.5 (as the
official torchvision transforms); Adam; every epoch a new random order of the samples.

Outputs under ``--out DIR``:

- ``DIR/<method>.safetensors``: the trained detector (clipad checkpoint): ``clipad.load_detector``
  restores it, and ``create_detector(method, checkpoint=...)`` takes its learned weights;
- ``DIR/checkpoints/epoch_NNN.safetensors`` (detector), ``epoch_NNN.optim.safetensors``
  (optimizer state: tensors, with param groups as JSON in the header) and ``epoch_NNN.json``
  (epoch, step, seed, configuration), every epoch; ``--resume`` continues from the last
  complete one and gives what an uninterrupted run gives (on the same device);
- ``DIR/train_log.csv`` (one row per step) and ``DIR/train_log.json`` (configuration and
  per-epoch means).

Randomness: the sample order of epoch e is the e-th ``randperm`` of a generator seeded with the
training seed, so it is rebuilt on resume by replaying the draws; nothing else draws random numbers.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import read_learned_weights
from ..methods.base import LearnedDetector
from ..methods.registry import learned_methods
from ..errors import ClipadError, ClipadWarning, SkippedInputWarning
from .sampling import ReferenceSampler, epoch_orders, official_image_transform, official_mask
from .state import CHECKPOINT_DIR, check_resumable, epoch_paths, last_checkpoint, load_optimizer, save_optimizer

LOG_CSV = "train_log.csv"
LOG_JSON = "train_log.json"


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (the method's ``training_defaults`` fill what is None)."""

    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    max_steps: int | None = None  # stop early (smoke runs); None = all epochs
    optimizer: str = "adam"  # "adam" | "adamw" (decoupled weight decay, AdaCLIP's official optimiser)
    weight_decay: float = 0.0

    @classmethod
    def for_method(cls, det: LearnedDetector, **overrides: Any) -> TrainConfig:
        defaults = dict(det.training_defaults)
        values = {**asdict(cls()), **defaults, **{k: v for k, v in overrides.items() if v is not None}}
        values["betas"] = tuple(values["betas"])
        return cls(**values)


@dataclass
class TrainResult:
    """What :func:`fit` did: the final checkpoint, steps, and per-epoch mean losses."""

    final_path: Path
    steps: int
    epochs: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- data


# --------------------------------------------------------------------------- optimisation


def make_optimizer(det: LearnedDetector, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the method's parameter groups (official: lr 1e-3, betas (0.5, 0.999)), or AdamW
    with ``config.weight_decay`` where the method's recipe says ``optimizer="adamw"``."""
    groups = det.param_groups(config.lr)
    if not any(len(g["params"]) for g in groups):
        raise ClipadError(f"method '{det.name}' has no trainable parameters")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if config.optimizer != "adam":
        raise ClipadError(f"optimizer must be 'adam' or 'adamw'; got {config.optimizer!r}")
    return torch.optim.Adam(groups, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)


def train_step(
    det, optimizer: torch.optim.Optimizer, images, masks, labels, class_names=None, **extra: Any
) -> tuple[float, dict[str, float]]:
    """One optimisation step (bf16 autocast on CUDA via the detector's precision) -> (loss, parts).
    ``extra`` (e.g. ``references``) is passed on to ``training_loss``."""
    optimizer.zero_grad(set_to_none=True)
    with det.autocast():
        loss, parts = det.training_loss(images, masks, labels, class_names=class_names, **extra)
    if not torch.isfinite(loss):
        raise ClipadError(f"training loss is {loss.item()} at this step; lower the learning rate or check the data")
    loss.backward()
    optimizer.step()
    return float(loss.detach()), {k: float(v) for k, v in parts.items()}


# --------------------------------------------------------------------------- checkpoints


def _run_description(det, config: TrainConfig, dataset_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": det.name, "backbone": det.backbone.name, "pretrained": det.backbone.pretrained,
        "image_size": det.image_size, "options": det.options, "config": {**asdict(config), "betas": list(config.betas)},
        "data": dataset_info,
    }


# --------------------------------------------------------------------------- reference images


# --------------------------------------------------------------------------- the loop


def fit(
    det: LearnedDetector,
    samples: Sequence,
    out: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    workers: int = 0,
    quiet: bool = False,
    dataset_info: dict[str, Any] | None = None,
    fresh: bool | None = None,
    reference_pool: Sequence | None = None,
) -> TrainResult:
    """Train ``det`` on ``samples`` (:class:`~clipad.data.Sample` records with masks).

    ``fresh``: start from ``det.reset_parameters(config.seed)`` (True) or from the detector's
    current learned weights (False, fine-tuning). None: fresh unless ``det.options`` names a
    ``checkpoint``. A resumed run always continues from its last epoch checkpoint.

    ``reference_pool``: normal images the per-query references of a method with
    ``training_references`` are drawn from (:class:`ReferenceSampler`); default none, i.e. the
    normal training samples of each class.
    """
    from tqdm import tqdm

    from ..data import make_loader

    if not isinstance(det, LearnedDetector):
        raise ClipadError(f"method '{det.name}' has nothing to train (no learned tensors); "
                          f"learned methods: {', '.join(learned_methods())}")
    out = Path(out)
    (out / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    if not samples:
        raise ClipadError("no training samples")
    run = _run_description(det, config, dataset_info or {})
    start_epoch, step = 0, 0
    history: list[dict[str, float]] = []
    resumed = last_checkpoint(out) if resume else None
    if resumed:
        check_resumable(resumed[1], run)
        start_epoch, step = resumed[0], int(resumed[1]["step"])
        history = list(resumed[1].get("history", []))
        learned = read_learned_weights(epoch_paths(out, start_epoch)[0], det.name)
        det.load_learned_state({k: v.to(det.device) for k, v in learned.items()})
    else:
        if fresh is None:
            fresh = det.opts.checkpoint is None
        if fresh:
            det.reset_parameters(config.seed)
    optimizer = make_optimizer(det, config)
    if resumed:
        load_optimizer(optimizer, epoch_paths(out, start_epoch)[1])

    csv_path = out / LOG_CSV
    rows = _read_log_rows(csv_path, max_step=step) if resumed else []
    part_names: list[str] = sorted({k for r in rows for k in r} - {"epoch", "step", "loss", "lr", "seconds"})
    steps_per_epoch = math.ceil(len(samples) / config.batch_size)
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    transform = official_image_transform(det.image_size)
    shots = det.training_references
    min_batch = det.min_train_batch
    sampler = ReferenceSampler(reference_pool or [], samples, shots, det.image_size, config.seed) if shots else None
    orders = epoch_orders(len(samples), config.seed)
    for _ in range(start_epoch):
        next(orders)
    failures: list[str] = []
    det.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=min(step, total), desc=f"{det.name} train", unit="step", file=sys.stderr, disable=quiet)
    try:
        for epoch in range(start_epoch, config.epochs):
            if step >= total:
                break
            order = next(orders)
            loader = make_loader([samples[i] for i in order.tolist()], config.batch_size, transform=transform, num_workers=workers)
            losses: list[float] = []
            sums: dict[str, float] = {}
            stopped = False
            for index, batch in enumerate(loader):
                for fail in batch.failures:
                    failures.append(str(fail))
                    warnings.warn(str(fail), SkippedInputWarning, stacklevel=2)
                if not len(batch):
                    continue
                if len(batch) < min_batch:
                    # BatchNorm in training mode needs two samples; the official loop crashes here
                    warnings.warn(f"a batch of {len(batch)} image(s) is skipped: '{det.name}' trains BatchNorm "
                                  f"layers, which need at least {min_batch} per batch (a batch size that leaves no "
                                  "smaller last batch avoids this)", ClipadWarning, stacklevel=2)
                    continue
                images = det.backbone.normalize(batch.images.to(det.device))
                masks = torch.stack([official_mask(m, det.image_size) for m in batch.masks]).to(det.device)
                labels = torch.tensor([s.label for s in batch.samples], device=det.device)
                extra = {}
                if sampler is not None:
                    extra["references"] = det.backbone.normalize(sampler.load(batch.samples, step).to(det.device))
                loss, parts = train_step(det, optimizer, images, masks, labels, [s.class_name for s in batch.samples], **extra)
                step += 1
                losses.append(loss)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                part_names = sorted(set(part_names) | set(parts))
                rows.append({"epoch": epoch + 1, "step": step, "loss": loss, **parts,
                             "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3)})
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}")
                if step >= total:
                    stopped = index < len(loader) - 1  # --max-steps inside this epoch: no checkpoint for it
                    break
            _write_log_csv(csv_path, rows, part_names)
            if not losses or stopped:
                continue
            summary = {"epoch": epoch + 1, "steps": len(losses), "loss": float(np.mean(losses)),
                       **{k: v / len(losses) for k, v in sums.items()}}
            history.append(summary)
            det_path, opt_path, js_path = epoch_paths(out, epoch + 1)
            det.save(det_path)
            save_optimizer(optimizer, opt_path)
            js_path.write_text(json.dumps({"epoch": epoch + 1, "step": step, "seed": config.seed, "run": run,
                                           "history": history}, indent=1))
            _write_log_json(out, run, history, step, None)
    finally:
        bar.close()
        det.eval()
    final = out / f"{det.name}.safetensors"
    det.save(final)
    _write_log_json(out, run, history, step, final)
    return TrainResult(final_path=final, steps=step, epochs=history, failures=failures)


def _read_log_rows(path: Path, max_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            if int(r["step"]) <= max_step:
                rows.append({k: (int(v) if k in ("epoch", "step") else float(v)) for k, v in r.items() if v != ""})
    return rows


def _write_log_csv(path: Path, rows: list[dict[str, Any]], part_names: list[str]) -> None:
    keys = ["epoch", "step", "loss", *part_names, "lr", "seconds"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _write_log_json(out: Path, run: dict[str, Any], history: list[dict[str, float]], step: int, final: Path | None) -> None:
    payload = {"run": run, "steps": step, "epochs": history, "final": str(final) if final else None}
    (out / LOG_JSON).write_text(json.dumps(payload, indent=1))


# --------------------------------------------------------------------------- CLI


