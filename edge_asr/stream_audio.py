"""One stream's audio buffer: the samples still needed, their place in the stream, and when they arrived."""

from __future__ import annotations

from collections import deque

from .audio import BYTES_PER_SECOND, SAMPLE_WIDTH, seconds_to_bytes

# Arrival times kept: at 20 ms chunks, the last 80 s of audio.
_MAX_ARRIVALS = 4096


class AudioBuffer:
    """s16le mono 16 kHz audio from `start_s` to `end_s` (seconds of the stream), and when each chunk arrived.

    `now` is the caller's monotonic clock in seconds.
    """

    def __init__(self) -> None:
        self._pcm = bytearray()
        self._start_s = 0.0
        self._end_s = 0.0
        # (stream position at the end of a chunk, when that chunk arrived)
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=_MAX_ARRIVALS)

    @property
    def start_s(self) -> float:
        """Where the oldest audio still held starts."""
        return self._start_s

    @property
    def end_s(self) -> float:
        """Where the newest audio ends: the length of the stream so far."""
        return self._end_s

    def append(self, pcm: bytes, now: float) -> None:
        """Add a chunk of any even length that arrived at `now`."""
        self._pcm += pcm
        self._end_s += len(pcm) / BYTES_PER_SECOND
        self._arrivals.append((self._end_s, now))

    def slice(self, start_s: float, end_s: float) -> bytes:
        """The audio from `start_s` to `end_s`, without what was dropped."""
        first = max(0, seconds_to_bytes(start_s - self._start_s))
        last = max(first, seconds_to_bytes(end_s - self._start_s))
        return bytes(self._pcm[first:last])

    def drop_before(self, time_s: float) -> None:
        """Forget the audio before `time_s` (never more than is held, and whole samples only)."""
        cut = seconds_to_bytes(time_s - self._start_s)
        if cut <= 0:
            return
        cut = min(cut, len(self._pcm) - len(self._pcm) % SAMPLE_WIDTH)
        del self._pcm[:cut]
        self._start_s += cut / BYTES_PER_SECOND

    def arrival_of(self, time_s: float) -> float:
        """When the audio at that position reached the server (0.0 before any did)."""
        for stream_end_s, arrived in self._arrivals:
            if stream_end_s >= time_s - 1e-6:
                return arrived
        return self._arrivals[-1][1] if self._arrivals else 0.0
