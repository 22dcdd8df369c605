"""The shared speech corpus (`../shared/speech`, or $SHARED_SPEECH_DIR) and text comparison for the tests."""

from __future__ import annotations

import os
import re
import wave
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEECH_DIR = Path(os.environ.get("SHARED_SPEECH_DIR", REPO.parent / "shared" / "speech"))
RATE = 16_000
BYTES_PER_S = RATE * 2


@cache
def read_pcm(name: str) -> bytes:
    """The s16le 16 kHz mono frames of a clip in the shared speech corpus."""
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
