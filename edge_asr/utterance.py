"""One stream's utterances: where speech starts and ends (VAD, end of audio, longest utterance), and ends that wait."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import LimitSettings, StreamSettings
from .endpointing import EndpointRules, EndReason, Verdict
from .stream_audio import AudioBuffer
from .vad import VadChange, VadGate, VadPause


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


# Pause lengths are whole VAD frames: a difference smaller than this is the rounding of their float times.
_SAME_LENGTH_S = 1e-6


@dataclass(frozen=True)
class _AudioEnd:
    """The client's end of audio: it ends the open utterance, or once the final it waits for is out, the speech
    after that one."""

    stream_s: float
    voice_end_s: float
    wall: float


@dataclass(frozen=True)
class _NextPart:
    """The speech after the pause where a long utterance was split: it opens the next utterance at `start_s` once
    the final is out, with the pauses it already holds."""

    start_s: float
    pauses: tuple[VadPause, ...]


def _add_pause(pauses: list[VadPause], pause: VadPause) -> None:
    """Remember a pause after the others, forgetting those no longer than it: a later pause at least as long is
    always as good a split. Each pause kept is then a frame longer than the next, so n of them span n(n+1)/2 frames:
    a few dozen in 30 s at most, even from a VAD that flaps between every two frames."""
    while pauses and pauses[-1].length_s <= pause.length_s + _SAME_LENGTH_S:
        pauses.pop()
    pauses.append(pause)


class UtteranceTracker:
    """Opens an utterance where the VAD hears speech start and ends it at a pause, the end of the audio or
    `max_utterance_s`; speech and ends that come while an ended utterance waits for its final wait with it.

    An utterance that reaches `max_utterance_s` ends at its best pause (see `_split`), and the speech after that
    pause opens the next one; only an utterance without any pause is cut at the limit, in running speech.

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
        self._queued: list[VadChange | VadPause | _AudioEnd] = []
        self._open(None)

    def _open(self, start_s: float | None, pauses: tuple[VadPause, ...] = ()) -> None:
        self._start_s = start_s
        self._end_s: float | None = None
        self._end_wall = 0.0
        self._voice_end_s = 0.0
        # The pauses inside the open utterance where it could be split, each longer than those after it.
        self._pauses = list(pauses)
        self._next_part: _NextPart | None = None

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
        """When the open utterance ended: when the audio of its pause arrived, the end of audio came, or it reached
        `max_utterance_s`."""
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
        for event in self._vad.hear(pcm):
            opened |= self._hear(event)
        too_long = self._start_s is not None and self._audio.end_s - self._start_s >= self._max_utterance_s
        if too_long and not self.ending:
            self._split(now)
        return opened

    def _hear(self, event: VadChange | VadPause | _AudioEnd) -> bool:
        """Apply a speech start or end, a pause or an end of audio to the open utterance; whether one opened."""
        if self.ending:
            # What comes while a final is pending belongs to the utterances after it.
            self._queued.append(event)
        elif isinstance(event, _AudioEnd):
            if self.active:
                self._end(event.stream_s, event.voice_end_s, event.wall)
        elif isinstance(event, VadPause):
            if self.active:
                _add_pause(self._pauses, event)
            else:
                # The voice goes on after a pause that a split ended the utterance before in: it opens the next.
                self._open(max(self._audio.start_s, event.end_s - self._preroll_s))
                return True
        elif event.speaking and not self.active:
            self._open(max(self._audio.start_s, event.at_s - self._preroll_s))
            return True
        elif not event.speaking and self.active and self._split_on_silence:
            self._end(event.detected_s, event.at_s, self._audio.arrival_of(event.at_s))
        return False

    def _end(self, end_s: float, voice_end_s: float, wall: float) -> None:
        self._end_s = end_s
        self._voice_end_s = voice_end_s
        self._end_wall = wall

    def _split(self, now: float) -> None:
        """End the open utterance, `max_utterance_s` long, at its best pause; the speech after that pause is the
        next utterance.

        The best pause is the longest of those that start in the second half of the limit, or the latest one when
        none does: the longest pause is the likeliest end of a sentence, which Whisper decodes best whole, and one
        in the second half keeps each part at least half the limit long, so that a long talk is not cut into many
        short finals with little context each. Only without any pause is the utterance cut at the limit.
        """
        assert self._start_s is not None
        candidates = list(self._pauses)
        # A pause going on now is the latest one; when it is the split, the VAD opens the next utterance.
        in_progress = VadPause(self._vad.last_voice_end_s, self._audio.end_s) if self._vad.paused else None
        if in_progress is not None:
            _add_pause(candidates, in_progress)
        # A pause that began before the utterance (the voice had stopped before a cut) ends none of its voice.
        pauses = [p for p in candidates if p.start_s > self._start_s]
        second_half_s = self._start_s + self._max_utterance_s / 2
        pause = next((p for p in pauses if p.start_s >= second_half_s), pauses[-1] if pauses else None)
        if pause is None:
            # Running speech without a pause: cut where the audio is; the speech goes on as the next utterance.
            self._end(self._audio.end_s, self._audio.end_s, now)
            self._next_part = _NextPart(self._audio.end_s, ())
            return
        # The next utterance gets its preroll where the pause holds it, and at least half the pause; the utterance
        # ending gets the rest (the soft end of its last word). The session drops only the audio before the end
        # once the final is out: the next utterance's is still held.
        end_s = max((pause.start_s + pause.end_s) / 2, pause.end_s - self._preroll_s)
        self._end(end_s, pause.start_s, now)
        if pause is not in_progress:
            later = tuple(p for p in self._pauses if p.start_s >= pause.end_s)
            self._next_part = _NextPart(end_s, later)

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
        self._hear(_AudioEnd(self._audio.end_s, self._vad.last_voice_end_s, now))
        # What follows the end signal is a new request: speech must start afresh.
        self._vad.reset()

    def close(self) -> None:
        """The ended utterance's final is out: the speech that waited for it opens (and may end) the next ones."""
        assert self._end_s is not None
        queued, self._queued = self._queued, []
        next_part = self._next_part
        if next_part is None:
            self._open(None)
        else:
            # Its start lies after the end: the audio the session keeps holds it, unless a window dropped more.
            self._open(max(next_part.start_s, self._audio.start_s), next_part.pauses)
        # After an end the endpointer made, nothing is heard.
        if not self._finished:
            for event in queued:
                self._hear(event)
