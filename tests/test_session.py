"""Unit tests for the StreamSession state machine, driven by real speech and a scripted fake transcriber."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import pytest
import webrtcvad

from edge_asr.audio import pcm16_to_float
from edge_asr.config import LimitSettings, StreamSettings
from edge_asr.decode_policy import WHOLE_DECODE_MAX_S
from edge_asr.events import Event, Final, Partial
from edge_asr.session import DecodeRequest, StreamSession
from edge_asr.transcript import EndCues, Transcript, Word
from edge_asr.vad import WEBRTC_FRAME_BYTES as FRAME_BYTES
from edge_asr.vad import VadGate

from .speech import BYTES_PER_S, RATE, read_pcm, reference, silence, voiced

pytestmark = pytest.mark.fast

CHUNK_BYTES = 640  # 20 ms
CHUNK_S = CHUNK_BYTES / BYTES_PER_S
ASR_S = 0.012  # what the fake model "takes": the fake clock moves on by this much per decode

Script = list[tuple[str, float, float]]


def voiced_span(pcm: bytes) -> tuple[float, float]:
    """Start of the first and end of the last 30 ms frame webrtcvad calls speech, in seconds of pcm."""
    vad = webrtcvad.Vad(2)
    flags = [vad.is_speech(pcm[i : i + FRAME_BYTES], RATE) for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]
    first = flags.index(True)
    last = len(flags) - flags[::-1].index(True)
    return first * 0.03, last * 0.03


@dataclass
class Audio:
    """A session's input built piece by piece, with the words each spoken piece holds."""

    pcm: bytes = b""
    script: Script = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def pause(self, seconds: float) -> Audio:
        self.pcm += silence(seconds)
        return self

    def say(self, name: str) -> Audio:
        """Append a speech file; spread its reference words over its voiced span."""
        speech = read_pcm(name)
        offset = len(self.pcm) / BYTES_PER_S
        first, last = voiced_span(speech)
        tokens = reference(name).split()
        step = (last - first) / len(tokens)
        for index, token in enumerate(tokens):
            start = offset + first + index * step
            self.script.append((token, start, start + step * 0.85))
        self.texts.append(reference(name))
        self.pcm += speech
        return self

    def hum(self, until_s: float) -> Audio:
        """Append a sustained vowel until the stream reaches `until_s`, with a word of its own in each half second."""
        offset = self.seconds
        count = round((until_s - offset) / 0.5)
        words = [f"w{len(self.script) + index}" for index in range(count)]
        self.script += [(word, offset + index * 0.5, offset + index * 0.5 + 0.4) for index, word in enumerate(words)]
        self.texts.append(" ".join(words))
        self.pcm += voiced(until_s - offset)
        return self

    @property
    def seconds(self) -> float:
        return len(self.pcm) / BYTES_PER_S


def scripted_words(script: Script, request: DecodeRequest, *, cut_words: bool = True) -> tuple[Word, ...]:
    """The fake transcriber: the scripted words heard by the request's window, times relative to its start.

    A word that ends inside the window is heard whole. A word still going on at the window's end is,
    with `cut_words`, misheard as a fragment that differs between passes (it must not be committed).
    """
    heard: list[Word] = []
    for text, start, end in script:
        if end <= request.start_s or start >= request.end_s:
            continue
        relative_start = max(0.0, start - request.start_s)
        if end <= request.end_s:
            heard.append(Word(relative_start, end - request.start_s, f" {text}"))
        elif cut_words:
            fragment = text[: max(1, len(text) // 2)] + str(round(request.end_s * 1000))
            heard.append(Word(relative_start, request.end_s - request.start_s, f" {fragment}"))
    return tuple(heard)


@dataclass(frozen=True)
class Emitted:
    """An event, which call returned it, and the fake clock and stream position then."""

    source: str
    event: Event
    now: float
    stream_s: float


@dataclass
class Driver:
    """Feeds a session 20 ms chunks on a fake clock and serves its decodes with the fake transcriber."""

    session: StreamSession
    script: Script
    final_silence_s: float  # the session's stream.final_silence_ms, in seconds
    final_tail_s: float  # the digital silence its VAD's finals end on at least
    cut_words: bool = True
    auto_decode: bool = True
    # What the transcriber gives as the cues of the end, to a decode that asks for them.
    end_cues: EndCues | None = None
    now: float = 1000.0
    fed: bytes = b""
    log: list[Emitted] = field(default_factory=list)
    requests: list[DecodeRequest] = field(default_factory=list)
    arrivals: list[tuple[float, float]] = field(default_factory=list)

    @property
    def events(self) -> list[Event]:
        return [emitted.event for emitted in self.log]

    def record(self, source: str, events: list[Event]) -> None:
        self.log += [Emitted(source, event, self.now, self.session.stream_s) for event in events]

    def arrival_of(self, stream_s: float) -> float:
        """When the chunk holding the audio at that position was pushed."""
        return next(now for end_s, now in self.arrivals if end_s >= stream_s - 1e-9)

    def feed(self, pcm: bytes) -> None:
        for offset in range(0, len(pcm), CHUNK_BYTES):
            self.push(pcm[offset : offset + CHUNK_BYTES])

    def push(self, chunk: bytes) -> list[Event]:
        self.now += len(chunk) / BYTES_PER_S
        self.fed += chunk
        events = self.session.push(chunk, self.now)
        self.arrivals.append((self.session.stream_s, self.now))
        self.record("push", events)
        if self.auto_decode:
            self.serve()
        return events

    def feed_until(self, stream_s: float, pcm: bytes) -> None:
        """Feed pcm (the whole input) from where feeding stopped until the stream reaches stream_s."""
        while self.session.stream_s < stream_s - 1e-9:
            start = len(self.fed)
            assert start < len(pcm), "ran out of audio"
            self.push(pcm[start : start + CHUNK_BYTES])

    def request(self) -> DecodeRequest:
        request = self.session.next_request()
        self.requests.append(request)
        check_window(request, self.fed, self.final_silence_s, self.final_tail_s)
        return request

    def apply(
        self,
        request: DecodeRequest,
        words: tuple[Word, ...] | None = None,
        hallucinated: bool = False,
        asr_s: float = ASR_S,
    ) -> list[Event]:
        self.now += asr_s
        if words is None:
            words = scripted_words(self.script, request, cut_words=self.cut_words)
        transcript = Transcript(
            words,
            asr_s * 1000,
            hallucinated=hallucinated,
            end_cues=self.end_cues if request.judge_end else None,
        )
        events = self.session.apply(request, transcript, self.now)
        self.record("apply", events)
        return events

    def serve(self) -> None:
        for _ in range(10):
            if not self.session.wants_decode():
                return
            self.apply(self.request())
        raise AssertionError("the session keeps wanting decodes")

    def end(self) -> list[Event]:
        events = self.session.end_of_audio(self.now)
        self.record("end", events)
        if self.auto_decode:
            self.serve()
        return events

    def finals(self) -> list[Final]:
        return [event for event in self.events if isinstance(event, Final)]

    def partials(self) -> list[Partial]:
        return [event for event in self.events if isinstance(event, Partial)]


def check_window(request: DecodeRequest, fed: bytes, final_silence_s: float, final_tail_s: float) -> None:
    """The request's audio is exactly the stream's audio from start_s to end_s, and for a final that stops before
    `final_silence_s` (or the VAD's `final_tail_s`, the longer) after the voice, digital silence up to there."""
    first = round(request.start_s * RATE) * 2
    last = round(request.end_s * RATE) * 2
    assert 0 <= request.start_s < request.end_s <= len(fed) / BYTES_PER_S + 1e-9
    assert request.audio.dtype == np.float32
    heard = pcm16_to_float(fed[first:last])
    assert np.array_equal(request.audio[: len(heard)], heard)
    padding = request.audio[len(heard) :]
    short_s = request.voice_end_s + max(final_silence_s, final_tail_s) - request.end_s
    assert len(padding) == (max(0, round(short_s * RATE)) if request.final else 0)
    assert not padding.any()


def make_driver(
    script: Script,
    *,
    stream: StreamSettings | None = None,
    limits: LimitSettings | None = None,
    split_on_silence: bool = True,
    prompt: str = "",
    cut_words: bool = True,
    auto_decode: bool = True,
) -> Driver:
    stream = stream or StreamSettings()
    session = StreamSession(stream, limits or LimitSettings(), split_on_silence=split_on_silence, prompt=prompt)
    tail_s = VadGate.of(stream).final_tail_s
    return Driver(session, script, stream.final_silence_ms / 1000, tail_s, cut_words=cut_words, auto_decode=auto_decode)


def by_utterance(events: Iterable[Event]) -> dict[int, list[Event]]:
    grouped: dict[int, list[Event]] = {}
    for event in events:
        assert isinstance(event, (Partial, Final))
        grouped.setdefault(event.utterance, []).append(event)
    return grouped


def one_command(lead_s: float = 0.3, trailing_s: float = 1.0, name: str = "cmd_piper_joe_03") -> Audio:
    return Audio().pause(lead_s).say(name).pause(trailing_s)


def last_voiced_end(pcm: bytes) -> float:
    """Where the session's VAD puts the end of the last voiced frame of pcm."""
    gate = VadGate.of(StreamSettings())
    gate.push(pcm)
    return gate.last_voice_end_s


# --- no speech ---------------------------------------------------------------------------------


def test_silence_only_gives_no_events_and_no_decode() -> None:
    driver = make_driver([])
    driver.feed(read_pcm("silence_3s"))
    assert driver.end() == []
    assert driver.events == []
    assert driver.requests == []
    assert not driver.session.active
    assert driver.session.utterance == 1


def test_speech_the_transcriber_finds_empty_gives_no_empty_final() -> None:
    audio = one_command()
    driver = make_driver([])  # the transcriber hears nothing
    driver.feed(audio.pcm)
    driver.end()
    assert driver.requests, "speech must be decoded"
    assert driver.events == []
    assert driver.session.utterance == 1


# --- when to decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("min_window_s", [1.0, 2.0])
def test_no_decode_before_speech_nor_before_min_window(min_window_s: float) -> None:
    audio = one_command(lead_s=0.6)
    driver = make_driver(audio.script, stream=StreamSettings(min_window_s=min_window_s), auto_decode=False)
    first_request: DecodeRequest | None = None
    while first_request is None:
        was_active = driver.session.active
        driver.feed_until(driver.session.stream_s + CHUNK_S, audio.pcm)
        if not driver.session.active:
            assert not driver.session.wants_decode()
            assert driver.session.stream_s < 0.6 + 0.2, "speech should have been detected"
            continue
        if driver.session.wants_decode():
            assert was_active
            first_request = driver.request()
    assert first_request.utterance_start_s < 0.6
    assert first_request.start_s == first_request.utterance_start_s
    window = first_request.end_s - first_request.utterance_start_s
    assert min_window_s - 1e-9 <= window < min_window_s + CHUNK_S


@pytest.mark.parametrize("cycle_ms", [250, 500])
def test_decodes_every_cycle_of_new_speech(cycle_ms: int) -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").say("cmd_piper_joe_05").pause(1.0)
    driver = make_driver(audio.script, stream=StreamSettings(cycle_ms=cycle_ms))
    voiced_end = last_voiced_end(audio.pcm)
    driver.feed(audio.pcm)
    during_speech = [r for r in driver.requests if r.end_s <= voiced_end]
    assert sum(not r.final for r in during_speech) >= 4
    # A pause between the sentences starts a whole decode; the cycle counts from whichever decode came last.
    for before, after in pairwise(during_speech):
        gap = after.end_s - before.end_s
        assert after.final or cycle_ms / 1000 - 1e-9 <= gap < cycle_ms / 1000 + CHUNK_S


def test_at_most_one_request_in_flight() -> None:
    audio = one_command()
    driver = make_driver(audio.script, auto_decode=False)
    driver.feed_until(1.5, audio.pcm)
    assert driver.session.wants_decode()
    request = driver.request()
    assert driver.session.in_flight
    assert not driver.session.wants_decode()
    # A second of speech arrives while the decode runs: still no second request.
    for _ in range(50):
        driver.feed_until(driver.session.stream_s + CHUNK_S, audio.pcm)
        assert not driver.session.wants_decode()
    driver.apply(request)
    assert not driver.session.in_flight
    assert driver.session.wants_decode()


def test_no_decode_while_only_silence_follows_a_covered_hypothesis() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(2.0).say("cmd_piper_joe_01").pause(1.0)
    driver = make_driver(audio.script, split_on_silence=False)
    first_speech_end = 0.3 + len(read_pcm("cmd_piper_joe_03")) / BYTES_PER_S
    second_speech_start = first_speech_end + 2.0
    driver.feed(audio.pcm)
    # One decode may still finish the first command; after that the pause costs nothing.
    in_pause = [r for r in driver.requests if first_speech_end + 0.3 < r.end_s < second_speech_start]
    assert in_pause == []


# --- partials ----------------------------------------------------------------------------------


def test_partials_change_text_and_stable_only_grows() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(1.0).say("cmd_piper_joe_06").pause(1.0)
    driver = make_driver(audio.script)
    driver.feed(audio.pcm)
    grouped = by_utterance(driver.events)
    assert sorted(grouped) == [1, 2]
    for events in grouped.values():
        partials = [event for event in events if isinstance(event, Partial)]
        finals = [event for event in events if isinstance(event, Final)]
        assert len(partials) >= 3
        assert len(finals) == 1
        assert events[-1] is finals[0]
        previous: tuple[str, str] | None = None
        previous_stable = ""
        for partial in partials:
            assert (partial.text, partial.stable) != previous
            assert partial.text.startswith(partial.stable)
            assert partial.stable.startswith(previous_stable)
            previous, previous_stable = (partial.text, partial.stable), partial.stable
        assert partials[-1].stable != "", "words must get committed before the end"
        assert finals[0].text.startswith(partials[-1].stable)


def test_a_repeated_hypothesis_gives_a_partial_only_for_what_it_commits() -> None:
    audio = one_command()
    driver = make_driver(audio.script, stream=StreamSettings(commit_margin_ms=500), auto_decode=False)
    driver.feed_until(1.5, audio.pcm)
    first = driver.request()
    words = scripted_words(audio.script, first, cut_words=False)
    assert len(words) >= 2
    [partial] = driver.apply(first, words)
    assert isinstance(partial, Partial)
    assert partial.stable == ""
    assert partial.text == " ".join(word.text.strip() for word in words)
    driver.feed_until(2.0, audio.pcm)
    second = driver.request()
    assert second.start_s == first.start_s
    [committing] = driver.apply(second, words)  # same text, but now committed
    assert isinstance(committing, Partial)
    assert committing.text == partial.text
    assert committing.stable == partial.text
    driver.feed_until(2.2, audio.pcm)
    again = driver.request()
    assert driver.apply(again, words) == []  # nothing new at all: nothing to tell
    driver.feed_until(2.5, audio.pcm)
    third = driver.request()
    more = scripted_words(audio.script, third, cut_words=False)
    assert len(more) > len(words)
    [partial] = driver.apply(third, more)
    assert isinstance(partial, Partial)
    assert partial.stable == " ".join(word.text.strip() for word in words)


def test_agreed_words_commit_only_once_they_end_commit_margin_ms_before_the_newest_audio() -> None:
    audio = one_command()
    driver = make_driver(audio.script, auto_decode=False)
    margin_s = StreamSettings().commit_margin_ms / 1000
    driver.feed_until(2.0, audio.pcm)
    first = driver.request()
    words = scripted_words(audio.script, first, cut_words=False)
    driver.apply(first, words)
    driver.feed_until(2.3, audio.pcm)
    second = driver.request()
    [partial] = driver.apply(second, words)

    assert isinstance(partial, Partial)
    stable_words = partial.stable.split()
    assert 0 < len(stable_words) < len(words)
    assert all(w.end + first.start_s <= second.end_s - margin_s for w in words[: len(stable_words)])
    assert words[len(stable_words)].end + first.start_s > second.end_s - margin_s


# --- finals ------------------------------------------------------------------------------------


def test_final_after_trailing_silence_has_the_full_text() -> None:
    audio = one_command()
    driver = make_driver(audio.script)
    speech_pcm = silence(0.3) + read_pcm("cmd_piper_joe_03")
    driver.feed(speech_pcm)
    assert driver.finals() == []
    voiced_end = last_voiced_end(audio.pcm)
    driver.feed(silence(1.0))
    [final] = driver.finals()
    assert final.text == reference("cmd_piper_joe_03")
    assert final.utterance == 1
    assert final.start <= 0.3 <= voiced_end <= final.end <= audio.seconds
    assert not driver.session.active
    assert driver.end() == []
    assert len(driver.finals()) == 1


def test_a_pause_starts_a_whole_decode_that_becomes_the_final_when_the_vad_ends_the_utterance() -> None:
    audio = one_command()
    voiced_end = last_voiced_end(audio.pcm)
    driver = make_driver(audio.script)
    driver.feed_until(voiced_end - 0.3, audio.pcm)
    utterance_start = driver.requests[0].start_s
    driver.auto_decode = False
    pause_s = StreamSettings().final_silence_ms / 1000
    driver.feed_until(voiced_end + pause_s, audio.pcm)
    assert driver.session.wants_final_decode()
    request = driver.request()
    assert request.final
    assert request.start_s == utterance_start, "the whole utterance, not the window since the last commit"
    assert request.end_s == pytest.approx(voiced_end + pause_s)
    driver.apply(request)
    count = len(driver.requests)
    final_events: list[Event] = []
    while not final_events:
        assert not driver.session.wants_decode()
        final_events = driver.push(audio.pcm[len(driver.fed) : len(driver.fed) + CHUNK_BYTES])
    [final] = final_events
    assert isinstance(final, Final)
    assert final.text == reference("cmd_piper_joe_03")
    assert len(driver.requests) == count


def test_the_whole_decode_in_flight_becomes_the_final_when_the_vad_ends_the_utterance_meanwhile() -> None:
    audio = one_command()
    voiced_end = last_voiced_end(audio.pcm)
    driver = make_driver(audio.script)
    driver.feed_until(voiced_end - 0.3, audio.pcm)
    driver.auto_decode = False
    driver.feed_until(voiced_end + 0.15, audio.pcm)
    request = driver.request()
    assert request.final
    while not driver.session.ending:  # the VAD ends the utterance while the decode runs
        assert driver.push(audio.pcm[len(driver.fed) : len(driver.fed) + CHUNK_BYTES]) == []
    assert not driver.session.wants_decode(), "the decode in flight already covers every voiced frame"
    events = driver.apply(request)
    assert isinstance(events[-1], Final)
    assert events[-1].text == reference("cmd_piper_joe_03")
    assert not driver.session.wants_decode()


def test_final_is_decoded_when_the_latest_hypothesis_missed_the_end() -> None:
    audio = one_command()
    voiced_end = last_voiced_end(audio.pcm)
    driver = make_driver(audio.script)
    driver.feed_until(voiced_end - 0.4, audio.pcm)
    driver.auto_decode = False
    while not driver.session.ending:
        assert driver.push(audio.pcm[len(driver.fed) : len(driver.fed) + CHUNK_BYTES]) == []
    assert driver.session.wants_decode()
    request = driver.request()
    assert request.final
    assert request.end_s >= voiced_end
    events = driver.apply(request)
    [final] = events
    assert isinstance(final, Final)
    assert final.text == reference("cmd_piper_joe_03")
    assert not driver.session.active


def test_end_of_audio_gives_the_final() -> None:
    speech = read_pcm("cmd_piper_joe_03")
    audio = Audio().pause(0.3).say("cmd_piper_joe_03")
    driver = make_driver(audio.script)
    driver.feed(audio.pcm[: len(audio.pcm) // CHUNK_BYTES * CHUNK_BYTES])
    assert driver.finals() == []
    assert driver.session.active
    driver.end()
    [final] = driver.finals()
    assert final.text == reference("cmd_piper_joe_03")
    assert final.end >= 0.3 + len(speech) / BYTES_PER_S - CHUNK_S
    assert not driver.session.active
    assert driver.session.end_of_audio(driver.now) == []


def test_audio_that_stops_with_the_voice_gets_the_silence_of_a_pause_in_its_final_decode() -> None:
    """Whisper ends its last segment on silence; a client that stops right after the speech must get the same
    final window as one that sends a pause, or the last words go to a later pass that may drop them."""
    speech = Audio().pause(0.3).say("cmd_piper_joe_03")
    paused = make_driver(speech.script)
    paused.feed(speech.pcm + silence(1.0))
    stopped = make_driver(speech.script)
    stopped.feed(speech.pcm[: len(speech.pcm) // CHUNK_BYTES * CHUNK_BYTES])
    stopped.end()
    tail_s = max(stopped.final_silence_s, stopped.final_tail_s)

    [with_pause] = [r for r in paused.requests if r.final][-1:]
    [at_the_stop] = [r for r in stopped.requests if r.final]
    assert at_the_stop.end_s < at_the_stop.voice_end_s + tail_s, "the audio stops before a pause"
    heard_s = len(at_the_stop.audio) / RATE  # the silence it lacked is added (what, is checked by check_window)
    assert heard_s == pytest.approx(at_the_stop.voice_end_s + tail_s - at_the_stop.start_s, abs=1 / RATE)
    assert len(at_the_stop.audio) == pytest.approx(len(with_pause.audio), abs=0.1 * RATE)


def test_end_of_audio_of_a_covered_hypothesis_needs_no_decode() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(0.2)
    voiced_end = last_voiced_end(audio.pcm)
    driver = make_driver(audio.script)
    driver.feed_until(voiced_end - 0.3, audio.pcm)
    driver.auto_decode = False
    driver.feed_until(voiced_end + 0.15, audio.pcm)
    driver.apply(driver.request())
    assert driver.requests[-1].final, "the pause started the whole decode"
    driver.feed(audio.pcm[len(driver.fed) :])
    assert driver.finals() == []
    count = len(driver.requests)
    events = driver.end()
    [final] = events
    assert isinstance(final, Final)
    assert final.text == reference("cmd_piper_joe_03")
    assert final.ttct_ms == 0
    assert len(driver.requests) == count
    assert not driver.session.wants_decode()


def test_end_of_audio_without_speech_gives_nothing() -> None:
    driver = make_driver([])
    driver.feed(silence(0.5))
    assert driver.end() == []
    assert driver.events == []


def test_speech_after_end_of_audio_is_the_next_utterance() -> None:
    first = Audio().pause(0.3).say("cmd_piper_joe_03")
    driver = make_driver(first.script)
    driver.feed(first.pcm[: len(first.pcm) // CHUNK_BYTES * CHUNK_BYTES])
    driver.end()
    offset = len(driver.fed) / BYTES_PER_S
    second = Audio().pause(offset).pause(0.3).say("cmd_piper_joe_01").pause(1.0)
    driver.script += second.script
    driver.feed(second.pcm[len(driver.fed) :])
    finals = driver.finals()
    assert [(f.utterance, f.text) for f in finals] == [
        (1, reference("cmd_piper_joe_03")),
        (2, reference("cmd_piper_joe_01")),
    ]


def test_without_split_on_silence_a_pause_does_not_end_the_utterance() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(1.5).say("cmd_piper_joe_01").pause(1.5)
    driver = make_driver(audio.script, split_on_silence=False)
    driver.feed(audio.pcm)
    assert driver.finals() == []
    assert driver.session.active
    driver.end()
    [final] = driver.finals()
    assert final.text == " ".join(audio.texts)
    assert final.utterance == 1
    assert {partial.utterance for partial in driver.partials()} == {1}


def test_two_utterances_are_numbered_1_and_2() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(1.0).say("cmd_piper_joe_01").pause(1.0)
    driver = make_driver(audio.script)
    driver.feed(audio.pcm)
    finals = driver.finals()
    assert [(f.utterance, f.text) for f in finals] == [(1, audio.texts[0]), (2, audio.texts[1])]
    assert finals[0].end <= finals[1].start
    numbers = [event.utterance for event in driver.events if isinstance(event, (Partial, Final))]
    assert numbers == sorted(numbers)
    assert driver.session.utterance == 3


def test_max_utterance_s_forces_a_final_without_losing_words() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").say("cmd_piper_joe_05").pause(1.0)
    limit = 2.0
    driver = make_driver(audio.script, limits=LimitSettings(max_utterance_s=limit), cut_words=False)
    voiced_end = last_voiced_end(audio.pcm)
    driver.feed(audio.pcm)
    finals = driver.finals()
    assert len(finals) >= 2
    first = finals[0]
    assert first.end < voiced_end, "the first final must come while the speech goes on"
    assert limit - 1e-9 <= first.end - first.start < limit + CHUNK_S
    assert [f.utterance for f in finals] == list(range(1, len(finals) + 1))
    words = " ".join(f.text for f in finals).split()
    assert words == " ".join(audio.texts).split()


# The limit the split tests are laid out for.
SPLIT_LIMITS = LimitSettings(max_utterance_s=30.0)


def split_talk(first_pause_s: float, second_pause_s: float) -> Audio:
    """33 s of a voice with words, that pauses at 20 s and at 26 s for these lengths of silence (split at 30 s)."""
    return Audio().pause(0.5).hum(20.0).pause(first_pause_s).hum(26.0).pause(second_pause_s).hum(33.0).pause(1.0)


@pytest.mark.parametrize("split_on_silence", [True, False], ids=["websocket", "wyoming"])
def test_a_long_utterance_is_finalised_at_its_longest_late_pause_and_loses_no_words(split_on_silence: bool) -> None:
    # The later pause is the longer: no whole decode heard past it before the split. Pauses shorter than silence_ms
    # end no WebSocket utterance; a Wyoming request is one utterance however long it pauses.
    long_s = 0.45 if split_on_silence else 0.8
    audio = split_talk(0.3, long_s)
    driver = make_driver(audio.script, limits=SPLIT_LIMITS, split_on_silence=split_on_silence, cut_words=False)
    driver.feed(audio.pcm)
    driver.end()

    first, second = driver.finals()
    # The first final ends in the pause at 26 s, within the limit; the second starts there: no audio between.
    assert 26.0 < first.end < 26.0 + long_s
    assert first.end - first.start <= SPLIT_LIMITS.max_utterance_s
    assert second.start == pytest.approx(first.end)
    words = [text for text, _, _ in audio.script]
    assert first.text.split() == [text for text, start, _ in audio.script if start < 26.0]
    assert (first.text + " " + second.text).split() == words


def test_a_long_utterance_split_at_an_earlier_longer_pause_loses_and_repeats_no_words() -> None:
    audio = split_talk(0.45, 0.3)
    driver = make_driver(audio.script, limits=SPLIT_LIMITS, cut_words=False)
    driver.feed(audio.pcm)

    first, second = driver.finals()
    assert 20.0 < first.end < 20.45
    assert first.text.split() == [text for text, start, _ in audio.script if start < 20.0]
    assert (first.text + " " + second.text).split() == [text for text, _, _ in audio.script]


def test_a_long_utterance_keeps_its_window_bounded_and_loses_no_words() -> None:
    audio = Audio().pause(0.3)
    for index in range(3, 9):
        audio.say(f"cmd_piper_joe_{index:02d}")
    audio.pause(1.0)
    stream = StreamSettings(max_window_s=4.0)
    driver = make_driver(audio.script, stream=stream, split_on_silence=False)
    driver.feed(audio.pcm)
    driver.end()
    partials = [r for r in driver.requests if not r.final]
    assert max(r.end_s - r.start_s for r in partials) <= stream.max_window_s + 1e-9
    assert any(r.start_s > r.utterance_start_s for r in partials), "the partial window must have moved"
    # Within Whisper's window, a final hears the whole utterance: no seam, no word committed from a short window.
    assert all(r.start_s == r.utterance_start_s for r in driver.requests if r.final)
    [final] = driver.finals()
    assert final.text.split() == " ".join(audio.texts).split()


# --- timing fields and prompt ------------------------------------------------------------------


def test_timing_fields_are_non_negative_ints() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(1.0).say("cmd_piper_joe_01")
    driver = make_driver(audio.script)
    driver.feed(audio.pcm)
    driver.end()
    events = driver.events
    assert len(driver.finals()) == 2
    for event in events:
        assert isinstance(event, (Partial, Final))
        fields = [event.asr_ms, event.e2e_ms] + ([event.ttct_ms] if isinstance(event, Final) else [])
        for value in fields:
            assert type(value) is int
            assert value >= 0
    for event in events:
        if isinstance(event, Partial):
            # Served at once: the newest audio of the decode arrived one model time before the event.
            assert event.asr_ms == round(ASR_S * 1000)
            assert event.e2e_ms == round(ASR_S * 1000)


def test_ttct_counts_from_the_arrival_of_the_silence_start() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(1.0).say("cmd_piper_joe_01")
    driver = make_driver(audio.script)
    driver.feed(audio.pcm)
    driver.end()
    first, second = [emitted for emitted in driver.log if isinstance(emitted.event, Final)]
    assert isinstance(first.event, Final)
    assert isinstance(second.event, Final)
    # Ended by silence: from when the last voiced frame arrived.
    silence_start_s = last_voiced_end(silence(0.3) + read_pcm("cmd_piper_joe_03"))
    assert first.event.ttct_ms == round((first.now - driver.arrival_of(silence_start_s)) * 1000)
    assert first.event.ttct_ms > 0
    # Ended by the client: from the end signal, which came at the last chunk's arrival.
    assert second.event.ttct_ms == round((second.now - driver.arrivals[-1][1]) * 1000)


def test_prompt_of_each_request_includes_the_client_prompt() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(1.0).say("cmd_piper_joe_01").pause(1.0)
    driver = make_driver(audio.script, prompt="Kitchen, thermostat, Fahrenheit.")
    driver.feed(audio.pcm)
    assert len(driver.requests) >= 4
    assert all("Kitchen, thermostat, Fahrenheit." in r.prompt for r in driver.requests)


def test_prompt_chars_zero_sends_no_prompt() -> None:
    audio = one_command()
    driver = make_driver(audio.script, stream=StreamSettings(prompt_chars=0), prompt="Kitchen")
    driver.feed(audio.pcm)
    assert driver.requests
    assert all(r.prompt == "" for r in driver.requests)


def test_prompt_of_a_moved_window_holds_the_committed_text_before_it() -> None:
    audio = Audio().pause(0.3)
    for index in range(3, 7):
        audio.say(f"cmd_piper_joe_{index:02d}")
    audio.pause(1.0)
    driver = make_driver(audio.script, stream=StreamSettings(max_window_s=4.0), split_on_silence=False)
    driver.feed(audio.pcm)
    moved = [r for r in driver.requests if r.start_s > r.utterance_start_s]
    assert moved
    for request in moved:
        before = [text for text, _, end in audio.script if end <= request.start_s]
        assert request.prompt.split()[-len(before) :] == before[-len(request.prompt.split()) :]


def test_client_prompt_survives_a_long_committed_text() -> None:
    """Every request's prompt includes the client prompt, also once the committed text is long."""
    audio = Audio().pause(0.3)
    for index in range(3, 13):
        audio.say(f"cmd_piper_joe_{index:02d}")
    audio.pause(1.0)
    driver = make_driver(
        audio.script, stream=StreamSettings(max_window_s=4.0), split_on_silence=False, prompt="Kitchen, thermostat."
    )
    driver.feed(audio.pcm)
    assert any(len(r.prompt) >= 150 for r in driver.requests), "the committed text must have grown"
    assert all("Kitchen, thermostat." in r.prompt for r in driver.requests)


def test_window_starts_preroll_ms_before_the_detected_speech() -> None:
    """The first window begins `preroll_ms` before where the VAD put the speech start."""
    audio = one_command(lead_s=1.0)
    gate = VadGate.of(StreamSettings())
    start = next(change for change in gate.push(audio.pcm) if change.speaking)
    preroll_s = StreamSettings().preroll_ms / 1000
    driver = make_driver(audio.script)
    driver.feed(audio.pcm)
    first = driver.requests[0]
    assert first.utterance_start_s == pytest.approx(start.at_s - preroll_s, abs=1e-6)


def test_speech_during_a_pending_final_is_the_next_utterance_not_lost() -> None:
    first = Audio().pause(0.3).say("cmd_piper_joe_03").pause(0.6)
    audio = Audio(first.pcm, list(first.script), list(first.texts)).say("asterisk_conf-hasjoin").pause(1.0)
    driver = make_driver(audio.script, auto_decode=False)
    driver.feed_until(first.seconds - 1.0, audio.pcm)
    while driver.session.wants_decode():
        driver.apply(driver.request())
    while not driver.session.ending:
        driver.feed_until(driver.session.stream_s + CHUNK_S, audio.pcm)
    pending = driver.request()  # the final's decode is slow: the second command is spoken meanwhile
    assert pending.final
    driver.feed(audio.pcm[len(driver.fed) :])
    driver.apply(pending)
    driver.serve()

    assert [final.text for final in driver.finals()] == audio.texts
    assert [final.utterance for final in driver.finals()] == [1, 2]


def serve_all(driver: Driver) -> None:
    for _ in range(100):
        if not driver.session.wants_decode():
            return
        driver.apply(driver.request())
    raise AssertionError("the session keeps wanting decodes")


def test_an_end_while_the_final_before_is_pending_ends_the_speech_after_it() -> None:
    first = Audio().pause(0.3).say("cmd_piper_joe_03").pause(0.6)
    audio = Audio(first.pcm, list(first.script), list(first.texts)).say("asterisk_conf-hasjoin")
    driver = make_driver(audio.script, auto_decode=False)
    driver.feed_until(first.seconds - 1.0, audio.pcm)
    serve_all(driver)
    while not driver.session.ending:
        driver.feed_until(driver.session.stream_s + CHUNK_S, audio.pcm)
    pending = driver.request()
    driver.feed(audio.pcm[len(driver.fed) :])
    driver.end()  # right after the second command, before the first one's final is out
    driver.apply(pending)
    serve_all(driver)

    assert [final.text for final in driver.finals()] == audio.texts
    assert not driver.session.active


def test_an_end_while_a_forced_final_is_pending_keeps_the_speech_after_the_cut() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").say("cmd_piper_joe_05")
    driver = make_driver(
        audio.script,
        limits=LimitSettings(max_utterance_s=2.0),
        split_on_silence=False,
        cut_words=False,
        auto_decode=False,
    )
    while not driver.session.ending:
        driver.feed_until(driver.session.stream_s + CHUNK_S, audio.pcm)
        if not driver.session.ending:
            serve_all(driver)
    assert driver.session.wants_decode()
    pending = driver.request()  # the forced final's decode is slow: the speech goes on, then ends
    driver.feed(audio.pcm[len(driver.fed) :])
    driver.end()
    driver.apply(pending)
    serve_all(driver)

    assert len(driver.finals()) == 2
    assert " ".join(final.text for final in driver.finals()).split() == " ".join(audio.texts).split()
    assert not driver.session.active


@pytest.mark.parametrize("max_window_s", [2.0, 4.0, 15.0])
def test_an_utterance_longer_than_whispers_window_sent_faster_than_it_is_decoded_loses_no_words(
    max_window_s: float,
) -> None:
    audio = Audio().pause(0.3)
    clips = [f"cmd_piper_joe_{index:02d}" for index in range(1, 21)] + [f"cmd_espeak_{i:02d}" for i in range(1, 21)]
    for name in clips:
        if audio.seconds > WHOLE_DECODE_MAX_S + 4.0:
            break
        audio.say(name)
    audio.pause(0.2)
    assert audio.seconds > WHOLE_DECODE_MAX_S + 4.0
    stream = StreamSettings(max_window_s=max_window_s, min_window_s=min(1.0, max_window_s))
    limits = LimitSettings(max_utterance_s=60.0)
    driver = make_driver(audio.script, stream=stream, limits=limits, split_on_silence=False, auto_decode=False)
    driver.feed(audio.pcm)  # all of it before any decode: an upload, or a CPU far behind
    driver.end()
    waited_for_by_the_final = []
    while driver.session.wants_decode():
        waited_for_by_the_final.append(driver.session.wants_final_decode())
        driver.apply(driver.request())

    # The decodes through the skipped audio are the final's too: the scheduler must not hold them back as partials.
    assert len(waited_for_by_the_final) > 1
    assert all(waited_for_by_the_final)
    assert max(r.end_s - r.start_s for r in driver.requests) <= max_window_s + 1e-9
    [final] = driver.finals()
    assert final.text.split() == " ".join(audio.texts).split()


def test_one_large_frame_with_two_commands_gives_two_finals() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(1.0).say("asterisk_conf-hasjoin").pause(1.0)
    driver = make_driver(audio.script, cut_words=False)
    driver.push(audio.pcm)

    assert [final.text for final in driver.finals()] == audio.texts
    assert driver.finals()[0].end <= driver.finals()[1].start


def test_a_failed_final_decode_keeps_what_earlier_decodes_heard() -> None:
    audio = one_command(trailing_s=0.0)
    driver = make_driver(audio.script, auto_decode=False)
    driver.feed_until(audio.seconds - 0.5, audio.pcm)
    driver.apply(driver.request())
    driver.feed(audio.pcm[len(driver.fed) :])
    heard = driver.partials()[-1].text
    driver.end()
    final_request = driver.request()
    assert final_request.final

    [final] = driver.session.decode_failed(final_request, driver.now)

    assert isinstance(final, Final)
    assert final.text == heard
    assert not driver.session.active


# --- the final: a whole decode of the utterance --------------------------------------------------


def serve_with(driver: Driver, partial_words: Callable[[DecodeRequest], tuple[Word, ...]]) -> None:
    """Answer every wanted decode: partial decodes with `partial_words`, whole decodes with the script."""
    while driver.session.wants_decode():
        request = driver.request()
        driver.apply(request, None if request.final else partial_words(request))


def feed_serving(driver: Driver, pcm: bytes, partial_words: Callable[[DecodeRequest], tuple[Word, ...]]) -> None:
    driver.auto_decode = False
    for offset in range(0, len(pcm), CHUNK_BYTES):
        driver.push(pcm[offset : offset + CHUNK_BYTES])
        serve_with(driver, partial_words)


def test_the_final_corrects_words_the_short_partial_windows_misheard_and_says_it_revised() -> None:
    audio = one_command()
    driver = make_driver(audio.script, cut_words=False)

    def mishear(request: DecodeRequest) -> tuple[Word, ...]:
        words = scripted_words(audio.script, request, cut_words=False)
        return tuple(Word(w.start, w.end, " thermos") if "thermostat" in w.text else w for w in words)

    feed_serving(driver, audio.pcm, mishear)

    stables = [partial.stable for partial in driver.partials()]
    assert any("thermos " in stable for stable in stables), "the misheard word was committed"
    assert all(later.startswith(earlier) for earlier, later in pairwise(stables)), "stable never changes"
    [final] = driver.finals()
    assert final.text == reference("cmd_piper_joe_03")
    assert final.revised
    assert all(r.start_s == driver.requests[0].start_s for r in driver.requests if r.final)


def test_a_final_that_keeps_the_committed_words_is_not_revised() -> None:
    audio = one_command()
    driver = make_driver(audio.script, cut_words=False)
    driver.feed(audio.pcm)

    [final] = driver.finals()
    assert final.text == reference("cmd_piper_joe_03")
    assert not final.revised


@pytest.mark.parametrize("flaw", ["hallucinated", "loop"])
def test_a_whole_decode_whisper_marks_as_invented_or_looping_falls_back_to_the_partials(flaw: str) -> None:
    audio = one_command()
    driver = make_driver(audio.script, cut_words=False, auto_decode=False)
    for offset in range(0, len(audio.pcm), CHUNK_BYTES):
        driver.push(audio.pcm[offset : offset + CHUNK_BYTES])
        while driver.session.wants_decode():
            request = driver.request()
            if not request.final:
                driver.apply(request)
                continue
            words = scripted_words(audio.script, request, cut_words=False)
            if flaw == "loop":
                loop = tuple(Word(w.start, w.end, w.text) for w in words[:4])
                driver.apply(request, words[:4] + loop + words[4:])
            else:
                invented = Word(words[-1].end, words[-1].end + 0.05, " subscribe")
                driver.apply(request, (*words, invented), hallucinated=True)

    [final] = driver.finals()
    assert final.text == reference("cmd_piper_joe_03")


def test_words_of_decodes_whisper_marks_as_looping_become_neither_partial_nor_final() -> None:
    """A names prompt echoed over noise ("We have Elowen and Skellig and Skellig and...") is made up."""
    audio = one_command()
    driver = make_driver(audio.script, auto_decode=False)
    for offset in range(0, len(audio.pcm), CHUNK_BYTES):
        driver.push(audio.pcm[offset : offset + CHUNK_BYTES])
        while driver.session.wants_decode():
            driver.apply(driver.request(), hallucinated=True)

    assert driver.partials() == []
    assert driver.finals() == []
    assert not driver.session.active


def test_a_one_word_utterance_shorter_than_the_first_window_gets_its_final() -> None:
    audio = Audio().pause(0.3).say("asterisk_digits_4").pause(1.0)
    driver = make_driver(audio.script, stream=StreamSettings(min_window_s=2.0))
    driver.feed(audio.pcm)

    assert [final.text for final in driver.finals()] == [reference("asterisk_digits_4")]
    assert [request.final for request in driver.requests] == [True]


def test_words_the_whole_decode_puts_after_the_voice_ended_are_not_in_the_final() -> None:
    audio = one_command()
    voiced_end = last_voiced_end(audio.pcm)
    driver = make_driver(audio.script, cut_words=False, auto_decode=False)
    driver.feed_until(voiced_end + 0.15, audio.pcm)
    while driver.session.wants_decode():
        request = driver.request()
        words = scripted_words(audio.script, request, cut_words=False)
        late = voiced_end + 0.35 - request.start_s
        driver.apply(request, (*words, Word(late, late + 0.1, " goodbye")) if request.final else words)
    driver.feed(audio.pcm[len(driver.fed) :])

    [final] = driver.finals()
    assert final.text == reference("cmd_piper_joe_03")


def test_speech_that_resumes_after_a_pause_gets_a_new_whole_decode_of_all_of_it() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(0.15).say("cmd_piper_joe_01").pause(1.0)
    driver = make_driver(audio.script, cut_words=False)
    driver.feed(audio.pcm)

    [final] = driver.finals()
    assert final.text == " ".join(audio.texts)
    whole = [request for request in driver.requests if request.final]
    assert len(whole) == 2, "one at the pause, one at the end"
    assert whole[0].start_s == whole[1].start_s
    assert whole[0].end_s < whole[1].end_s


@pytest.mark.parametrize("outcome", ["failed", "untrusted", "trusted"])
def test_after_a_whole_decode_partials_wait_for_new_voice_unless_it_failed_or_was_untrusted(outcome: str) -> None:
    """A whole decode hears the utterance to its end: a partial after it could add nothing. One that failed or was
    not trusted leaves the final to the partials' path, which may still need a decode through the last words."""
    audio = one_command()
    voiced_end = last_voiced_end(audio.pcm)
    # The utterance stays open through the check (the VAD would end it after 350 ms).
    driver = make_driver(audio.script, stream=StreamSettings(silence_ms=2000), cut_words=False)
    driver.feed_until(voiced_end, audio.pcm)
    driver.auto_decode = False
    driver.feed_until(voiced_end + driver.final_silence_s, audio.pcm)
    request = driver.request()
    assert request.final
    if outcome == "failed":
        driver.session.decode_failed(request, driver.now)
    else:
        driver.apply(request, hallucinated=outcome == "untrusted")
    driver.feed_until(voiced_end + 0.6, audio.pcm)

    assert driver.session.wants_decode() == (outcome != "trusted")
    assert not driver.session.wants_final_decode()


def test_a_failed_whole_decode_is_not_retried_for_the_same_speech_and_the_end_falls_back() -> None:
    audio = one_command()
    voiced_end = last_voiced_end(audio.pcm)
    driver = make_driver(audio.script, cut_words=False)
    driver.feed_until(voiced_end, audio.pcm)
    driver.auto_decode = False
    driver.feed_until(voiced_end + 0.15, audio.pcm)
    request = driver.request()
    assert request.final
    assert driver.session.decode_failed(request, driver.now) == []
    driver.feed_until(voiced_end + 0.3, audio.pcm)
    assert not driver.session.wants_final_decode(), "no retry loop on a failing model"
    heard = driver.partials()[-1].text
    driver.end()
    request = driver.request()
    assert request.final

    [final] = driver.session.decode_failed(request, driver.now)

    assert isinstance(final, Final)
    assert final.text == heard


def test_the_whole_decode_prompt_holds_no_history_but_the_partials_do() -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(1.0).say("cmd_piper_joe_01").pause(1.0)
    driver = make_driver(audio.script, cut_words=False, prompt="Kitchen.")
    driver.feed(audio.pcm)

    first_final = driver.finals()[0].text
    second = [r for r in driver.requests if r.utterance_start_s == driver.finals()[1].start]
    assert [r.prompt for r in second if r.final] == ["Kitchen."]
    assert all(first_final in r.prompt for r in second if not r.final)


def test_partial_decodes_come_less_often_when_the_cpu_is_slow() -> None:
    audio = Audio().pause(0.3).say("asterisk_conf-usermenu").pause(1.0)
    driver = make_driver(audio.script, auto_decode=False)
    for offset in range(0, len(audio.pcm), CHUNK_BYTES):
        driver.push(audio.pcm[offset : offset + CHUNK_BYTES])
        while driver.session.wants_decode():
            driver.apply(driver.request(), asr_s=0.6)

    partial_ends = [r.end_s for r in driver.requests if not r.final]
    assert len(partial_ends) > 3
    assert all(later - earlier >= 1.2 - 1e-9 for earlier, later in pairwise(partial_ends))
    assert driver.finals()[-1].text == reference("asterisk_conf-usermenu")


@pytest.mark.parametrize("chunk_bytes", [320, 3200, 9600])
def test_the_final_window_depends_on_the_audio_not_on_chunking_or_decode_speed(chunk_bytes: int) -> None:
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(0.15).say("cmd_piper_joe_01").pause(1.0)
    reference_driver = make_driver(audio.script)
    reference_driver.feed(audio.pcm)
    expected = [(r.start_s, r.end_s) for r in reference_driver.requests if r.final]

    driver = make_driver(audio.script, auto_decode=False)
    for offset in range(0, len(audio.pcm), chunk_bytes):
        driver.push(audio.pcm[offset : offset + chunk_bytes])
        while driver.session.wants_decode():
            driver.apply(driver.request(), asr_s=0.3)

    assert [(r.start_s, r.end_s) for r in driver.requests if r.final] == expected
    assert [f.text for f in driver.finals()] == [f.text for f in reference_driver.finals()]
