"""One stream's state machine: its audio buffer, utterances and decode policy composed, decodes turned into events."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .agreement import join_words, normalise, strip_committed
from .audio import FloatAudio, pcm16_to_float, seconds_to_bytes
from .config import AUTO_LANGUAGE, LimitSettings, StreamSettings
from .decode_policy import DecodePolicy, FinalCandidate
from .endpointing import EndpointRules, Verdict
from .events import Done, Event, Final, Partial, words_after
from .stream_audio import AudioBuffer
from .transcript import Word
from .utterance import UtteranceTracker
from .vocabulary import NamesInPrompt, NameSpeller

if TYPE_CHECKING:
    from .transcript import Transcript

_LOGGER = logging.getLogger(__name__)

# A word that starts this long after the last voiced frame was not heard but made up.
SILENT_WORD_TOLERANCE_S = 0.3
# A run of this many words said twice in a row is a decoding loop, not speech.
_LOOP_WORDS = 4


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
    # A whole decode the endpointer reads, when a sure command ends sooner: the decoder's end probability too.
    judge_end: bool = False


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

    The audio is kept by an `AudioBuffer`, the utterances found in it by an `UtteranceTracker`, and what to
    decode when by a `DecodePolicy`; this class composes them and makes the events.
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
        endpoint_rules: EndpointRules | None = None,
        partials: bool = True,
    ) -> None:
        self._stream = stream
        self._endpoint_rules = endpoint_rules
        self._prompt = prompt
        self._language = language
        # The household's names: a sentence the decoder reads first, and the speller of words heard close to one.
        self._names_prompt = ""
        self._speller: NameSpeller | None = None
        # Finals of earlier utterances: the context the partial decodes condition on across short pauses.
        self._history = ""
        self._audio = AudioBuffer()
        self._utterance = UtteranceTracker(
            stream, limits, self._audio, split_on_silence=split_on_silence, endpoint_rules=endpoint_rules
        )
        self._policy = DecodePolicy(stream, partials=partials)
        self._utterances_emitted = 0
        self._start_decoding()

    def _start_decoding(self) -> None:
        """Decode the utterance the tracker has open (if any) afresh: nothing of the one before carries over."""
        self._policy.reset(self._utterance.start_s)
        # The language the newest trusted decode of this utterance heard it in (a session in AUTO_LANGUAGE).
        self._heard_language = ""
        # The newest trusted hypothesis's model time and newest audio arrival: the final's when it stands in.
        self._latest_asr_ms = 0.0
        self._latest_arrival: float | None = None
        # What the client saw last (text, stable): an unchanged partial is not sent again, and a final that drops
        # stable words is `revised`; once a partial went out, the final is sent even when empty.
        self._last_partial = ("", "")
        self._emitted = False

    @property
    def stream_s(self) -> float:
        """Seconds of audio the stream has had so far."""
        return self._audio.end_s

    @property
    def active(self) -> bool:
        """An utterance is open: speech was heard and its final is not out yet."""
        return self._utterance.active

    @property
    def utterance(self) -> int:
        """The number of the current (or next) utterance, from 1."""
        return self._utterances_emitted + 1

    @property
    def ending(self) -> bool:
        """The current utterance has ended and waits for its final."""
        return self._utterance.ending

    @property
    def finished(self) -> bool:
        """The endpointer ended the request (its `Done` is out, or follows its final): later audio is not heard."""
        return self._utterance.finished

    @property
    def undecoded_s(self) -> float:
        """Seconds of the open utterance's audio (and of what came after its end) that no decode has reached:
        how far the decoding lags behind the client."""
        return self._policy.undecoded_s(self._utterance.state())

    @property
    def in_flight(self) -> bool:
        """A decode request is out and its result not applied yet."""
        return self._policy.in_flight

    def set_prompt(self, prompt: str) -> None:
        """The client's text that comes before this stream's speech, passed to the decoder first."""
        self._prompt = prompt

    def set_language(self, language: str) -> None:
        """The language later decodes ask for."""
        self._language = language

    def set_partials(self, wanted: bool) -> None:
        """Whether something reads partials from now on: without a reader, none is decoded or made."""
        self._policy.set_partials(wanted)

    def set_names(self, names_prompt: str, speller: NameSpeller | None) -> None:
        """The household's names for later decodes: the prompt sentence naming them and their speller."""
        self._names_prompt = names_prompt
        self._speller = speller

    def push(self, pcm: bytes, now: float) -> list[Event]:
        """Take s16le mono 16 kHz audio of any even length; may complete a final at once."""
        self._audio.append(pcm, now)
        if self._utterance.push(pcm, now):
            self._start_decoding()
        if not self.active:
            # The VAD reports a start a few frames after it: keep those frames as well as the preroll.
            self._audio.drop_before(self.stream_s - self._stream.preroll_ms / 1000 - self._utterance.start_lookback_s)
        return self._final_if_ready(now) + self._endpoint(now)

    def end_of_audio(self, now: float) -> list[Event]:
        """The client ended the audio: the open utterance, if any, gets its final."""
        self._utterance.end_of_audio(now)
        return self._final_if_ready(now)

    def wants_decode(self) -> bool:
        """Whether a decode would bring something new now."""
        return self._policy.next_kind(self._utterance.state()) is not None

    def wants_final_decode(self) -> bool:
        """Whether a final waits for the decode this session wants now: the whole decode of the utterance, or a
        decode through audio no decode has heard yet that must come before it."""
        return self._policy.next_kind(self._utterance.state()) in ("final", "catch_up")

    def next_request(self) -> DecodeRequest:
        """The decode this session wants now (see `wants_decode` and `DecodePolicy`).

        A whole decode's prompt is the client's prompt and the committed prefix before its window only, so the
        history of earlier utterances cannot add words to a final; a partial's has the history too.
        """
        start = self._utterance.start_s
        assert start is not None
        window = self._policy.plan(self._utterance.state())
        if window.drop_before_s is not None:
            self._audio.drop_before(window.drop_before_s)
        prefix = join_words(window.prefix)
        context = prefix if window.final else f"{self._history} {prefix}"
        plain_prompt = build_prompt(self._prompt, context, self._stream.prompt_chars)
        pcm = self._audio.slice(window.start_s, window.end_s)
        if window.final:
            # Whisper ends its last segment on silence; without enough of it, it leaves the last words to a later
            # pass of their own, which may drop them. Where the pause that started this decode was shorter than the
            # VAD's tail, or the audio stopped with the voice, digital silence makes up the rest.
            tail_end_s = window.voice_end_s + max(self._stream.final_silence_ms / 1000, self._utterance.final_tail_s)
            pcm += bytes(max(0, seconds_to_bytes(tail_end_s - window.end_s)))
        # A whole decode hears the language in all of the utterance so far; a partial keeps the one heard last.
        auto = self._language == AUTO_LANGUAGE
        language = self._heard_language if auto and not window.final and self._heard_language else self._language
        return DecodeRequest(
            audio=pcm16_to_float(pcm),
            start_s=window.start_s,
            end_s=window.end_s,
            prompt=" ".join(part for part in (self._names_prompt, plain_prompt) if part),
            language=language,
            final=window.final,
            newest_arrival=self._audio.arrival_of(window.end_s),
            utterance_start_s=start,
            voice_end_s=window.voice_end_s,
            # A final is decoded without the names first; names replace only words it was unsure of (see `decode`).
            names=NamesInPrompt(plain_prompt, self._speller)
            if window.final and self._names_prompt and self._speller
            else None,
            judge_end=window.final and self._endpoint_rules is not None and self._endpoint_rules.judges_end,
        )

    def apply(self, request: DecodeRequest, transcript: Transcript, now: float) -> list[Event]:
        """Take what a decode found (word times relative to the window) and emit what changed."""
        self._policy.returned(request.final, transcript.asr_ms)
        if request.utterance_start_s != self._utterance.start_s:
            return []
        self._policy.heard(request.end_s)
        spell = self._speller.spell if self._speller else str
        words = [Word(w.start + request.start_s, w.end + request.start_s, spell(w.text)) for w in transcript.words]
        # A decode Whisper marks as looping, or that repeats itself, heard nothing worth showing.
        trusted = not transcript.hallucinated and not repeats_itself(words)
        if trusted and transcript.language and self._language == AUTO_LANGUAGE:
            self._heard_language = transcript.language
        if request.final:
            # Whisper invents words in silence; the VAD heard none after the voice ended.
            heard = tuple(w for w in words if w.start <= request.voice_end_s + SILENT_WORD_TOLERANCE_S)
            candidate = FinalCandidate(
                words=heard,
                window_start_s=request.start_s,
                voice_end_s=request.voice_end_s,
                asr_ms=transcript.asr_ms,
                arrival=request.newest_arrival,
                trusted=trusted,
                language=transcript.language,
                end_cues=transcript.end_cues,
            )
            self._policy.take_whole(candidate)
            if self.ending and self._policy.heard_whole(self._utterance.state()):
                return self._emit_final(now)
            words = list(heard)
        if not trusted:
            if request.final:
                self._policy.whole_unusable()
            return self._final_if_ready(now) + self._endpoint(now)
        # A trusted decode of either kind is the newest hypothesis of the partial stream.
        events = self._update_partial(request, words, transcript.asr_ms, now) + self._final_if_ready(now)
        return events + self._endpoint(now)

    def _endpoint(self, now: float) -> list[Event]:
        """With endpoint rules, end the request where they say; `Done` follows its final at once, or when the final
        still needs its whole decode, once that is out."""
        rules = self._endpoint_rules
        if rules is None:
            return []
        verdicts: list[Verdict] = []

        def verdict() -> Verdict:
            verdicts.append(self._verdict(rules))
            return verdicts[-1]

        reason = self._utterance.endpoint(verdict, now)
        if reason is None:
            return []
        candidate = self._policy.candidate
        _LOGGER.debug(
            "Ended the command (%s): the decode said %s (%s) of %r",
            reason.value,
            verdicts[-1].value if verdicts else "nothing yet",
            candidate.end_cues if candidate else None,
            join_words(candidate.words) if candidate else "",
        )
        if self.active:
            return self._final_if_ready(now)
        return [Done(self.utterance - 1)]

    def _verdict(self, rules: EndpointRules) -> Verdict:
        """What the newest trusted whole decode that heard all the speech says of the command."""
        if not self.active:
            return Verdict.UNDECODED if self._utterances_emitted else Verdict.NOTHING
        words = self._policy.whole_words(self._utterance.voice_end_s)
        if words is None:
            return Verdict.UNDECODED
        candidate = self._policy.candidate
        return rules.verdict(words, self._language, candidate.end_cues if candidate else None)

    def _update_partial(self, request: DecodeRequest, words: list[Word], asr_ms: float, now: float) -> list[Event]:
        self._policy.take_hypothesis(words, request.end_s)
        self._latest_asr_ms = asr_ms
        self._latest_arrival = request.newest_arrival
        text = join_words(self._policy.committed + self._policy.tentative)
        stable = join_words(self._policy.committed)
        if not self._policy.partials or (text, stable) == self._last_partial:
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
        if not self.ending or not self._policy.heard_whole(self._utterance.state()):
            return []
        return self._emit_final(now)

    def decode_failed(self, request: DecodeRequest, now: float) -> list[Event]:
        """A decode raised. A failed whole decode is not retried for the same speech; once the utterance
        has ended, its final goes out with what the partial decodes heard."""
        self._policy.returned(request.final, None)
        if request.utterance_start_s != self._utterance.start_s or not request.final:
            return []
        if not self.ending:
            self._policy.whole_failed(request.voice_end_s)
            return []
        return self._emit_final(now)

    def _final_words(self) -> tuple[list[Word], float, float]:
        """The final's words, and the model time and newest arrival of the decode they come from.

        A trusted whole decode gives every word after the committed prefix. Otherwise (it failed, or
        Whisper's own signals say it invented or repeated text) the partials' path stands in: committed
        words and the newest trusted hypothesis, without words after the voice ended. An untrusted decode's
        words never become a final: they were not heard but made up (a prompt echoed over noise).
        """
        candidate = self._policy.candidate
        if candidate is not None and candidate.trusted:
            prefix = self._policy.committed_before(candidate.window_start_s)
            return prefix + strip_committed(prefix, candidate.words), candidate.asr_ms, candidate.arrival
        voice_end_s = self._utterance.voice_end_s
        tentative = [w for w in self._policy.tentative if w.start <= voice_end_s + SILENT_WORD_TOLERANCE_S]
        # An utterance split at a pause ends before words the partials heard after it: they are the next one's.
        end_s = self._utterance.state().audio_end_s
        words = [w for w in (*self._policy.committed, *tentative) if w.start < end_s]
        return words, self._latest_asr_ms, self._latest_arrival or 0.0

    def _final_language(self) -> str:
        """The language of the final: the session's, or, detecting, the one its whole decode (else the newest
        decode) heard."""
        if self._language != AUTO_LANGUAGE:
            return self._language
        candidate = self._policy.candidate
        if candidate is not None and candidate.trusted and candidate.language:
            return candidate.language
        return self._heard_language or self._language

    def _emit_final(self, now: float) -> list[Event]:
        start_s, end_s = self._utterance.start_s, self._utterance.end_s
        assert start_s is not None
        assert end_s is not None
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
                    ttct_ms=round((now - self._utterance.end_wall) * 1000),
                    start=start_s,
                    end=end_s,
                    revised=words_after(text, self._last_partial[1]) is None,
                    language=self._final_language(),
                )
            )
            self._utterances_emitted += 1
        if text:
            self._history = _tail_words(f"{self._history} {text}".strip(), self._stream.prompt_chars)
        # Audio up to the end belongs to this utterance; the next one starts no earlier.
        self._audio.drop_before(end_s)
        self._utterance.close()
        self._start_decoding()
        if self.finished:
            events.append(Done(self.utterance - 1))
        return events
