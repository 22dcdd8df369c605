"""PCM conversions for 16 kHz mono audio, the engine's one input format."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000
SAMPLE_WIDTH = 2
BYTES_PER_SECOND = SAMPLE_RATE * SAMPLE_WIDTH

FloatAudio = npt.NDArray[np.float32]


def pcm16_to_float(pcm: bytes) -> FloatAudio:
    """s16le bytes to float32 samples in [-1, 1)."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def seconds_to_bytes(seconds: float) -> int:
    """Byte count of that much 16 kHz s16le audio, on a sample boundary."""
    return round(seconds * SAMPLE_RATE) * SAMPLE_WIDTH


class PcmConverter:
    """One stream's PCM, chunk by chunk, from any sample width, channel count and rate to 16 kHz mono s16le.

    8-bit samples are unsigned, 16- and 32-bit ones signed little-endian (the WAV and Wyoming convention).
    Channels are averaged. The rate is changed by linear interpolation on one output grid for the whole
    stream, so chunk boundaries neither click nor drift; a rate that changes between chunks keeps the time.
    """

    # numpy's type for each sample width in bytes.
    _DTYPES: ClassVar[dict[int, str]] = {1: "u1", 2: "<i2", 4: "<i4"}
    # Unsigned 8-bit audio is centred here.
    _U8_ZERO = 128
    # What one unit of each width is worth on the 16-bit scale.
    _SCALES: ClassVar[dict[int, float]] = {1: 256.0, 2: 1.0, 4: 1.0 / 65536.0}

    def __init__(self) -> None:
        self._rate = 0  # the input rate so far; 0 before the first chunk
        self._last: float | None = None  # the previous chunk's last sample: the next chunk interpolates from it
        # Where the next output sample falls after `_last`, in 1/SAMPLE_RATE input samples (exact integers:
        # an output is due every `rate` of them).
        self._phase = 0

    @staticmethod
    def converted_size(byte_count: int, rate: int, width: int, channels: int) -> int:
        """The most bytes `convert` returns for `byte_count` bytes of this format (to bound memory beforehand)."""
        frames = byte_count // (width * channels)
        return (frames * SAMPLE_RATE // rate + 1) * SAMPLE_WIDTH

    def convert(self, pcm: bytes, rate: int, width: int, channels: int) -> bytes:
        """The chunk as 16 kHz mono s16le; ValueError for a width other than 1, 2 or 4 bytes, a rate or
        channel count below 1, or a chunk that is not whole frames (the stream's state is then unchanged)."""
        if width not in self._DTYPES or rate < 1 or channels < 1:
            raise ValueError(f"cannot convert {width}-byte samples, {channels} channels at {rate} Hz")
        frame = width * channels
        if len(pcm) % frame:
            raise ValueError(f"{len(pcm)} bytes are not whole {frame}-byte frames")
        if not pcm:
            return b""
        samples = np.frombuffer(pcm, dtype=self._DTYPES[width]).astype(np.float64)
        if width == 1:
            samples -= self._U8_ZERO
        mono = samples.reshape(-1, channels).mean(axis=1) * self._SCALES[width]
        if self._rate and rate != self._rate:
            self._phase = self._phase * rate // self._rate
        self._rate = rate
        if self._last is not None:
            mono = np.concatenate(([self._last], mono))
        # The newest sample's place on the grid; outputs are due up to it, the rest in the next chunk.
        span = (len(mono) - 1) * SAMPLE_RATE
        count = (span - self._phase) // rate + 1 if span >= self._phase else 0
        positions = (self._phase + np.arange(count, dtype=np.int64) * rate) / SAMPLE_RATE
        out = np.interp(positions, np.arange(len(mono)), mono)
        self._phase += count * rate - span
        self._last = float(mono[-1])
        s16 = np.iinfo(np.int16)
        converted: bytes = np.clip(np.rint(out), s16.min, s16.max).astype("<i2").tobytes()
        return converted
