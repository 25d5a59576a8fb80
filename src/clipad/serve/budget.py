"""Decoded-pixel budgets of ``clipad serve``: per request and for all work in flight.

What a request costs the server is set by the pixels its images *declare*, not by its upload
size: a 47 KB PNG can declare 7000x7000 pixels, and the 20 MiB upload limit admits hundreds of
those. So sizes are read from the image headers (no pixel is decoded) and two budgets apply
before anything is decoded:

- per request (:func:`check_request`): the sum of ``width * height`` of all images of one
  request; over it the request is refused (413) with the file, its size, the budget and the
  flag that raises it;
- in flight (:class:`PixelBudget`): the sum over all requests between admission and answer,
  across requests (decoding, queued, being scored, being encoded); a request that does not fit
  waits a little for others to finish, then is refused (503, ``Retry-After``).

Bytes per pixel along the serving path (from the code path; the defaults are derived from
these, and the totals measured with them are in ``docs/serve.md``)::

    held from decode to answer     RGB uint8 image             3 B/px
                                   anomaly map, float32        4 B/px (from scoring on)
    while scored (one model call)  [3, H, W] float32 tensor   12 B/px
                                   the batch stacked (copy)   12 B/px
                                   map batch + resized copies  8 B/px
    while decoded / encoded        mode conversion, EXIF copy  3-4 B/px
                                   overlay blend (float32)    ~50 B/px, in bands of 1 MP

Work in flight therefore costs about 7 B/px steadily plus the transients of at most one model
call (:data:`~clipad.serve.batcher.MAX_CALL_PIXELS` pixels, or one image when it is larger);
the memory figures measured with these defaults are in ``docs/serve.md``.

:func:`release_memory` gives freed heap back to the operating system after large requests
(glibc keeps freed memory in its arenas otherwise).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from ..errors import ClipadError, InvalidValueError

__all__ = [
    "DEFAULT_INFLIGHT_WAIT_S",
    "DEFAULT_MAX_INFLIGHT_PIXELS",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "PixelBudget",
    "RequestTooLarge",
    "ServerBusy",
    "check_request",
    "release_memory",
]

#: Default per-request budget: 64 MP, e.g. 16 images of 4 MP or 64 of 1 MP (an MVTec image is 1 MP);
#: about 0.5 GB held (7 B/px) plus one model call's transients.
DEFAULT_MAX_REQUEST_PIXELS = 64_000_000

#: Default budget of all work in flight: 256 MP, four full requests at once; about 1.8 GB held
#: (7 B/px) plus decoding and one model call's transients: measured 2.8 GB over the idle server
#: with 252 MP in flight (docs/serve.md), a bound a server with 4 GB to spare can afford.
DEFAULT_MAX_INFLIGHT_PIXELS = 256_000_000

#: How long a request that does not fit the in-flight budget waits for room before its 503.
DEFAULT_INFLIGHT_WAIT_S = 2.0


class RequestTooLarge(ClipadError):
    """The images of one request declare more pixels than the per-request budget (answered 413)."""


class ServerBusy(ClipadError):
    """The in-flight budget stayed full for the whole wait (answered 503 with ``Retry-After``)."""


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


def check_request(sizes: Sequence[tuple[str, int, int]], max_request_pixels: int) -> int:
    """Sum the declared pixels of one request's images, refusing it once over the budget.

    Args:
        sizes: ``(file name, width, height)`` per image, as read from the headers.
        max_request_pixels: the per-request budget, in pixels.

    Returns:
        ``sum(width * height)``.

    Raises:
        RequestTooLarge: naming the first file that takes the sum over the budget.
    """
    total = 0
    for name, width, height in sizes:
        total += width * height
        if total > max_request_pixels:
            earlier = total - width * height
            so_far = f" (with the {_mp(earlier)} of the files before it)" if earlier else ""
            raise RequestTooLarge(
                f"image '{name}' declares {width}x{height} pixels ({_mp(width * height)}), which brings this request "
                f"to {_mp(total)}{so_far}, over the server's per-request budget of {max_request_pixels / 1e6:g} MP "
                "of decoded images: send fewer or smaller images per request, or start the server with a larger "
                "--max-request-pixels"
            )
    return total


class PixelBudget:
    """Decoded pixels of all requests between admission and answer, with a first-come wait.

    All methods run on the event loop's thread (no locks). A request that fits is admitted at
    once unless others are already waiting (first come, first served: a large request is not
    starved by a stream of small ones); otherwise it waits up to ``wait_s`` seconds.

    Args:
        limit: most pixels in flight.
        wait_s: longest wait for room before :class:`ServerBusy`.
    """

    def __init__(self, limit: int, wait_s: float = DEFAULT_INFLIGHT_WAIT_S) -> None:
        if limit <= 0:
            raise InvalidValueError(f"the in-flight pixel budget must be positive, got {limit}")
        if wait_s < 0:
            raise InvalidValueError(f"the in-flight wait must be >= 0 seconds, got {wait_s}")
        self.limit = int(limit)
        self.wait_s = float(wait_s)
        self.in_flight = 0
        #: highest ``in_flight`` seen (for /v1/info and the tests)
        self.peak = 0
        #: requests refused with ServerBusy
        self.refused = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    def _take(self, pixels: int) -> None:
        self.in_flight += pixels
        self.peak = max(self.peak, self.in_flight)

    def _wake(self) -> None:
        while self._waiters and self.in_flight + self._waiters[0][0] <= self.limit:
            pixels, fut = self._waiters.popleft()
            if not fut.done():
                self._take(pixels)
                fut.set_result(None)

    async def acquire(self, pixels: int) -> None:
        """Admit ``pixels`` more, waiting up to ``wait_s`` for room.

        Raises:
            ServerBusy: no room within the wait (the message says how full the budget is).
            InvalidValueError: ``pixels`` is over the whole budget (it could never be admitted).
        """
        if pixels > self.limit:
            raise InvalidValueError(
                f"a request of {_mp(pixels)} can never fit the in-flight budget of {self.limit / 1e6:g} MP; "
                "keep --max-request-pixels at most --max-inflight-pixels"
            )
        if not self._waiters and self.in_flight + pixels <= self.limit:
            self._take(pixels)
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (pixels, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait({fut}, timeout=self.wait_s)  # never cancels fut itself
        except BaseException:  # cancelled (the client went away): give back what was granted
            if fut.done():
                self.release(pixels)
            else:
                fut.cancel()
                self._forget(entry)
            raise
        if fut.done():
            return
        fut.cancel()
        self._forget(entry)
        self.refused += 1
        raise ServerBusy(
            f"server busy: {_mp(self.in_flight)} of decoded images are in flight and this request needs "
            f"{_mp(pixels)} more, over the in-flight budget of {self.limit / 1e6:g} MP (--max-inflight-pixels); "
            f"waited {self.wait_s:g} s; retry later"
        )

    def _forget(self, entry: tuple[int, asyncio.Future]) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass
        self._wake()  # the head may have gone: those behind it may fit now

    def release(self, pixels: int) -> None:
        """Give back pixels admitted by :meth:`acquire` and admit waiters that now fit."""
        self.in_flight -= pixels
        self._wake()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """``async with budget.hold(n):`` acquire, run the block, release (also on errors)."""
        await self.acquire(pixels)
        try:
            yield
        finally:
            self.release(pixels)

    def stats(self) -> dict[str, int]:
        return {
            "in_flight_pixels": self.in_flight,
            "peak_in_flight_pixels": self.peak,
            "waiting_requests": len(self._waiters),
            "refused_busy": self.refused,
        }


def _load_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only (musl has none): AttributeError elsewhere
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_memory() -> bool:
    """Hand freed heap memory back to the operating system (glibc ``malloc_trim(0)``).

    glibc keeps memory freed by large requests in its arenas (one per thread that allocated,
    and the decode threads are many), so the server's RSS stays at its peak after an attack or
    a burst. ``malloc_trim`` returns the free pages of every arena. It takes a few milliseconds:
    call it after large requests only, off the event loop. Returns False where it does not exist
    (not Linux/glibc): nothing else to do there.
    """
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
