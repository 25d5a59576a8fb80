"""A dynamic batcher: concurrent requests share model calls.

Requests put their images on a queue and await one future per image. A collector task takes
the first waiting image, then keeps taking more until ``max_batch`` images are in hand or
``max_wait_ms`` has passed since the first, and hands the batch to *one* model thread. While
the model runs, new images queue up, so under load the next batch is ready (full) the moment
the model is free: batching costs a lone request at most ``max_wait_ms`` and gives a loaded
server throughput close to the model's batched rate.

Every model call (predictions, and reference updates through :meth:`Batcher.run_exclusive`)
runs on that single thread: the event loop is never blocked, and the detector, which is not
thread-safe (it caches text embeddings and holds references in dicts), is only ever touched
by one thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ClipadError, InvalidValueError, NotReadyError

__all__ = ["MAX_CALL_PIXELS", "Batcher", "QueueFull", "predict_groups"]

#: Most image pixels in one ``detector.predict`` call. A call holds its images as float32
#: tensors plus a stacked copy (~24 B/px) and its maps at image size: 16 MP is ~0.5 GB, and
#: 16 images of 1 MP (a full batch of MVTec-sized images) still go in one call. An image larger
#: than this is scored alone.
MAX_CALL_PIXELS = 16_000_000


class QueueFull(ClipadError):
    """More images are waiting than ``max_queue``: the client should retry later (503)."""


@dataclass
class _Item:
    image: Any
    class_name: str | None
    future: asyncio.Future


def _pixels(image: Any) -> int:
    """``width * height`` of a PIL image or a ``[..., H, W]`` tensor/array."""
    if hasattr(image, "width") and hasattr(image, "height"):
        return int(image.width) * int(image.height)
    shape = image.shape
    return int(shape[-2]) * int(shape[-1])


def _calls(idx: list[int], pixels: list[int], max_call_pixels: int) -> list[list[int]]:
    """Split ``idx`` into consecutive runs of at most ``max_call_pixels`` (an image above it alone)."""
    calls: list[list[int]] = []
    current: list[int] = []
    held = 0
    for i in idx:
        if current and held + pixels[i] > max_call_pixels:
            calls.append(current)
            current, held = [], 0
        current.append(i)
        held += pixels[i]
    if current:
        calls.append(current)
    return calls


def predict_groups(
    detector, max_batch: int, items: Sequence[tuple[Any, str | None]], max_call_pixels: int = MAX_CALL_PIXELS,
) -> list[tuple[float, np.ndarray] | BaseException]:
    """Score ``(image, class_name)`` pairs: one ``detector.predict`` call per class name, split
    further so that no call holds more than ``max_call_pixels`` image pixels.

    Returns, in input order, ``(score, map [H, W] float32)`` per image, or the exception that
    the call for its images raised (so one bad class does not fail the others).
    """
    out: list[Any] = [None] * len(items)
    groups: dict[str | None, list[int]] = {}
    for i, (_, cls) in enumerate(items):
        groups.setdefault(cls, []).append(i)
    pixels = [_pixels(image) for image, _ in items]
    for cls, idx in groups.items():
        for call in _calls(idx, pixels, max_call_pixels):
            try:
                pred = detector.predict([items[i][0] for i in call], class_name=cls, batch_size=max_batch)
                for k, i in enumerate(call):
                    out[i] = (float(pred.image_scores[k]), pred.anomaly_maps[k].numpy())
            except Exception as exc:  # noqa: BLE001 - handed to the waiting request, the server goes on
                for i in call:
                    out[i] = exc
            finally:
                pred = None  # the previous call's maps are in `out`; no second reference to them
    return out


class Batcher:
    """Coalesce images from concurrent requests into batched model calls.

    Args:
        run_batch: ``run_batch(items) -> results`` with ``items`` a list of ``(image, class_name)``
            and ``results`` one ``(score, map)`` or exception per item; runs on the model thread.
        max_batch: most images per model call.
        max_wait_ms: longest time the first image of a batch waits for company.
        max_queue: most images waiting; beyond it :meth:`submit` raises :class:`QueueFull`.

    Use inside a running event loop: ``await b.start()`` ... ``await b.stop()``.
    """

    def __init__(
        self,
        run_batch: Callable[[list[tuple[Any, str | None]]], list[Any]],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
    ) -> None:
        if max_batch < 1:
            raise InvalidValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise InvalidValueError(f"max_wait_ms must be >= 0 (0: no waiting for a fuller batch), got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipad-model")
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        #: batch size -> number of model calls of that size (for /v1/info and the load test)
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="clipad-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(RuntimeError("server is shutting down"))
        self._executor.shutdown(wait=True)

    # -- use -----------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, images: Sequence[Any], class_name: str | None = None) -> list[tuple[float, np.ndarray]]:
        """Score images (they may land in different batches); results in input order.

        Raises:
            QueueFull: the queue holds ``max_queue`` images already.
            Exception: whatever the model call raised for these images.
        """
        if self._queue is None:
            raise NotReadyError("Batcher.start() was not awaited (the app's lifespan did not run); "
                                "await batcher.start() first, or serve the app with lifespan='on'")
        if self._queue.qsize() + len(images) > self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} images are waiting (limit {self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            fut = loop.create_future()
            self._queue.put_nowait(_Item(image, class_name, fut))
            futures.append(fut)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:  # a client gone away: its queued images are skipped, not scored
                f.cancel()
            raise

    async def run_exclusive(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the model thread, between batches (e.g. ``detector.set_reference``)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def stats(self) -> dict[str, float | int]:
        calls = sum(self.batch_sizes.values())
        images = sum(size * n for size, n in self.batch_sizes.items())
        return {
            "batches": calls,
            "images": images,
            "mean_batch_size": images / calls if calls else 0.0,
            "max_batch_size": max(self.batch_sizes, default=0),
            "queued": self.queued,
        }

    # -- the collector -------------------------------------------------------------------------
    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [item for item in batch if not item.future.done()]
            if batch:
                await self._run(batch)
            # Nothing of a finished batch stays referenced here while the collector waits for
            # the next one (it used to: the last batch's images and maps lived until then).
            del batch

    async def _run(self, batch: list[_Item]) -> None:
        """Score one batch on the model thread and settle its futures."""
        self.batch_sizes[len(batch)] += 1
        pairs = [(item.image, item.class_name) for item in batch]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, pairs)
        except Exception as exc:  # noqa: BLE001 - the batch fails, the collector lives on
            results = [exc] * len(batch)
        del pairs
        for result in results:
            if isinstance(result, BaseException):
                # The finished frames an exception passed through (the model call and below)
                # would keep that batch's images and tensors alive as long as the exception
                # lives, in a reference cycle only the garbage collector breaks; the traceback
                # keeps its file names and lines for the error log.
                traceback.clear_frames(result.__traceback__)
        for item, result in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
