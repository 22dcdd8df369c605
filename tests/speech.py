"""The speech corpus shipped with edge-asr (`edge_asr/bench/speech`) and text comparison for the tests."""

from __future__ import annotations

import re
import wave
from functools import cache
from pathlib import Path

import numpy as np

from edge_asr.bench.arguments import SHIPPED_CORPUS

REPO = Path(__file__).resolve().parent.parent
SPEECH_DIR = SHIPPED_CORPUS
RATE = 16_000
BYTES_PER_S = RATE * 2


@cache
def read_pcm(name: str) -> bytes:
    """The s16le 16 kHz mono frames of a clip in the shipped speech corpus."""
    with wave.open(str(SPEECH_DIR / f"{name}.wav"), "rb") as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (RATE, 2, 1)
        return wav.readframes(wav.getnframes())


@cache
def reference(name: str) -> str:
    """The reference transcript of a clip."""
    return (SPEECH_DIR / f"{name}.txt").read_text(encoding="utf-8").strip()


def silence(seconds: float) -> bytes:
    """Digital silence of that duration, 16 kHz s16le."""
    return b"\0\0" * round(seconds * RATE)


def normalise(text: str) -> str:
    """Lower case words without punctuation."""
    return " ".join(re.sub(r"[^\w' ]+", " ", text.lower()).split())


def voiced(seconds: float) -> bytes:
    """A sustained vowel of that duration (a 140 Hz voice with vibrato, and its harmonics), 16 kHz s16le: webrtcvad
    hears every frame of it as speech, so unlike a clip of the corpus it holds no pause of its own."""
    t = np.arange(round(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(140.0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / RATE
    vowel = np.sum([np.sin(k * phase) / k for k in range(1, 25)], axis=0)
    pcm: bytes = (vowel / np.abs(vowel).max() * 0.3 * 32767).astype("<i2").tobytes()
    return pcm
