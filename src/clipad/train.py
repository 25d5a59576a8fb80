"""``clipad train``: the training loop shared by the learned methods, with resumable checkpoints.

What a method provides (AnomalyCLIP does; AdaptCLIP and TokenCLIP plug in the same way):

- ``training_defaults``: class attribute ``{"epochs", "batch_size", "lr", "betas", "seed"}``, the
  official recipe;
- ``trainable_parameters() -> list[Parameter]`` (or ``param_groups(lr) -> list[dict]`` when
  parts train at different rates);
- ``training_loss(images, masks, labels, *, class_names) -> (loss, parts)``: ``images`` [B, 3, S, S]
  CLIP-normalised at the detector's ``image_size``, ``masks`` [B, S, S] float {0, 1}, ``labels``
  [B] long; ``parts`` maps names to detached scalars for the logs;
- optionally ``min_train_batch``: class attribute; smaller batches (a final batch of one) are skipped
- optionally ``training_references``: class attribute, k > 0 normal reference images per query
  (AdaptCLIP's prompt-query adapter; see :class:`ReferenceSampler`); ``training_loss`` then also
  receives ``references`` [B, k, 3, S, S] (CLIP-normalised);
- ``reset_parameters(seed)``: fresh initialisation of the learned tensors (a run that does not
  start from a checkpoint calls it with the training seed);
- ``learned_state()`` / ``load_learned_state()`` (every :class:`~clipad.methods.base.Detector`).

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

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .convert import read_learned_weights
from .errors import ClipadError

CHECKPOINT_DIR = "checkpoints"
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

    @classmethod
    def for_method(cls, det, **overrides: Any) -> TrainConfig:
        defaults = dict(getattr(det, "training_defaults", {}) or {})
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


def official_image_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> [3, size, size] float in [0, 1]: PIL bicubic resize, as the official
    ``Resize((S, S), BICUBIC)`` + ``ToTensor`` (CLIP normalisation is the detector's)."""

    def transform(image: Image.Image) -> torch.Tensor:
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)

    return transform


def official_mask(mask: torch.Tensor | None, size: int) -> torch.Tensor:
    """bool [H, W] mask (or None) -> float [size, size] in {0, 1}: a 0/255 image resized with PIL
    bilinear, then ``> 0.5`` of the range, as the official ``Resize`` + ``ToTensor`` + threshold.
    None (an anomalous image without a mask) gives an all-normal mask, as the official loader."""
    if mask is None or not bool(mask.any()):
        return torch.zeros(size, size)
    img = Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img) > 127).float()


def epoch_orders(n: int, seed: int) -> Iterator[torch.Tensor]:
    """The sample order of epoch 0, 1, 2, ...: successive ``randperm(n)`` of one seeded generator."""
    g = torch.Generator().manual_seed(int(seed))
    while True:
        yield torch.randperm(n, generator=g)


# --------------------------------------------------------------------------- optimisation


def make_optimizer(det, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the method's trainable tensors (official: lr 1e-3, betas (0.5, 0.999))."""
    if hasattr(det, "param_groups"):
        groups = det.param_groups(config.lr)
    else:
        groups = [{"params": list(det.trainable_parameters())}]
    if not any(len(g["params"]) for g in groups):
        raise ClipadError(f"method '{det.name}' has no trainable parameters")
    return torch.optim.Adam(groups, lr=config.lr, betas=tuple(config.betas))


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


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Optimizer state as safetensors: state tensors as ``state.<param>.<name>``, everything else
    (param groups, non-tensor state) as JSON in the header. No pickle."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    meta = {
        "format": "clipad-optimizer",
        "optimizer": type(optimizer).__name__,
        "param_groups": json.dumps(sd["param_groups"]),
        "scalar_state": json.dumps(scalars),
    }
    save_file(tensors, str(path), metadata=meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore what :func:`save_optimizer` wrote into an optimizer over the same parameters."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "clipad-optimizer" or meta.get("optimizer") != type(optimizer).__name__:
        raise ClipadError(f"'{path}' is not a clipad {type(optimizer).__name__} state")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in json.loads(meta["scalar_state"]).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


# --------------------------------------------------------------------------- checkpoints


def epoch_paths(out: Path, epoch: int) -> tuple[Path, Path, Path]:
    """(detector, optimizer, JSON) files of the checkpoint after ``epoch`` (1-based)."""
    base = out / CHECKPOINT_DIR / f"epoch_{epoch:03d}"
    return base.with_suffix(".safetensors"), base.with_suffix(".optim.safetensors"), base.with_suffix(".json")


def last_checkpoint(out: Path) -> tuple[int, dict[str, Any]] | None:
    """(epoch, its JSON) of the latest complete checkpoint under ``out``, or None."""
    best = None
    for js in sorted((out / CHECKPOINT_DIR).glob("epoch_*.json")):
        try:
            info = json.loads(js.read_text())
            epoch = int(info["epoch"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
        if all(p.is_file() for p in epoch_paths(out, epoch)) and (best is None or epoch > best[0]):
            best = (epoch, info)
    return best


def _run_description(det, config: TrainConfig, dataset_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": det.name, "backbone": det.backbone.name, "pretrained": det.backbone.pretrained,
        "image_size": det.image_size, "options": det.options, "config": {**asdict(config), "betas": list(config.betas)},
        "data": dataset_info,
    }


def _check_resumable(info: dict[str, Any], run: dict[str, Any]) -> None:
    for key in ("method", "backbone", "image_size"):
        if info["run"].get(key) != run.get(key):
            raise ClipadError(
                f"cannot resume: the checkpoint was trained with {key}={info['run'].get(key)!r}, this run has "
                f"{run.get(key)!r}; use the same settings or another --out"
            )
    for key in ("batch_size", "lr", "seed"):
        if info["run"]["config"].get(key) != run["config"].get(key):
            raise ClipadError(
                f"cannot resume: the checkpoint was trained with {key}={info['run']['config'].get(key)!r}, this run "
                f"has {run['config'].get(key)!r}"
            )


# --------------------------------------------------------------------------- reference images


class ReferenceSampler:
    """k normal reference images for each training query (methods with ``training_references``).

    The official AdaptCLIP ``train.py`` gives every query one normal image of its own class,
    drawn uniformly (``random.choice``) from the class's training normals (meta.json ``train``:
    ``train/good`` of MVTec AD, the normal training rows of VisA), in its data-loader workers.
    Here the draw has the same distribution, with replacement, from a generator seeded by (training
    seed, step), so a resumed run draws what an uninterrupted one does. A class without training
    normals (the folder layout) draws from the normal images among the training samples of that
    class, other than the query itself where there is another.

    Args:
        pool: normal reference candidates (typically the dataset's ``train`` split normals).
        samples: the training samples (fallback pool).
        k: references per query.
        size: model input size (images are resized as the training images).
        seed: the training seed.
    """

    def __init__(self, pool: Sequence, samples: Sequence, k: int, size: int, seed: int) -> None:
        self.k, self.seed = int(k), int(seed)
        self.transform = official_image_transform(size)
        self.pools: dict[str, list] = {}
        for s in pool:
            if s.label == 0:
                self.pools.setdefault(s.class_name, []).append(s)
        self.fallback: dict[str, list] = {}
        for s in samples:
            if s.label == 0 and s.class_name not in self.pools:
                self.fallback.setdefault(s.class_name, []).append(s)

    def draw(self, batch_samples: Sequence, step: int) -> list[list]:
        """The k reference samples of each query of the batch at ``step`` (0-based)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        out = []
        for s in batch_samples:
            pool = self.pools.get(s.class_name)
            if pool is None:
                pool = [r for r in self.fallback.get(s.class_name, []) if r.image_path != s.image_path]
                pool = pool or self.fallback.get(s.class_name, [])
            if not pool:
                raise ClipadError(
                    f"class '{s.class_name}' has no normal image to serve as a training reference; add normal images "
                    "(a train split or normal samples of that class)"
                )
            out.append([pool[int(i)] for i in torch.randint(len(pool), (self.k,), generator=g)])
        return out

    def load(self, batch_samples: Sequence, step: int) -> torch.Tensor:
        """[B, k, 3, S, S] float images in [0, 1] (not CLIP-normalised)."""
        from .imageio import load_image

        picks = self.draw(batch_samples, step)
        return torch.stack([torch.stack([self.transform(load_image(r.image_path)) for r in refs]) for refs in picks])


# --------------------------------------------------------------------------- the loop


def fit(
    det,
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

    from .data import make_loader

    out = Path(out)
    (out / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    if not samples:
        raise ClipadError("no training samples")
    run = _run_description(det, config, dataset_info or {})
    start_epoch, step = 0, 0
    history: list[dict[str, float]] = []
    resumed = last_checkpoint(out) if resume else None
    if resumed:
        _check_resumable(resumed[1], run)
        start_epoch, step = resumed[0], int(resumed[1]["step"])
        history = list(resumed[1].get("history", []))
        learned = read_learned_weights(epoch_paths(out, start_epoch)[0], det.name)
        det.load_learned_state({k: v.to(det.device) for k, v in learned.items()})
    else:
        if fresh is None:
            fresh = not (det.options or {}).get("checkpoint")
        if fresh and hasattr(det, "reset_parameters"):
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
    shots = int(getattr(det, "training_references", 0) or 0)
    min_batch = int(getattr(det, "min_train_batch", 1))
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
                    bar.write(f"clipad: {fail}", file=sys.stderr)
                if not len(batch):
                    continue
                if len(batch) < min_batch:
                    # BatchNorm in training mode needs two samples; the official loop crashes here
                    bar.write(f"clipad: a batch of {len(batch)} image(s) is skipped: '{det.name}' trains "
                              f"BatchNorm layers, which need at least {min_batch} per batch", file=sys.stderr)
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


def add_train_parser(sub, add_model_args) -> None:
    from .cli import add_dataset_args

    """Register ``clipad train`` (the lead wires it into :mod:`clipad.cli`)."""
    p = sub.add_parser(
        "train", help="train a learned method (anomalyclip, ...) on an auxiliary dataset",
        description="Train a learned method on an auxiliary labelled dataset (the official protocol uses its test "
        "split with masks: train on MVTec AD to evaluate on VisA, and the reverse). Writes OUT/<method>.safetensors "
        "(load with clipad.load_detector or --detector), per-epoch resumable checkpoints and CSV/JSON logs.",
    )
    add_dataset_args(p)
    add_model_args(p)
    p.set_defaults(method="anomalyclip", batch_size=None)
    p.add_argument("--out", required=True, help="output directory (checkpoints, logs, final detector)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the method's, 15 for anomalyclip)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the method's, 1e-3)")
    p.add_argument("--seed", type=int, default=None, help="seed of prompt init and sample order (default: the method's, 111)")
    p.add_argument("--split", default="test", choices=["test", "train", "all"],
                   help="which split of the dataset to train on (default: test, the official protocol)")
    p.add_argument("--classes", nargs="+", default=None, help="train only on these classes")
    p.add_argument("--resume", action="store_true", help="continue from the last complete epoch checkpoint in --out")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default: 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .cli import build_detector, dataset_from_args

    dataset = dataset_from_args(args)
    if args.classes:
        dataset = dataset.filter(class_name=args.classes)
    samples = dataset if args.split == "all" else dataset.filter(split=args.split)
    if not len(samples):
        raise ClipadError(f"the {args.split} split of '{args.root}' holds no images to train on")
    det = build_detector(args)
    if not hasattr(det, "training_loss"):
        raise ClipadError(f"method '{det.name}' has nothing to train")
    config = TrainConfig.for_method(det, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                    max_steps=args.max_steps)
    info = {"dataset": args.dataset, "root": str(args.root), "split": args.split, "images": len(samples),
            "anomalous": sum(s.label for s in samples), "classes": list(samples.classes)}
    # --detector FILE or --set checkpoint=FILE: fine-tune from those weights; else a fresh start
    fresh = False if args.detector else None
    pool = list(dataset.filter(split="train", label=0)) if getattr(det, "training_references", 0) else None
    result = fit(det, list(samples), args.out, config, resume=args.resume, workers=args.workers, quiet=args.quiet,
                 dataset_info=info, fresh=fresh, reference_pool=pool)
    for e in result.epochs:
        print(f"epoch {e['epoch']}: loss {e['loss']:.4f} ({e['steps']} steps)")
    print(f"{result.steps} step(s) -> {result.final_path} (clipad.load_detector / --detector); logs in {args.out}")
    if result.failures:
        print(f"clipad: {len(result.failures)} file(s) could not be read and were skipped; see the lines above", file=sys.stderr)
        return 1
    return 0
