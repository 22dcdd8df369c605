"""webrtcvad gate: finds speech start and end (after `silence_ms` of non-speech) in 16 kHz PCM."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import webrtcvad

from .audio import SAMPLE_RATE, SAMPLE_WIDTH

FRAME_MS = 30
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000 * SAMPLE_WIDTH
# Speech starts when most of a short run of frames is voiced: one voiced click is not speech.
_START_WINDOW = 5
_START_VOICED = 3
# How far back from the moment it is reported a speech start can lie.
START_LOOKBACK_S = _START_WINDOW * FRAME_MS / 1000


@dataclass(frozen=True)
class VadChange:
    """Speech started (`speaking`) or ended at `at_s`, as decided at `detected_s` (stream seconds)."""

    speaking: bool
    at_s: float
    detected_s: float


class VadGate:
    """Frame-by-frame speech detector with a start vote and a silence hangover."""

    def __init__(self, aggressiveness: int, silence_ms: int) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)
        self._silence_frames = max(1, -(-silence_ms // FRAME_MS))
        self._pending = b""
        self._frames_seen = 0
        self._recent: deque[bool] = deque(maxlen=_START_WINDOW)
        self._unvoiced_run = 0
        self.speaking = False
        self.last_voice_end_s = 0.0

    def push(self, pcm: bytes) -> list[VadChange]:
        """Feed audio of any length; return the speech starts and ends it completes."""
        data = self._pending + pcm
        whole = len(data) - len(data) % FRAME_BYTES
        self._pending = data[whole:]
        changes: list[VadChange] = []
        for offset in range(0, whole, FRAME_BYTES):
            voiced = self._vad.is_speech(data[offset : offset + FRAME_BYTES], SAMPLE_RATE)
            self._frames_seen += 1
            frame_end_s = self._frames_seen * FRAME_MS / 1000
            self._recent.append(voiced)
            if voiced:
                self.last_voice_end_s = frame_end_s
                self._unvoiced_run = 0
            else:
                self._unvoiced_run += 1
            if not self.speaking and sum(self._recent) >= _START_VOICED:
                self.speaking = True
                first_voiced = len(self._recent) - self._recent.index(True)
                changes.append(VadChange(True, frame_end_s - first_voiced * FRAME_MS / 1000, frame_end_s))
            elif self.speaking and self._unvoiced_run >= self._silence_frames:
                self.speaking = False
                self._recent.clear()
                changes.append(VadChange(False, self.last_voice_end_s, frame_end_s))
        return changes

    def reset(self) -> None:
        """Forget the current speech state (not the stream position): the next speech starts anew."""
        self._recent.clear()
        self._unvoiced_run = 0
        self.speaking = False
