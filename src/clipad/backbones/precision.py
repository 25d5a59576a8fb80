"""Mixed precision: the image tower runs under bf16 autocast, the method heads in float32.

The heads (cosine similarities against text or reference features, softmaxes, aggregation)
cost little next to the tower but decide the ranking of images whose scores differ in the third
decimal: in bf16 (8 significant bits) a probability near 0.5 can only move in steps of 0.004,
so heads computed under autocast quantise scores into ties. Functions decorated with
:func:`float32_head` run with autocast off and their floating-point tensor arguments in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def _as_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


def autocast_off(*tensors: torch.Tensor) -> ExitStack:
    """A context with autocast disabled for the device types of ``tensors``."""
    stack = ExitStack()
    for kind in sorted({t.device.type for t in tensors if isinstance(t, torch.Tensor)}):
        if torch.is_autocast_enabled(kind):
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
    return stack


def float32_head(fn: F) -> F:
    """Decorator: run ``fn`` with autocast off and floating tensor arguments cast to float32."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_as_float32(a) for a in args)
        kwargs = {k: _as_float32(v) for k, v in kwargs.items()}
        with autocast_off(*args, *kwargs.values()):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
