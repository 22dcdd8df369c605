"""The decodes' native memory: glibc's malloc arenas, giving free memory back, and how much encoding runs at once."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

# glibc gives each thread that allocates its own malloc arena (up to 8 per core); CTranslate2's threads and the
# decode workers each kept theirs full of freed buffers. Two arenas: peak RSS 330 -> 300 MB on 60 bench clips.
_MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number in glibc

# Even in two arenas, the buffers of decodes of many lengths stay behind as free memory that glibc does not give
# back by itself (RSS grew 1.4 MB a minute over a 30-minute soak; in-process, 100 mixed decodes left 120 MB that
# one malloc_trim returned). Trimming before a partial decode, at most this often, gives it back for a few ms.
_TRIM_INTERVAL_S = 10.0


def _glibc_function(name: str) -> Any:
    """A function of the C library this process runs on, or None where it has none of that name (no glibc)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas for the threads started from now on, unless MALLOC_ARENA_MAX says otherwise (and
    where there is no glibc, do nothing)."""
    mallopt = _glibc_function("mallopt")
    if mallopt is not None and "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, _MALLOC_ARENAS)


def free_memory_release() -> Callable[[], None]:
    """A call that gives glibc's free memory back to the system (malloc_trim), or does nothing without glibc."""
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


class FreeMemoryTrimmer:
    """Gives free memory back to the system through `release`, at once or at most every _TRIM_INTERVAL_S; called on
    the decode threads, never on the event loop."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._lock = threading.Lock()
        self._trimmed_at = time.monotonic()

    def trim(self) -> None:
        """Trim, unless it was done less than _TRIM_INTERVAL_S ago (by this thread or another)."""
        with self._lock:
            now = time.monotonic()
            if now - self._trimmed_at < _TRIM_INTERVAL_S:
                return
            self._trimmed_at = now
        self._release()

    def trim_now(self) -> None:
        """Trim at once."""
        with self._lock:
            self._trimmed_at = time.monotonic()
        self._release()


class EncoderBudget:
    """Admits decodes while the encoder frames of those in flight fit in `frames`, in the order they asked; a
    decode with nothing else in flight is always admitted, however large.

    A decode's peak memory grows with the frames it encodes. Measured on tiny.en over the idle service (191 MB):
    +24 to +43 MB for a decode at the 15 s encoder floor, +44 to +48 MB for two of them at once, +99 MB for one
    of Whisper's full 30 s. With one WebSocket speaker on 60 bench clips, every RSS peak above 300 MB was a
    decode longer than the floor (a 25 s utterance's final, or the 30 s second opinion) next to another decode
    or next to the free memory the decodes before it left behind.
    """

    def __init__(self, frames: int) -> None:
        self._frames = frames
        self._in_flight = 0
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def admit(self, frames: int) -> Iterator[bool]:
        """Hold `frames` while the block runs, once they fit and every decode that asked before was admitted;
        yields whether nothing else was in flight when it was admitted."""
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            self._changed.wait_for(lambda: self._waiting[0] is ticket and self._fits(frames))
            self._waiting.popleft()
            alone = self._in_flight == 0
            self._in_flight += frames
            self._changed.notify_all()
        try:
            yield alone
        finally:
            with self._changed:
                self._in_flight -= frames
                self._changed.notify_all()

    def _fits(self, frames: int) -> bool:
        return self._in_flight == 0 or self._in_flight + frames <= self._frames
