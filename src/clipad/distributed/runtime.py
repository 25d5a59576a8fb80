"""The one module of clipad that imports ray: finding it, starting or joining a cluster, quieting it.

``session(address)`` is a context manager: with Ray already initialised in this process (a test
fixture, a notebook, a Ray job) it uses that instance and leaves it running; with none it starts a
local one (``address=None``: this machine's CPUs and GPUs) or connects to ``address`` (a cluster
started with ``ray start --head``), and shuts it down on exit. Ray Data's own progress bars and
start-up lines are switched off while inside: the job shows one bar of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from ..errors import ClipadError, InvalidValueError

#: the install command every "Ray is missing" message names
INSTALL_HINT = 'pip install "clipad[ray]"'


def require_ray() -> Any:
    """The ``ray`` module with Ray Data importable, else one ClipadError line naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401 - the part clipad needs (pandas, pyarrow come with it)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "ray"
        raise ClipadError(f"distributed runs need Ray Data ('{missing}' is not installed): {INSTALL_HINT}") from None
    return ray


def check_resources(actors: Any, gpus_per_actor: Any, cpus_per_actor: Any, batch_size: Any) -> None:
    """InvalidValueError naming the first argument out of range (checked before Ray starts)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise InvalidValueError(f"actors must be a positive integer; got {actors!r}")
    if not number(gpus_per_actor) or gpus_per_actor < 0:
        raise InvalidValueError(f"gpus_per_actor must be a finite number >= 0; got {gpus_per_actor!r}")
    if not number(cpus_per_actor) or cpus_per_actor <= 0:
        raise InvalidValueError(f"cpus_per_actor must be a finite number > 0; got {cpus_per_actor!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidValueError(f"batch_size must be a positive integer; got {batch_size!r}")


@contextlib.contextmanager
def session(address: str | None, *, min_cpus: float = 1) -> Iterator[Any]:
    """Yields ``ray`` with a running instance (see the module docstring).

    ``min_cpus``: a local instance declares at least this many CPUs (logical: the actors' CPUs
    plus one for decode tasks), so a pool of CPU actors on a small machine cannot starve the
    decode tasks that feed it (Ray would wait forever for a free CPU)."""
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        if address is None:
            kwargs["num_cpus"] = max(os.cpu_count() or 1, int(-(-min_cpus // 1)))
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except (ConnectionError, TimeoutError, ValueError) as exc:
            raise ClipadError(f"cannot reach the Ray cluster at '{address}' ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                              "start it with `ray start --head` or give another address") from None
        started = True
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, getattr(ctx, "print_on_execution_start", True))
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # "Progress bars disabled", execution plans, ...
    try:
        yield ray
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        data_logger.setLevel(level)
        if started:
            ray.shutdown()
