"""One stream's state machine: audio buffer, VAD, when to decode what, commits and events. No I/O."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .agreement import LocalAgreement, Word, join_words, normalise, strip_committed
from .audio import BYTES_PER_SECOND, SAMPLE_WIDTH, FloatAudio, pcm16_to_float, seconds_to_bytes
from .config import LimitSettings, StreamSettings
from .events import Event, Final, Partial, words_after
from .vad import START_LOOKBACK_S, VadChange, VadGate
from .vocabulary import NamesInPrompt, NameSpeller

if TYPE_CHECKING:
    from .model import Transcript

# A hypothesis that reaches this far past the last voiced frame has heard every word: webrtcvad marks
# the soft end of a word as unvoiced a frame or three early.
COVER_MARGIN_S = 0.12
# A word that starts this long after the last voiced frame was not heard but made up.
SILENT_WORD_TOLERANCE_S = 0.3
# Partial decodes of one speaker use at most this share of a decode worker's time.
_PARTIAL_CPU_SHARE = 0.5
# Word times that differ by less than this are the same moment (a committed word re-read by a window).
_SAME_TIME_S = 0.05
# A run of this many words said twice in a row is a decoding loop, not speech.
_LOOP_WORDS = 4
# Whisper ends its last segment on silence; without enough of it, it leaves the last words to a later pass of their
# own, which may drop them. A final's audio ends on at least this much: where the pause that started its decode
# was shorter (`final_silence_ms`), or the audio stopped with the voice, digital silence makes up the rest.
FINAL_TAIL_S = 0.12
# Whisper's window: the most one decode hears. A whole decode of an utterance this long or shorter hears all of
# it, with no seam where words committed from a shorter window could be wrong.
WHOLE_DECODE_MAX_S = 30.0
_MAX_ARRIVALS = 4096


@dataclass(frozen=True)
class DecodeRequest:
    """A window of audio to transcribe; times are seconds of the session's audio."""

    audio: FloatAudio
    start_s: float
    end_s: float
    prompt: str
    language: str
    final: bool
    newest_arrival: float
    utterance_start_s: float
    voice_end_s: float = 0.0
    names: NamesInPrompt | None = None


@dataclass(frozen=True)
class _Candidate:
    """A whole decode of the utterance that may become its final: words in session seconds."""

    words: tuple[Word, ...]
    window_start_s: float
    voice_end_s: float
    asr_ms: float
    arrival: float
    trusted: bool


@dataclass(frozen=True)
class _PendingEnd:
    """An end of audio that came while the utterance before was waiting for its final: it ends the speech
    after that one (the VAD changes queued before it, and a voice still going on when it came)."""

    stream_s: float
    voice_end_s: float
    wall: float
    queued_changes: int
    speaking: bool


def repeats_itself(words: tuple[Word, ...] | list[Word]) -> bool:
    """Whether some run of `_LOOP_WORDS` or more words comes twice in a row (a decoding loop)."""
    texts = [text for word in words if (text := normalise(word.text))]
    for size in range(_LOOP_WORDS, len(texts) // 2 + 1):
        for start in range(len(texts) - 2 * size + 1):
            if texts[start : start + size] == texts[start + size : start + 2 * size]:
                return True
    return False


def build_prompt(client_prompt: str, committed_text: str, limit: int) -> str:
    """The client's prompt, then as much of the newest committed text as fits in `limit` characters.

    Cut at word boundaries; the client's prompt goes first and is only cut when it alone is too long.
    """
    client = _tail_words(client_prompt.strip(), limit)
    room = limit - len(client) - (1 if client else 0)
    recent = _tail_words(committed_text.strip(), room) if room > 0 else ""
    return " ".join(part for part in (client, recent) if part)


def _tail_words(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    tail = text[len(text) - limit :]
    cut = tail.find(" ")
    # Scripts written without spaces are cut between characters.
    return tail[cut + 1 :] if cut >= 0 else tail


class StreamSession:
    """Decides when a stream needs a decode, and turns decodes into partials and finals.

    Partials come from short, frequent decodes of the window since the last commit; words two of them
    agree on become `stable`. The final of an utterance does not inherit their mistakes: it is a decode
    of the whole utterance (of everything after the committed prefix, for one longer than Whisper's
    30 s window), started as soon as the speaker pauses for `final_silence_ms`, so that its cost hides
    behind the rest of the silence that ends the utterance. The final may therefore revise committed
    words, and says so (`revised`).

    Times called `now`/`*_arrival`/`*_wall` are the caller's monotonic clock in seconds; times
    ending in `_s` are positions in the session's audio.
    """

    def __init__(
        self,
        stream: StreamSettings,
        limits: LimitSettings,
        *,
        split_on_silence: bool = True,
        prompt: str = "",
        language: str = "en",
    ) -> None:
        self._stream = stream
        self._limits = limits
        self._split_on_silence = split_on_silence
        self._prompt = prompt
        self._language = language
        # The household's names: a sentence the decoder reads first, and the speller of words heard close to one.
        self._names_prompt = ""
        self._speller: NameSpeller | None = None
        # Finals of earlier utterances: the context the partial decodes condition on across short pauses.
        self._history = ""
        self._vad = VadGate(stream.vad_aggressiveness, stream.silence_ms)
        self._buffer = bytearray()
        self._buffer_start_s = 0.0
        self.stream_s = 0.0
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=_MAX_ARRIVALS)
        self._utterances_emitted = 0
        self._queued_changes: list[VadChange] = []
        self._pending_end: _PendingEnd | None = None
        # At most one partial and one whole-utterance decode out at a time; they may run side by side.
        self._partial_in_flight = False
        self._final_in_flight = False
        # Model time of the newest partial decode: partial decodes get no more than their share of the CPU.
        self._partial_asr_s = 0.0
        self._reset_utterance(None)

    def _reset_utterance(self, start_s: float | None) -> None:
        self._utterance_start_s = start_s
        self._window_start_s = start_s or 0.0
        self._agreement = LocalAgreement()
        self._last_request_end_s = start_s or 0.0
        # The end of the newest decode of this utterance: how far back a window must reach not to skip audio.
        self._heard_end_s = start_s or 0.0
        self._latest_asr_ms = 0.0
        self._latest_arrival: float | None = None
        self._end_at_s: float | None = None
        self._end_wall = 0.0
        self._voice_end_s = 0.0
        self._candidate: _Candidate | None = None
        # The last voiced frame the newest whole decode heard (None: none yet, or it failed).
        self._whole_voice_end_s: float | None = None
        # The voiced end whose whole decode failed: not retried until more speech or the end comes.
        self._failed_voice_end_s: float | None = None
        self._last_partial = ("", "")
        self._emitted = False

    @property
    def active(self) -> bool:
        """An utterance is open: speech was heard and its final is not out yet."""
        return self._utterance_start_s is not None

    @property
    def utterance(self) -> int:
        """The number of the current (or next) utterance, from 1."""
        return self._utterances_emitted + 1

    @property
    def ending(self) -> bool:
        """The current utterance has ended and waits for its final."""
        return self._end_at_s is not None

    @property
    def undecoded_s(self) -> float:
        """Seconds of the open utterance's audio (and of what came after its end) that no decode has reached:
        how far the decoding lags behind the client."""
        if not self.active:
            return 0.0
        return self.stream_s - self._last_request_end_s

    @property
    def in_flight(self) -> bool:
        """A decode request is out and its result not applied yet."""
        return self._partial_in_flight or self._final_in_flight

    def set_prompt(self, prompt: str) -> None:
        """The client's text that comes before this stream's speech, passed to the decoder first."""
        self._prompt = prompt

    def set_language(self, language: str) -> None:
        """The language later decodes ask for."""
        self._language = language

    def set_names(self, names_prompt: str, speller: NameSpeller | None) -> None:
        """The household's names for later decodes: the prompt sentence naming them and their speller."""
        self._names_prompt = names_prompt
        self._speller = speller

    def push(self, pcm: bytes, now: float) -> list[Event]:
        """Take s16le mono 16 kHz audio of any even length; may complete a final at once."""
        self._buffer += pcm
        self.stream_s += len(pcm) / BYTES_PER_SECOND
        self._arrivals.append((self.stream_s, now))
        for change in self._vad.push(pcm):
            self._on_vad(change)
        if self.active and not self.ending:
            assert self._utterance_start_s is not None
            if self.stream_s - self._utterance_start_s >= self._limits.max_utterance_s:
                self._end_at_s = self._voice_end_s = self.stream_s
                self._end_wall = now
        if not self.active:
            # The VAD reports a start a few frames after it: keep those frames as well as the preroll.
            self._drop_before(self.stream_s - self._stream.preroll_ms / 1000 - START_LOOKBACK_S)
        return self._final_if_ready(now)

    def _on_vad(self, change: VadChange) -> None:
        if self.ending:
            # Speech that comes while a final is pending belongs to the next utterance.
            self._queued_changes.append(change)
        elif change.speaking and not self.active:
            self._reset_utterance(max(self._buffer_start_s, change.at_s - self._stream.preroll_ms / 1000))
        elif not change.speaking and self.active and self._split_on_silence:
            self._end_at_s = change.detected_s
            self._voice_end_s = change.at_s
            self._end_wall = self._arrival_of(change.at_s)

    def end_of_audio(self, now: float) -> list[Event]:
        """The client ended the audio: the open utterance, if any, gets its final."""
        if self.active and not self.ending:
            self._end_at_s = self.stream_s
            self._voice_end_s = self._vad.last_voice_end_s
            self._end_wall = now
        elif self.ending:
            self._pending_end = _PendingEnd(
                self.stream_s, self._vad.last_voice_end_s, now, len(self._queued_changes), self._vad.speaking
            )
        # What follows the end signal is a new request: speech must start afresh.
        self._vad.reset()
        return self._final_if_ready(now)

    def wants_decode(self) -> bool:
        """Whether a decode would bring something new now."""
        return self._next_kind() is not None

    def wants_final_decode(self) -> bool:
        """Whether a final waits for the decode this session wants now: the whole decode of the utterance, or a
        decode through audio no decode has heard yet that must come before it (see `_catch_up_end_s`)."""
        return self._next_kind() in ("final", "catch_up")

    def _voice_end(self) -> float:
        """The end of the last voiced frame of the open utterance."""
        return self._voice_end_s if self.ending else self._vad.last_voice_end_s

    def _pause_end_s(self) -> float:
        """`final_silence_ms` after the last voiced frame: where a whole decode of the utterance ends, when the
        audio reaches that far."""
        return self._voice_end() + self._stream.final_silence_ms / 1000

    def _final_end_s(self) -> float:
        """Where a whole decode of the utterance ends: `final_silence_ms` after its last voiced frame, or the end of
        the audio before that."""
        limit_s = self._end_at_s if self._end_at_s is not None else self.stream_s
        return min(limit_s, self._pause_end_s())

    def _whole_from_start(self, end_s: float) -> bool:
        """Whether a whole decode ending at `end_s` hears the utterance from its start."""
        assert self._utterance_start_s is not None
        return end_s - self._utterance_start_s <= WHOLE_DECODE_MAX_S

    def _catch_up_end_s(self, end_s: float) -> float | None:
        """Where a decode must stop short of `end_s`, or None: a window of `max_window_s` ending at `end_s`
        would start after audio no decode has heard yet (it came faster than it was decoded: an upload, a
        CPU far behind), so the decodes work through it half a window at a time instead of skipping it."""
        reach_s = self._heard_end_s + self._stream.max_window_s / 2
        if end_s - self._window_start_s <= self._stream.max_window_s or end_s <= reach_s:
            return None
        return reach_s

    def _next_kind(self) -> str | None:
        if not self.active:
            return None
        if not self._final_in_flight and self._wants_whole_decode():
            final_end_s = self._final_end_s()
            if self._whole_from_start(final_end_s) or self._catch_up_end_s(final_end_s) is None:
                return "final"
            # Even once the utterance has ended, the audio it skipped comes first.
            return None if self._partial_in_flight else "catch_up"
        if self._partial_in_flight or self.ending:
            return None
        assert self._utterance_start_s is not None
        if self.stream_s - self._utterance_start_s < self._stream.min_window_s:
            return None
        # Partials are for display: when the CPU is slow, they come less often rather than fall behind.
        cycle_s = max(self._stream.cycle_ms / 1000, self._partial_asr_s / _PARTIAL_CPU_SHARE)
        if self.stream_s - self._last_request_end_s < cycle_s:
            return None
        # No new speech since the last decode: another one could not change a word.
        if self._vad.last_voice_end_s + COVER_MARGIN_S <= self._last_request_end_s:
            return None
        # Nor since a whole decode started: it hears the utterance to its end, even after a pause shorter than that.
        if self._whole_voice_end_s is not None and self._vad.last_voice_end_s <= self._whole_voice_end_s:
            return None
        return "partial"

    def _wants_whole_decode(self) -> bool:
        voice_end = self._voice_end()
        if self._candidate is not None and self._candidate.voice_end_s >= voice_end:
            return False
        if self.ending:
            return True
        if self._failed_voice_end_s == voice_end:
            return False
        # The speaker paused: this may be the end of the utterance, so decode all of it now.
        return self.stream_s - voice_end >= self._stream.final_silence_ms / 1000

    def next_request(self) -> DecodeRequest:
        """The decode this session wants now (see `wants_decode`).

        A whole decode covers the utterance from its start (or from its committed prefix, when longer
        than Whisper's window, WHOLE_DECODE_MAX_S) to `final_silence_ms` after its last voiced frame; its
        prompt is the client's prompt and that prefix only, so the history of earlier utterances cannot add
        words to a final.
        A partial decode covers at most `max_window_s` up to the newest audio, with the history in its prompt.
        """
        assert self._utterance_start_s is not None
        final = self._next_kind() == "final"
        voice_end_s = self._voice_end()
        if final:
            end_s = self._final_end_s()
        else:
            end_s = self._end_at_s if self._end_at_s is not None else self.stream_s
            end_s = self._catch_up_end_s(end_s) or end_s
        if final and self._whole_from_start(end_s):
            start_s = self._utterance_start_s
        else:
            self._bound_window(end_s)
            start_s = self._window_start_s
        prefix = [w for w in self._agreement.committed if w.end <= start_s + _SAME_TIME_S]
        context = join_words(prefix) if final else f"{self._history} {join_words(prefix)}"
        if final:
            self._final_in_flight = True
            self._whole_voice_end_s = voice_end_s
        else:
            self._partial_in_flight = True
        self._last_request_end_s = max(self._last_request_end_s, end_s)
        plain_prompt = build_prompt(self._prompt, context, self._stream.prompt_chars)
        pcm = self._slice(start_s, end_s)
        if final:
            tail_end_s = voice_end_s + max(self._stream.final_silence_ms / 1000, FINAL_TAIL_S)
            pcm += bytes(max(0, seconds_to_bytes(tail_end_s - end_s)))
        return DecodeRequest(
            audio=pcm16_to_float(pcm),
            start_s=start_s,
            end_s=end_s,
            prompt=" ".join(part for part in (self._names_prompt, plain_prompt) if part),
            language=self._language,
            final=final,
            newest_arrival=self._arrival_of(end_s),
            utterance_start_s=self._utterance_start_s,
            voice_end_s=voice_end_s,
            # A final is decoded without the names first; names replace only words it was unsure of (see `decode`).
            names=NamesInPrompt(plain_prompt, self._speller)
            if final and self._names_prompt and self._speller
            else None,
        )

    def apply(self, request: DecodeRequest, transcript: Transcript, now: float) -> list[Event]:
        """Take what a decode found (word times relative to the window) and emit what changed."""
        if request.final:
            self._final_in_flight = False
        else:
            self._partial_in_flight = False
            self._partial_asr_s = transcript.asr_ms / 1000
        if request.utterance_start_s != self._utterance_start_s:
            return []
        self._heard_end_s = max(self._heard_end_s, request.end_s)
        spell = self._speller.spell if self._speller else str
        words = [Word(w.start + request.start_s, w.end + request.start_s, spell(w.text)) for w in transcript.words]
        # A decode Whisper marks as looping, or that repeats itself, heard nothing worth showing.
        trusted = not transcript.hallucinated and not repeats_itself(words)
        if request.final:
            # Whisper invents words in silence; the VAD heard none after the voice ended.
            heard = tuple(w for w in words if w.start <= request.voice_end_s + SILENT_WORD_TOLERANCE_S)
            self._candidate = _Candidate(
                words=heard,
                window_start_s=request.start_s,
                voice_end_s=request.voice_end_s,
                asr_ms=transcript.asr_ms,
                arrival=request.newest_arrival,
                trusted=trusted,
            )
            if self.ending and self._candidate.voice_end_s >= self._voice_end():
                return self._emit_final(now)
            words = list(heard)
        if not trusted:
            if request.final:
                self._whole_voice_end_s = None  # the partials' path stands in: it may still need their decodes
            return self._final_if_ready(now)
        # A trusted decode of either kind is the newest hypothesis of the partial stream.
        return self._update_partial(request, words, transcript.asr_ms, now) + self._final_if_ready(now)

    def _update_partial(self, request: DecodeRequest, words: list[Word], asr_ms: float, now: float) -> list[Event]:
        self._agreement.update(words, horizon_s=request.end_s - self._stream.commit_margin_ms / 1000)
        self._latest_asr_ms = asr_ms
        self._latest_arrival = request.newest_arrival
        text = join_words(self._agreement.committed + self._agreement.tentative)
        stable = join_words(self._agreement.committed)
        if (text, stable) == self._last_partial:
            return []
        self._last_partial = (text, stable)
        self._emitted = True
        return [
            Partial(
                text=text,
                stable=stable,
                utterance=self.utterance,
                asr_ms=round(asr_ms),
                e2e_ms=round((now - request.newest_arrival) * 1000),
            )
        ]

    def _final_if_ready(self, now: float) -> list[Event]:
        """The utterance has ended and a whole decode already heard every voiced frame: its final is out."""
        if not self.ending or self._candidate is None or self._candidate.voice_end_s < self._voice_end():
            return []
        return self._emit_final(now)

    def decode_failed(self, request: DecodeRequest, now: float) -> list[Event]:
        """A decode raised. A failed whole decode is not retried for the same speech; once the utterance
        has ended, its final goes out with what the partial decodes heard."""
        if request.final:
            self._final_in_flight = False
        else:
            self._partial_in_flight = False
        if request.utterance_start_s != self._utterance_start_s or not request.final:
            return []
        self._whole_voice_end_s = None  # the partials' path stands in: it may still need their decodes
        if not self.ending:
            self._failed_voice_end_s = request.voice_end_s
            return []
        return self._emit_final(now)

    def _final_words(self) -> tuple[list[Word], float, float]:
        """The final's words, and the model time and newest arrival of the decode they come from.

        A trusted whole decode gives every word after the committed prefix. Otherwise (it failed, or
        Whisper's own signals say it invented or repeated text) the partials' path stands in: committed
        words and the newest trusted hypothesis, without words after the voice ended. An untrusted decode's
        words never become a final: they were not heard but made up (a prompt echoed over noise).
        """
        candidate = self._candidate
        committed = list(self._agreement.committed)
        fallback = committed + [
            w for w in self._agreement.tentative if w.start <= self._voice_end_s + SILENT_WORD_TOLERANCE_S
        ]
        latest = (self._latest_asr_ms, self._latest_arrival or 0.0)
        if candidate is None:
            return fallback, *latest
        if candidate.trusted:
            prefix = [w for w in committed if w.end <= candidate.window_start_s + _SAME_TIME_S]
            return prefix + strip_committed(prefix, candidate.words), candidate.asr_ms, candidate.arrival
        return fallback, *latest

    def _emit_final(self, now: float) -> list[Event]:
        assert self._utterance_start_s is not None
        assert self._end_at_s is not None
        words, asr_ms, arrival = self._final_words()
        text = join_words(words)
        events: list[Event] = []
        # A client that saw partials gets a final even when it is empty, so it can clear them.
        if text or self._emitted:
            events.append(
                Final(
                    text=text,
                    utterance=self.utterance,
                    asr_ms=round(asr_ms),
                    e2e_ms=round((now - (arrival or now)) * 1000),
                    ttct_ms=round((now - self._end_wall) * 1000),
                    start=self._utterance_start_s,
                    end=self._end_at_s,
                    revised=words_after(text, self._last_partial[1]) is None,
                )
            )
            self._utterances_emitted += 1
        if text:
            self._history = _tail_words(f"{self._history} {text}".strip(), self._stream.prompt_chars)
        end_s = self._end_at_s
        # Audio up to the end belongs to this utterance; the next one starts no earlier.
        self._drop_before(end_s)
        queued, self._queued_changes = self._queued_changes, []
        pending, self._pending_end = self._pending_end, None
        # Forced ends (max_utterance_s) cut running speech: the rest is the next utterance.
        self._reset_utterance(max(end_s, self._buffer_start_s) if self._vad.speaking and not queued else None)
        before_end = queued if pending is None else queued[: pending.queued_changes]
        for change in before_end:
            self._on_vad(change)
        if pending is not None:
            self._end_pending(pending, max(end_s, self._buffer_start_s))
        # Changes after that end are queued again: they belong to the utterance after it.
        for change in queued[len(before_end) :]:
            self._on_vad(change)
        return events

    def _end_pending(self, pending: _PendingEnd, start_s: float) -> None:
        """End the speech that came between the last final's end and an end of audio that came meanwhile."""
        if not self.active and pending.speaking:
            self._reset_utterance(start_s)
        if self.active and not self.ending:
            self._end_at_s = pending.stream_s
            self._voice_end_s = pending.voice_end_s
            self._end_wall = pending.wall

    def _bound_window(self, end_s: float) -> None:
        """Keep the window under max_window_s by trimming at committed word boundaries."""
        overlap = self._stream.overlap_ms / 1000
        limit = self._stream.max_window_s
        if end_s - self._window_start_s <= limit:
            return
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
        self._drop_before(min(self._window_start_s, end_s - WHOLE_DECODE_MAX_S))

    def _slice(self, start_s: float, end_s: float) -> bytes:
        first = max(0, seconds_to_bytes(start_s - self._buffer_start_s))
        last = max(first, seconds_to_bytes(end_s - self._buffer_start_s))
        return bytes(self._buffer[first:last])

    def _drop_before(self, time_s: float) -> None:
        cut = seconds_to_bytes(time_s - self._buffer_start_s)
        if cut <= 0:
            return
        cut = min(cut, len(self._buffer) - len(self._buffer) % SAMPLE_WIDTH)
        del self._buffer[:cut]
        self._buffer_start_s += cut / BYTES_PER_SECOND

    def _arrival_of(self, time_s: float) -> float:
        """When the audio at that position reached the server."""
        for stream_end_s, arrived in self._arrivals:
            if stream_end_s >= time_s - 1e-6:
                return arrived
        return self._arrivals[-1][1] if self._arrivals else 0.0
