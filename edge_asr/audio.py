"""PCM conversions for 16 kHz mono audio, the engine's one input format."""

from __future__ import annotations

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
