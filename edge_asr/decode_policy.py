"""What a stream decodes next and why: a partial, the whole utterance, or audio no decode has caught up with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .agreement import LocalAgreement
from .config import StreamSettings
from .transcript import EndCues, Word
from .utterance import UtteranceState

# A hypothesis that reaches this far past the last voiced frame has heard every word: webrtcvad marks
# the soft end of a word as unvoiced a frame or three early.
COVER_MARGIN_S = 0.12
# Whisper's window: the most one decode hears. A whole decode of an utterance this long or shorter hears all of
# it, with no seam where words committed from a shorter window could be wrong.
WHOLE_DECODE_MAX_S = 30.0
# Partial decodes of one speaker use at most this share of a decode worker's time.
_PARTIAL_CPU_SHARE = 0.5
# Word times that differ by less than this are the same moment (a committed word re-read by a window).
_SAME_TIME_S = 0.05

DecodeKind = Literal["partial", "final", "catch_up"]


@dataclass(frozen=True)
class DecodeWindow:
    """The decode chosen: its audio from `start_s` to `end_s`, the committed words before it (its prompt's context),
    and where the audio no later decode needs ends (None: where it did)."""

    final: bool
    start_s: float
    end_s: float
    voice_end_s: float
    prefix: tuple[Word, ...]
    drop_before_s: float | None


@dataclass(frozen=True)
class FinalCandidate:
    """A whole decode of the utterance that may become its final: words in session seconds, and the cues that the
    speech ends with them when the endpointer asked for them."""

    words: tuple[Word, ...]
    window_start_s: float
    voice_end_s: float
    asr_ms: float
    arrival: float
    trusted: bool
    language: str = ""
    end_cues: EndCues | None = None


class DecodePolicy:
    """Chooses a stream's decodes and keeps what they heard: committed words, the whole decode that may be final.

    Partials decode at most `max_window_s` up to the newest audio, every `cycle_ms` of new speech. As soon as the
    speaker pauses for `final_silence_ms`, the whole utterance is decoded (from its start, or from its committed
    prefix when longer than Whisper's window), ahead of any partial. At most one partial and one whole decode are
    out at a time; they may run side by side.

    Without `partials` (nobody reads them), partials are decoded only for an utterance longer than Whisper's
    window, whose final needs the words they commit; the whole decodes at pauses make the final and tell the
    endpointer what was said.
    """

    def __init__(self, stream: StreamSettings, *, partials: bool = True) -> None:
        self._stream = stream
        self._partials = partials
        self._partial_in_flight = False
        self._final_in_flight = False
        # Model time of the newest partial decode: partial decodes get no more than their share of the CPU.
        self._partial_asr_s = 0.0
        self.reset(None)

    def reset(self, start_s: float | None) -> None:
        """Forget the utterance before: the next decodes are of the one opened at `start_s` (None: none is)."""
        self._window_start_s = start_s or 0.0
        self._agreement = LocalAgreement()
        self._last_request_end_s = start_s or 0.0
        # The end of the newest decode of this utterance: how far back a window must reach not to skip audio.
        self._heard_end_s = start_s or 0.0
        self._candidate: FinalCandidate | None = None
        # The last voiced frame the newest whole decode heard (None: none yet, or it failed).
        self._whole_voice_end_s: float | None = None
        # The voiced end whose whole decode failed: not retried until more speech or the end comes.
        self._failed_voice_end_s: float | None = None

    @property
    def partials(self) -> bool:
        """Whether something reads partials."""
        return self._partials

    def set_partials(self, wanted: bool) -> None:
        """Whether partials are read from now on."""
        self._partials = wanted

    @property
    def in_flight(self) -> bool:
        """A decode is out and has not come back."""
        return self._partial_in_flight or self._final_in_flight

    @property
    def committed(self) -> tuple[Word, ...]:
        """The words two partial hypotheses agreed on."""
        return self._agreement.committed

    @property
    def tentative(self) -> tuple[Word, ...]:
        """The newest hypothesis after the committed words."""
        return self._agreement.tentative

    @property
    def candidate(self) -> FinalCandidate | None:
        """The newest whole decode of the utterance."""
        return self._candidate

    def whole_words(self, voice_end_s: float) -> list[Word] | None:
        """All the words of the utterance as its newest trusted whole decode heard them (the committed prefix before
        its window, then its own), when it heard the voice up to `voice_end_s`; None when no such decode is in."""
        candidate = self._candidate
        if candidate is None or not candidate.trusted or candidate.voice_end_s < voice_end_s:
            return None
        return self.committed_before(candidate.window_start_s) + list(candidate.words)

    def committed_before(self, time_s: float) -> list[Word]:
        """The committed words that end by `time_s`: the prefix a window starting there does not hear."""
        return [w for w in self._agreement.committed if w.end <= time_s + _SAME_TIME_S]

    def undecoded_s(self, state: UtteranceState) -> float:
        """Seconds of the open utterance's audio (and of what came after its end) that no decode has reached."""
        if not state.active:
            return 0.0
        return state.stream_s - self._last_request_end_s

    def next_kind(self, state: UtteranceState) -> DecodeKind | None:
        """The decode that would bring something new now, if any."""
        if state.start_s is None:
            return None
        if not self._final_in_flight and self._wants_whole_decode(state):
            final_end_s = self._final_end_s(state)
            if self._whole_from_start(state.start_s, final_end_s) or self._catch_up_end_s(final_end_s) is None:
                return "final"
            # Even once the utterance has ended, the audio it skipped comes first.
            return None if self._partial_in_flight else "catch_up"
        if self._partial_in_flight or state.ending:
            return None
        if state.stream_s - state.start_s < self._stream.min_window_s:
            return None
        if not self._partials and self._whole_from_start(state.start_s, state.stream_s):
            return None
        # Partials are for display: when the CPU is slow, they come less often rather than fall behind.
        cycle_s = max(self._stream.cycle_ms / 1000, self._partial_asr_s / _PARTIAL_CPU_SHARE)
        if state.stream_s - self._last_request_end_s < cycle_s:
            return None
        # No new speech since the last decode: another one could not change a word.
        if state.voice_end_s + COVER_MARGIN_S <= self._last_request_end_s:
            return None
        # Nor since a whole decode started: it hears the utterance to its end, even after a pause shorter than that.
        if self._whole_voice_end_s is not None and state.voice_end_s <= self._whole_voice_end_s:
            return None
        return "partial"

    def heard_whole(self, state: UtteranceState) -> bool:
        """The newest whole decode heard the utterance's voice to its end, and none after its end (an utterance split
        at a pause ends before speech a whole decode may have heard)."""
        candidate = self._candidate
        return candidate is not None and state.voice_end_s <= candidate.voice_end_s <= state.audio_end_s

    def _wants_whole_decode(self, state: UtteranceState) -> bool:
        if self.heard_whole(state):
            return False
        if state.ending:
            return True
        if self._failed_voice_end_s == state.voice_end_s:
            return False
        # The speaker paused: this may be the end of the utterance, so decode all of it now.
        return state.stream_s - state.voice_end_s >= self._stream.final_silence_ms / 1000

    def _final_end_s(self, state: UtteranceState) -> float:
        """Where a whole decode of the utterance ends: `final_silence_ms` after its last voiced frame, or the end of
        the audio before that."""
        return min(state.audio_end_s, state.voice_end_s + self._stream.final_silence_ms / 1000)

    @staticmethod
    def _whole_from_start(start_s: float, end_s: float) -> bool:
        """Whether a whole decode ending at `end_s` hears the utterance from its start."""
        return end_s - start_s <= WHOLE_DECODE_MAX_S

    def _catch_up_end_s(self, end_s: float) -> float | None:
        """Where a decode must stop short of `end_s`, or None: a window of `max_window_s` ending at `end_s`
        would start after audio no decode has heard yet (it came faster than it was decoded: an upload, a
        CPU far behind), so the decodes work through it half a window at a time instead of skipping it."""
        reach_s = self._heard_end_s + self._stream.max_window_s / 2
        if end_s - self._window_start_s <= self._stream.max_window_s or end_s <= reach_s:
            return None
        return reach_s

    def plan(self, state: UtteranceState) -> DecodeWindow:
        """Take the decode `next_kind` chose as out: which audio it hears and what comes before it."""
        assert state.start_s is not None
        final = self.next_kind(state) == "final"
        end_s = self._final_end_s(state) if final else (self._catch_up_end_s(state.audio_end_s) or state.audio_end_s)
        drop_before_s: float | None = None
        if final and self._whole_from_start(state.start_s, end_s):
            start_s = state.start_s
        else:
            drop_before_s = self._bound_window(end_s)
            start_s = self._window_start_s
        if final:
            self._final_in_flight = True
            self._whole_voice_end_s = state.voice_end_s
        else:
            self._partial_in_flight = True
        self._last_request_end_s = max(self._last_request_end_s, end_s)
        prefix = tuple(self.committed_before(start_s))
        return DecodeWindow(final, start_s, end_s, state.voice_end_s, prefix, drop_before_s)

    def _bound_window(self, end_s: float) -> float | None:
        """Keep the window under max_window_s by trimming at committed word boundaries; where the audio still
        needed starts, once it moved."""
        overlap = self._stream.overlap_ms / 1000
        limit = self._stream.max_window_s
        if end_s - self._window_start_s <= limit:
            return None
        committed = self._agreement.committed
        if not committed or end_s - (committed[-1].end - overlap) > limit:
            # Words near the end of the newest decode may be cut there: only one that decode heard whole is forced.
            self._agreement.commit_before(
                min(end_s - limit / 2, self._heard_end_s - self._stream.commit_margin_ms / 1000)
            )
            committed = self._agreement.committed
        if committed:
            self._window_start_s = max(self._window_start_s, committed[-1].end - overlap)
        if end_s - self._window_start_s > limit:
            self._window_start_s = end_s - limit
        # A whole decode still hears the utterance from its start while Whisper's window holds it.
        return min(self._window_start_s, end_s - WHOLE_DECODE_MAX_S)

    def returned(self, final: bool, asr_ms: float | None) -> None:
        """A decode came back: `asr_ms` is its model time, None when it raised."""
        if final:
            self._final_in_flight = False
        else:
            self._partial_in_flight = False
            if asr_ms is not None:
                self._partial_asr_s = asr_ms / 1000

    def heard(self, end_s: float) -> None:
        """A decode of the open utterance heard its audio up to `end_s`."""
        self._heard_end_s = max(self._heard_end_s, end_s)

    def take_hypothesis(self, words: list[Word], end_s: float) -> None:
        """The newest trusted words of a decode ending at `end_s`: those two decodes agree on are committed."""
        self._agreement.update(words, horizon_s=end_s - self._stream.commit_margin_ms / 1000)

    def take_whole(self, candidate: FinalCandidate) -> None:
        """A whole decode of the utterance came back."""
        self._candidate = candidate

    def whole_unusable(self) -> None:
        """The newest whole decode is not to be trusted: the partials' path stands in, and may still need their
        decodes."""
        self._whole_voice_end_s = None

    def whole_failed(self, voice_end_s: float) -> None:
        """A whole decode of the speech up to `voice_end_s` raised: none is tried again until more speech comes."""
        self.whole_unusable()
        self._failed_voice_end_s = voice_end_s
