"""One stream's utterances: where speech starts and ends (VAD, end of audio, longest utterance), and ends that wait."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import LimitSettings, StreamSettings
from .endpointing import EndpointRules, EndReason, Verdict
from .stream_audio import AudioBuffer
from .vad import VadChange, VadGate


@dataclass(frozen=True)
class UtteranceState:
    """The open utterance as the decode policy sees it, in seconds of the stream."""

    start_s: float | None  # None: no utterance is open
    end_s: float | None  # None: it has not ended
    voice_end_s: float  # the end of its last voiced frame
    stream_s: float

    @property
    def active(self) -> bool:
        """An utterance is open."""
        return self.start_s is not None

    @property
    def ending(self) -> bool:
        """The open utterance has ended and waits for its final."""
        return self.end_s is not None

    @property
    def audio_end_s(self) -> float:
        """Where the utterance's audio ends so far: its end, or the newest audio while it goes on."""
        return self.end_s if self.end_s is not None else self.stream_s


@dataclass(frozen=True)
class _PendingEnd:
    """An end of audio that came while the utterance before was waiting for its final: it ends the speech
    after that one (the VAD changes queued before it, and a voice still going on when it came)."""

    stream_s: float
    voice_end_s: float
    wall: float
    queued_changes: int
    speaking: bool


class UtteranceTracker:
    """Opens an utterance where the VAD hears speech start and ends it at a pause, the end of the audio or
    `max_utterance_s`; speech and ends that come while an ended utterance waits for its final wait with it.

    With endpoint rules (a voice command), its endpointer may also end the whole request: then the utterance ends,
    and audio after it is not heard.

    Reads the stream's audio buffer for its length, the oldest audio held and arrival times; `now`/`wall`
    are the caller's monotonic clock in seconds.
    """

    def __init__(
        self,
        stream: StreamSettings,
        limits: LimitSettings,
        audio: AudioBuffer,
        *,
        split_on_silence: bool,
        endpoint_rules: EndpointRules | None = None,
    ) -> None:
        self._preroll_s = stream.preroll_ms / 1000
        self._rules = endpoint_rules
        self._finished = False
        self._max_utterance_s = limits.max_utterance_s
        self._split_on_silence = split_on_silence
        self._audio = audio
        self._vad = VadGate.of(stream, ends_commands=endpoint_rules is not None)
        self._queued_changes: list[VadChange] = []
        self._pending_end: _PendingEnd | None = None
        self._open(None)

    def _open(self, start_s: float | None) -> None:
        self._start_s = start_s
        self._end_s: float | None = None
        self._end_wall = 0.0
        self._voice_end_s = 0.0

    @property
    def start_s(self) -> float | None:
        """Where the open utterance starts (its preroll included); None when none is open."""
        return self._start_s

    @property
    def end_s(self) -> float | None:
        """Where the open utterance ended; None while it goes on."""
        return self._end_s

    @property
    def end_wall(self) -> float:
        """When the open utterance ended: when the audio of its pause arrived, or the end of audio came."""
        return self._end_wall

    @property
    def active(self) -> bool:
        """An utterance is open: speech was heard and its final is not out yet."""
        return self._start_s is not None

    @property
    def ending(self) -> bool:
        """The open utterance has ended and waits for its final."""
        return self._end_s is not None

    @property
    def final_tail_s(self) -> float:
        """The digital silence a final's audio needs after the VAD's last voiced frame."""
        return self._vad.final_tail_s

    @property
    def start_lookback_s(self) -> float:
        """How far before the moment the VAD reports it a speech start can lie."""
        return self._vad.start_lookback_s

    @property
    def finished(self) -> bool:
        """The endpointer ended the request: no audio after its end is heard."""
        return self._finished

    @property
    def voice_end_s(self) -> float:
        """The end of the last voiced frame of the open utterance."""
        return self._voice_end_s if self.ending else self._vad.last_voice_end_s

    def state(self) -> UtteranceState:
        """The open utterance now, for the decode policy."""
        return UtteranceState(self._start_s, self._end_s, self.voice_end_s, self._audio.end_s)

    def push(self, pcm: bytes, now: float) -> bool:
        """Hear audio the buffer has just taken; whether an utterance opened."""
        if self._finished:
            return False
        opened = False
        for change in self._vad.push(pcm):
            opened |= self._on_vad(change)
        too_long = self._start_s is not None and self._audio.end_s - self._start_s >= self._max_utterance_s
        if too_long and not self.ending:
            self._end_s = self._voice_end_s = self._audio.end_s
            self._end_wall = now
        return opened

    def _on_vad(self, change: VadChange) -> bool:
        if self.ending:
            # Speech that comes while a final is pending belongs to the next utterance.
            self._queued_changes.append(change)
        elif change.speaking and not self.active:
            self._open(max(self._audio.start_s, change.at_s - self._preroll_s))
            return True
        elif not change.speaking and self.active and self._split_on_silence:
            self._end_s = change.detected_s
            self._voice_end_s = change.at_s
            self._end_wall = self._audio.arrival_of(change.at_s)
        return False

    def endpoint(self, verdict: Callable[[], Verdict], now: float) -> EndReason | None:
        """With endpoint rules, end the request if they say so, given what the newest whole decode says of the
        command (asked only when it matters); the open utterance ends with it (at its last voice, or cut where the
        audio is when too long)."""
        if self._rules is None or self._finished or self.ending:
            return None
        active = self.active
        silence_s = self._audio.end_s - self._vad.last_voice_end_s if active else None
        reason = self._rules.end(audio_s=self._audio.end_s, silence_s=silence_s, verdict=verdict)
        if reason is None:
            return None
        self._finished = True
        if active:
            self._end_s = self._audio.end_s
            if reason is EndReason.TOO_LONG:
                self._voice_end_s, self._end_wall = self._audio.end_s, now
            else:
                self._voice_end_s = self._vad.last_voice_end_s
                self._end_wall = self._audio.arrival_of(self._voice_end_s)
        return reason

    def end_of_audio(self, now: float) -> None:
        """The client ended the audio: it ends the open utterance, or the speech after the one ending."""
        if self._finished:
            return
        if self.active and not self.ending:
            self._end_s = self._audio.end_s
            self._voice_end_s = self._vad.last_voice_end_s
            self._end_wall = now
        elif self.ending:
            self._pending_end = _PendingEnd(
                self._audio.end_s, self._vad.last_voice_end_s, now, len(self._queued_changes), self._vad.speaking
            )
        # What follows the end signal is a new request: speech must start afresh.
        self._vad.reset()

    def close(self) -> None:
        """The ended utterance's final is out: the speech that waited for it opens (and may end) the next one."""
        assert self._end_s is not None
        end_s = self._end_s
        queued, self._queued_changes = self._queued_changes, []
        pending, self._pending_end = self._pending_end, None
        if self._finished:
            self._open(None)
            return
        next_start_s = max(end_s, self._audio.start_s)
        # Forced ends (max_utterance_s) cut running speech: the rest is the next utterance.
        self._open(next_start_s if self._vad.speaking and not queued else None)
        before_end = queued if pending is None else queued[: pending.queued_changes]
        for change in before_end:
            self._on_vad(change)
        if pending is not None:
            self._end_pending(pending, next_start_s)
        # Changes after that end are queued again: they belong to the utterance after it.
        for change in queued[len(before_end) :]:
            self._on_vad(change)

    def _end_pending(self, pending: _PendingEnd, start_s: float) -> None:
        """End the speech that came between the last final's end and an end of audio that came meanwhile."""
        if not self.active and pending.speaking:
            self._open(start_s)
        if self.active and not self.ending:
            self._end_s = pending.stream_s
            self._voice_end_s = pending.voice_end_s
            self._end_wall = pending.wall
