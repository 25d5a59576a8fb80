"""Resumable training state: optimizer state as safetensors (no pickle), per-epoch checkpoint
paths, the last complete checkpoint of a run, and the check that a resumed run matches it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import checkpoint_error, read_header, save_safetensors
from ..errors import ClipadError, shorten

CHECKPOINT_DIR = "checkpoints"


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Optimizer state as safetensors: state tensors as ``state.<param>.<name>``, everything else
    (param groups, non-tensor state) as JSON in the header. No pickle."""
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
    save_safetensors(tensors, path, meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore what :func:`save_optimizer` wrote into an optimizer over the same parameters.

    Raises:
        CheckpointError: the file is not such a state or was edited (its header is checked, with
            the size caps of :func:`clipad.checkpoint.read_header`, before its tensors are read).
    """
    from safetensors import safe_open

    fix = "delete the checkpoints folder to start over, or train into another --out"
    meta, _ = read_header(path)
    if meta.get("format") != "clipad-optimizer" or meta.get("optimizer") != type(optimizer).__name__:
        raise checkpoint_error(path, f"is not a clipad {type(optimizer).__name__} state", fix)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
        for key, value in json.loads(meta["scalar_state"]).items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    except Exception as exc:  # noqa: BLE001 - a missing key, bad JSON, a state that does not fit
        raise checkpoint_error(path, f"is a damaged optimizer state ({type(exc).__name__}: {shorten(str(exc), 150)})",
                               fix) from None


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
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            continue
        if all(p.is_file() for p in epoch_paths(out, epoch)) and (best is None or epoch > best[0]):
            best = (epoch, info)
    return best


def check_resumable(info: dict[str, Any], run: dict[str, Any]) -> None:
    if not isinstance(info.get("run"), dict) or not isinstance(info["run"].get("config"), dict):
        raise ClipadError("cannot resume: the last epoch's .json has no 'run' configuration (edited or damaged); "
                          "delete the checkpoints folder to start over, or use another --out")
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
