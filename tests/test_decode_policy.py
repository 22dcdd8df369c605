"""Unit tests for the decode policy: which decode comes next, over which window, and what it keeps of the results."""

from __future__ import annotations

import pytest

from edge_asr.config import StreamSettings
from edge_asr.decode_policy import WHOLE_DECODE_MAX_S, DecodePolicy, DecodeWindow, FinalCandidate
from edge_asr.transcript import Word
from edge_asr.utterance import UtteranceState

pytestmark = pytest.mark.fast

# Defaults: cycle 250 ms, final_silence 60 ms, min_window 1 s, overlap 150 ms, commit margin 1 s.
STREAM = StreamSettings()
SHORT_WINDOW = StreamSettings(max_window_s=4.0)


def speaking(stream_s: float, voice_end_s: float | None = None, start_s: float = 0.3) -> UtteranceState:
    """An open utterance at `stream_s`, its voice going on (or last voiced at `voice_end_s`)."""
    return UtteranceState(start_s, None, stream_s if voice_end_s is None else voice_end_s, stream_s)


def ended(end_s: float, voice_end_s: float, start_s: float = 0.3) -> UtteranceState:
    return UtteranceState(start_s, end_s, voice_end_s, end_s)


def words(count: int, step_s: float = 0.5) -> list[Word]:
    """`count` words, one every `step_s` from 0, each 0.4 s long."""
    return [Word(i * step_s, i * step_s + 0.4, f" w{i}") for i in range(count)]


def candidate(voice_end_s: float, *, heard: tuple[Word, ...] = ()) -> FinalCandidate:
    return FinalCandidate(heard, 0.3, voice_end_s, asr_ms=100.0, arrival=0.0, trusted=True)


def opened(stream: StreamSettings = STREAM, start_s: float = 0.3) -> DecodePolicy:
    policy = DecodePolicy(stream)
    policy.reset(start_s)
    return policy


def test_nothing_is_decoded_while_no_utterance_is_open() -> None:
    policy = DecodePolicy(STREAM)
    idle = UtteranceState(None, None, 0.0, 5.0)
    assert policy.next_kind(idle) is None
    assert policy.undecoded_s(idle) == 0.0
    assert not policy.in_flight


def test_the_first_partial_waits_for_min_window_s_and_hears_the_utterance_from_its_start() -> None:
    policy = opened()
    assert policy.next_kind(speaking(1.28)) is None
    assert policy.next_kind(speaking(1.3)) == "partial"
    assert policy.plan(speaking(1.3)) == DecodeWindow(False, 0.3, 1.3, 1.3, (), None)
    assert policy.in_flight
    assert policy.undecoded_s(speaking(1.5)) == pytest.approx(0.2)
    # One partial out at a time.
    assert policy.next_kind(speaking(2.5)) is None


def test_partials_come_every_cycle_and_less_often_when_they_are_slow() -> None:
    policy = opened()
    policy.plan(speaking(1.3))
    policy.returned(False, 100.0)
    assert not policy.in_flight
    assert policy.next_kind(speaking(1.54)) is None
    assert policy.next_kind(speaking(1.55)) == "partial"
    policy.plan(speaking(1.55))
    # 400 ms of model time: at most half a worker's time goes to partials, so one every 800 ms.
    policy.returned(False, 400.0)
    assert policy.next_kind(speaking(2.34)) is None
    assert policy.next_kind(speaking(2.35)) == "partial"


def test_a_pause_asks_for_the_whole_utterance_beside_a_partial_and_ahead_of_the_next() -> None:
    policy = opened()
    policy.plan(speaking(1.3))
    assert policy.next_kind(speaking(1.54, voice_end_s=1.5)) is None, "40 ms is not a pause yet"
    pause = speaking(1.58, voice_end_s=1.5)
    assert policy.next_kind(pause) == "final"
    # From the utterance's start to final_silence_ms after the voice; the history is not its business.
    assert policy.plan(pause) == DecodeWindow(True, 0.3, 1.56, 1.5, (), None)
    policy.returned(False, 10.0)
    assert policy.next_kind(speaking(2.0, voice_end_s=1.5)) is None, "a whole decode is out: no partial repeats it"


def test_a_whole_decode_that_heard_the_voice_to_its_end_stops_the_decodes() -> None:
    policy = opened()
    policy.plan(speaking(1.58, voice_end_s=1.5))
    policy.returned(True, 100.0)
    policy.take_whole(candidate(1.5))
    assert policy.next_kind(speaking(3.0, voice_end_s=1.5)) is None
    assert policy.next_kind(ended(3.0, voice_end_s=1.5)) is None
    # The speaker goes on: partials again, and the next pause asks for another whole decode.
    assert policy.next_kind(speaking(3.0, voice_end_s=3.0)) == "partial"
    assert policy.next_kind(speaking(3.1, voice_end_s=3.0)) == "final"


def test_an_ended_utterance_wants_its_whole_decode_at_once_and_no_partial() -> None:
    policy = opened()
    stop = ended(1.5, voice_end_s=1.5)
    assert policy.next_kind(stop) == "final"
    # The audio stopped with the voice: the window ends there (the session pads it with silence).
    assert policy.plan(stop) == DecodeWindow(True, 0.3, 1.5, 1.5, (), None)
    assert policy.next_kind(stop) is None


def test_a_failed_whole_decode_is_retried_only_for_more_speech_or_at_the_end() -> None:
    policy = opened()
    pause = speaking(1.58, voice_end_s=1.5)
    policy.plan(pause)
    policy.returned(True, None)
    policy.whole_failed(1.5)
    assert policy.next_kind(speaking(1.8, voice_end_s=1.5)) is None, "within a cycle of the whole decode's end"
    assert policy.next_kind(speaking(1.82, voice_end_s=1.5)) == "partial", "the partials' path stands in"
    policy.plan(speaking(1.82, voice_end_s=1.5))
    policy.returned(False, 10.0)
    # That partial reached past the voice's end: nothing new to hear.
    assert policy.next_kind(speaking(2.5, voice_end_s=1.5)) is None
    assert policy.next_kind(ended(2.5, voice_end_s=1.5)) == "final"
    assert policy.next_kind(speaking(2.0, voice_end_s=1.9)) == "final"


def test_an_untrusted_whole_decode_lets_partials_run_until_one_covers_the_voice() -> None:
    policy = opened()
    policy.plan(speaking(1.58, voice_end_s=1.5))
    policy.returned(True, 100.0)
    policy.take_whole(FinalCandidate((), 0.3, 1.5, asr_ms=100.0, arrival=0.0, trusted=False))
    policy.whole_unusable()
    assert policy.next_kind(speaking(1.8, voice_end_s=1.5)) is None, "within a cycle of the whole decode's end"
    assert policy.next_kind(speaking(1.82, voice_end_s=1.5)) == "partial"
    policy.plan(speaking(1.82, voice_end_s=1.5))
    policy.returned(False, 10.0)
    assert policy.next_kind(speaking(2.5, voice_end_s=1.5)) is None


def test_words_two_hypotheses_agree_on_are_committed_before_the_commit_margin() -> None:
    policy = opened(start_s=0.0)
    policy.take_hypothesis(words(10), end_s=5.0)
    assert not policy.committed
    policy.take_hypothesis(words(10), end_s=5.0)
    # Words ending by 4.0 s (1 s before the decode's end) commit; the rest stay tentative.
    assert [w.text for w in policy.committed] == [f" w{i}" for i in range(8)]
    assert [w.text for w in policy.tentative] == [" w8", " w9"]
    # The prefix before a window: committed words ending by its start, give or take 50 ms.
    assert [w.text for w in policy.committed_before(3.37)] == [f" w{i}" for i in range(7)]
    assert [w.text for w in policy.committed_before(3.34)] == [f" w{i}" for i in range(6)]


def test_a_long_partial_window_starts_at_the_last_committed_word_less_the_overlap() -> None:
    policy = opened(SHORT_WINDOW, start_s=0.0)
    policy.heard(5.0)
    policy.take_hypothesis(words(10), end_s=5.0)
    policy.take_hypothesis(words(10), end_s=5.0)
    window = policy.plan(speaking(5.5, start_s=0.0))
    assert window.start_s == pytest.approx(3.9 - 0.15)
    assert window.end_s == 5.5
    assert [w.text for w in window.prefix] == [f" w{i}" for i in range(7)]
    # The audio before the window stays while a whole decode from the start could still need it.
    assert window.drop_before_s == pytest.approx(5.5 - WHOLE_DECODE_MAX_S)


def test_a_long_window_with_nothing_committed_commits_words_the_newest_decode_heard_whole() -> None:
    policy = opened(SHORT_WINDOW, start_s=0.0)
    policy.heard(5.0)
    policy.take_hypothesis(words(10), end_s=5.0)
    window = policy.plan(speaking(5.5, start_s=0.0))
    # Forced up to half a window back from the end (3.5 s): the words ending by then.
    assert [w.text for w in policy.committed] == [f" w{i}" for i in range(7)]
    assert window.start_s == pytest.approx(3.4 - 0.15)


def test_a_window_is_never_longer_than_max_window_s() -> None:
    policy = opened(SHORT_WINDOW, start_s=0.0)
    policy.heard(7.0)
    window = policy.plan(speaking(9.0, start_s=0.0))
    assert (window.start_s, window.end_s) == (5.0, 9.0)


def test_audio_no_decode_heard_is_worked_through_half_a_window_at_a_time() -> None:
    policy = opened(SHORT_WINDOW, start_s=0.0)
    upload = speaking(10.0, start_s=0.0)
    ends = []
    for _ in range(4):
        window = policy.plan(upload)
        policy.returned(False, 10.0)
        policy.heard(window.end_s)
        ends.append((window.start_s, window.end_s))
    assert ends == [(0.0, 2.0), (0.0, 4.0), (2.0, 6.0), (4.0, 8.0)]
    assert policy.undecoded_s(upload) == pytest.approx(2.0)


def test_an_utterance_longer_than_whisper_s_window_catches_up_before_its_whole_decode() -> None:
    policy = opened(start_s=0.0)
    stop = ended(40.0, voice_end_s=40.0, start_s=0.0)
    policy.heard(10.0)
    assert policy.next_kind(stop) == "catch_up"
    policy.plan(speaking(12.0, start_s=0.0))
    assert policy.next_kind(stop) is None, "a catch-up is a partial: one at a time"
    policy.returned(False, 10.0)
    policy.heard(39.0)
    assert policy.next_kind(stop) == "final"
    window = policy.plan(stop)
    # Not from the start: Whisper's window does not hold it all.
    assert window.final
    assert (window.start_s, window.end_s) == (25.0, 40.0)
    assert window.drop_before_s == 10.0


def test_a_new_utterance_forgets_what_the_last_one_heard_but_not_a_decode_still_out() -> None:
    policy = opened(start_s=0.0)
    policy.take_hypothesis(words(10), end_s=5.0)
    policy.take_hypothesis(words(10), end_s=5.0)
    policy.take_whole(candidate(5.0))
    policy.plan(speaking(6.0, start_s=0.0))
    policy.reset(7.0)
    assert (policy.committed, policy.tentative, policy.candidate) == ((), (), None)
    assert policy.in_flight
    assert policy.next_kind(speaking(8.0, start_s=7.0)) is None
    policy.returned(False, 10.0)
    assert policy.plan(speaking(8.0, start_s=7.0)) == DecodeWindow(False, 7.0, 8.0, 8.0, (), None)
