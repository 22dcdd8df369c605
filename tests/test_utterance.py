"""Unit tests for the utterance tracker, driven by real speech: starts, ends, and ends that wait for a final."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from edge_asr.config import LimitSettings, StreamSettings
from edge_asr.stream_audio import AudioBuffer
from edge_asr.utterance import UtteranceState, UtteranceTracker
from edge_asr.vad import VadGate, VadPause

from .speech import BYTES_PER_S, read_pcm, silence, voiced

pytestmark = pytest.mark.fast

CHUNK_BYTES = 640  # 20 ms
FRAME_S = VadGate.of(StreamSettings()).frame_s
# The frames of non-speech after which the VAD ends speech (stream.silence_ms).
SILENCE_FRAMES = math.ceil(StreamSettings().silence_ms / 1000 / FRAME_S - 1e-9)
PREROLL_S = StreamSettings().preroll_ms / 1000
COMMAND = "cmd_piper_joe_03"


def voice(pcm: bytes) -> tuple[list[float], float]:
    """Where the tracker's VAD puts the speech starts in a stream of pcm, and the end of its last voiced frame."""
    gate = VadGate.of(StreamSettings())
    starts = [change.at_s for change in gate.push(pcm) if change.speaking]
    return starts, gate.last_voice_end_s


@dataclass
class Feeder:
    """Feeds the buffer and its tracker 20 ms chunks on a fake clock."""

    tracker: UtteranceTracker
    audio: AudioBuffer
    now: float = 1000.0
    opened_at: list[float] = field(default_factory=list)
    # With `fast_finals`, each utterance is closed as soon as it ends (its final took no time), and kept here.
    fast_finals: bool = False
    closed: list[UtteranceState] = field(default_factory=list)

    def feed(self, pcm: bytes) -> None:
        for offset in range(0, len(pcm), CHUNK_BYTES):
            chunk = pcm[offset : offset + CHUNK_BYTES]
            self.now += len(chunk) / BYTES_PER_S
            self.audio.append(chunk, self.now)
            if self.tracker.push(chunk, self.now):
                self.opened_at.append(self.audio.end_s)
            while self.fast_finals and self.tracker.ending:
                self.close()

    def end_of_audio(self) -> None:
        self.now += 0.005
        self.tracker.end_of_audio(self.now)

    def close(self) -> None:
        """What the session does once the final is out: the audio up to the end goes, the tracker moves on."""
        assert self.tracker.end_s is not None
        self.closed.append(self.tracker.state())
        self.audio.drop_before(self.tracker.end_s)
        self.tracker.close()

    def close_all(self) -> None:
        """Give every utterance that ended (and those that end as the speech that waited is applied) its final."""
        while self.tracker.ending:
            self.close()


def feeder(*, split_on_silence: bool = True, max_utterance_s: float = 30.0, fast_finals: bool = False) -> Feeder:
    audio = AudioBuffer()
    limits = LimitSettings(max_utterance_s=max_utterance_s)
    tracker = UtteranceTracker(StreamSettings(), limits, audio, split_on_silence=split_on_silence)
    return Feeder(tracker, audio, fast_finals=fast_finals)


def test_silence_opens_nothing_and_its_end_ends_nothing() -> None:
    feed = feeder()
    feed.feed(read_pcm("silence_3s"))
    feed.end_of_audio()
    assert feed.opened_at == []
    assert feed.tracker.state() == UtteranceState(None, None, 0.0, feed.audio.end_s)
    assert not feed.tracker.active
    assert not feed.tracker.ending


def test_speech_opens_one_utterance_with_its_preroll_and_a_pause_ends_it() -> None:
    pcm = silence(0.6) + read_pcm(COMMAND) + silence(1.0)
    (first_voiced_s,), last_voiced_s = voice(pcm)
    feed = feeder()
    feed.feed(pcm)
    assert len(feed.opened_at) == 1
    assert feed.opened_at[0] < first_voiced_s + 0.2, "the VAD decides a start within a few frames"
    assert feed.tracker.start_s == pytest.approx(first_voiced_s - PREROLL_S)
    assert feed.tracker.ending
    assert feed.tracker.voice_end_s == pytest.approx(last_voiced_s)
    # The end is decided after silence_ms (350 ms: 12 frames) of unvoiced frames.
    assert feed.tracker.end_s == pytest.approx(last_voiced_s + SILENCE_FRAMES * FRAME_S)
    # Its wall time is when the audio at the end of the voice arrived, not when the end was decided.
    assert feed.tracker.end_wall == feed.audio.arrival_of(last_voiced_s)
    assert feed.tracker.end_wall < feed.now - 0.5


def test_the_preroll_reaches_no_further_back_than_the_audio_held() -> None:
    feed = feeder()
    feed.feed(silence(1.0))
    feed.audio.drop_before(0.9)
    feed.feed(read_pcm(COMMAND))
    assert feed.tracker.start_s == pytest.approx(0.9)


def test_without_splitting_on_silence_only_the_end_of_audio_ends_the_utterance() -> None:
    pcm = silence(0.3) + read_pcm(COMMAND) + silence(1.5)
    _, last_voiced_s = voice(pcm)
    feed = feeder(split_on_silence=False)
    feed.feed(pcm)
    assert feed.tracker.active
    assert not feed.tracker.ending
    assert feed.tracker.voice_end_s == pytest.approx(last_voiced_s)
    feed.end_of_audio()
    assert feed.tracker.end_s == pytest.approx(len(pcm) / BYTES_PER_S)
    assert feed.tracker.voice_end_s == pytest.approx(last_voiced_s)
    assert feed.tracker.end_wall == feed.now
    assert feed.tracker.state().audio_end_s == feed.tracker.end_s


def test_a_long_utterance_ends_at_max_utterance_s_and_the_rest_opens_the_next() -> None:
    feed = feeder(max_utterance_s=1.0)
    feed.feed(silence(0.5) + read_pcm(COMMAND)[: BYTES_PER_S * 2])
    start_s, end_s = feed.tracker.start_s, feed.tracker.end_s
    assert start_s is not None
    assert end_s is not None
    assert 1.0 <= end_s - start_s < 1.0 + CHUNK_BYTES / BYTES_PER_S
    assert feed.tracker.voice_end_s == end_s, "the voice goes on through a forced end"
    feed.close()
    # The speech still going on is the next utterance, from where the last one was cut.
    assert feed.tracker.start_s == end_s
    assert not feed.tracker.ending
    assert len(feed.opened_at) == 1, "the next utterance opened at close, not by a push"


def test_speech_while_an_utterance_waits_for_its_final_opens_the_next_at_close() -> None:
    first = silence(0.3) + read_pcm(COMMAND) + silence(1.0)
    second = silence(0.5) + read_pcm(COMMAND) + silence(1.0)
    feed = feeder()
    feed.feed(first)
    ended = feed.tracker.state()
    feed.feed(second)
    # Nothing changes while the final is not out: the next speech (and its end) wait.
    assert feed.tracker.state() == UtteranceState(ended.start_s, ended.end_s, ended.voice_end_s, feed.audio.end_s)
    assert len(feed.opened_at) == 1
    feed.close()
    (_, second_voiced_s), last_voiced_s = voice(first + second)
    assert feed.tracker.start_s == pytest.approx(second_voiced_s - PREROLL_S)
    assert feed.tracker.voice_end_s == pytest.approx(last_voiced_s)
    assert feed.tracker.end_s == pytest.approx(last_voiced_s + SILENCE_FRAMES * FRAME_S)
    feed.close()
    assert not feed.tracker.active


def test_an_end_of_audio_while_a_final_is_pending_ends_the_speech_after_it() -> None:
    first = silence(0.3) + read_pcm(COMMAND) + silence(1.0)
    second = silence(0.5) + read_pcm(COMMAND)[:BYTES_PER_S]
    feed = feeder()
    feed.feed(first)
    first_end_s = feed.tracker.end_s
    feed.feed(second)
    (_, second_voiced_s), last_voiced_s = voice(first + second)
    feed.end_of_audio()
    stop_wall, stop_s = feed.now, feed.audio.end_s
    assert feed.tracker.end_s == first_end_s, "the end waits for the final of the utterance before"
    feed.close()
    assert feed.tracker.start_s == pytest.approx(second_voiced_s - PREROLL_S)
    assert (feed.tracker.end_s, feed.tracker.end_wall) == (stop_s, stop_wall)
    assert feed.tracker.voice_end_s == pytest.approx(last_voiced_s)
    # Audio after the end of audio is a new request: its speech must start afresh.
    feed.close()
    assert not feed.tracker.active


def test_an_end_of_audio_during_speech_cut_by_max_utterance_s_ends_the_rest() -> None:
    feed = feeder(max_utterance_s=1.0)
    feed.feed(silence(0.3) + read_pcm(COMMAND)[: round(BYTES_PER_S * 1.8) // 2 * 2])
    cut_s = feed.tracker.end_s
    feed.end_of_audio()
    stop_s = feed.audio.end_s
    feed.close()
    assert feed.tracker.start_s == pytest.approx(cut_s)
    assert feed.tracker.end_s == stop_s
    assert feed.tracker.end_wall == feed.now


# --- splitting an utterance that reaches max_utterance_s -----------------------------------------------------------

LEAD_S = 0.5
# Where the VAD starts the voice after LEAD_S of silence, and so the utterance (its preroll before).
UTTERANCE_START_S = voice(silence(LEAD_S) + voiced(1.0))[0][0] - PREROLL_S
# Silences the VAD hears as pauses inside speech, shorter than stream.silence_ms (they end no utterance), and one
# that ends speech.
SHORT_SILENCE_S = 0.3
LONG_SILENCE_S = 0.45
ENDING_SILENCE_S = 0.8


def talk(end_s: float, silences: dict[float, float]) -> bytes:
    """LEAD_S of silence, then a voice until `end_s` (stream seconds) with silences {at_s: length_s} in it."""
    pcm = silence(LEAD_S)
    for at_s, length_s in sorted(silences.items()):
        pcm += voiced(at_s - len(pcm) / BYTES_PER_S) + silence(length_s)
    return pcm + voiced(end_s - len(pcm) / BYTES_PER_S)


def pauses_in(pcm: bytes) -> list[VadPause]:
    """The pauses the tracker's VAD hears in a stream of pcm, in order."""
    return [event for event in VadGate.of(StreamSettings()).hear(pcm) if isinstance(event, VadPause)]


def split_point(pause: VadPause) -> float:
    """Where an utterance split at this pause ends and the next starts: the next one's preroll where the pause holds
    it, and at least half of the pause."""
    return max((pause.start_s + pause.end_s) / 2, pause.end_s - PREROLL_S)


@pytest.mark.parametrize("fast_finals", [True, False], ids=["final-at-once", "final-after-the-rest"])
@pytest.mark.parametrize("split_on_silence", [True, False], ids=["websocket", "wyoming"])
@pytest.mark.parametrize(
    ("silences", "chosen_at_s"),
    [
        ({20.0: LONG_SILENCE_S, 26.0: SHORT_SILENCE_S}, 20.0),
        ({20.0: SHORT_SILENCE_S, 26.0: LONG_SILENCE_S}, 26.0),
        ({8.0: LONG_SILENCE_S, 20.0: SHORT_SILENCE_S, 26.0: SHORT_SILENCE_S}, 26.0),
    ],
    ids=["longer-first", "longer-later", "equal-later"],
)
def test_a_long_utterance_ends_at_the_longest_pause_of_its_second_half_and_the_speech_after_it_is_the_next(
    silences: dict[float, float], chosen_at_s: float, split_on_silence: bool, fast_finals: bool
) -> None:
    pcm = talk(33.0, silences) + silence(ENDING_SILENCE_S)
    pauses = {float(round(pause.start_s)): pause for pause in pauses_in(pcm)}
    assert set(pauses) == set(silences), "each silence is one pause to the VAD"
    chosen = pauses[chosen_at_s]
    _, last_voiced_s = voice(pcm)
    feed = feeder(split_on_silence=split_on_silence, fast_finals=fast_finals)
    feed.feed(pcm)
    if not split_on_silence:
        feed.end_of_audio()
    feed.close_all()

    first, second = feed.closed
    assert first.start_s == pytest.approx(UTTERANCE_START_S)
    assert first.voice_end_s == chosen.start_s
    assert first.end_s == split_point(chosen)
    assert chosen.start_s < split_point(chosen) < chosen.end_s
    # Nothing is lost: the next utterance starts where the first ended, before the voice comes back, and holds the
    # rest of the speech.
    assert second.start_s == pytest.approx(first.end_s)
    assert second.voice_end_s == pytest.approx(last_voiced_s)
    assert len(feed.opened_at) == 1, "the next utterance opened at the split, not at a later speech start"
    assert not feed.tracker.active


def test_in_a_wyoming_request_a_pause_that_ends_speech_is_a_split_too() -> None:
    pcm = talk(33.0, {20.0: ENDING_SILENCE_S, 26.0: LONG_SILENCE_S})
    pauses = pauses_in(pcm)
    assert [change.speaking for change in VadGate.of(StreamSettings()).push(pcm)] == [True, False, True]
    feed = feeder(split_on_silence=False)
    feed.feed(pcm)
    assert feed.tracker.voice_end_s == pauses[0].start_s
    assert feed.tracker.end_s == split_point(pauses[0])
    feed.close()
    assert feed.tracker.start_s == pytest.approx(split_point(pauses[0]))
    assert not feed.tracker.ending


def test_without_a_pause_in_the_second_half_the_latest_pause_is_the_split() -> None:
    pcm = talk(31.0, {5.0: LONG_SILENCE_S, 10.0: SHORT_SILENCE_S})
    _, latest = pauses_in(pcm)
    feed = feeder()
    feed.feed(pcm)
    assert feed.tracker.voice_end_s == latest.start_s
    assert feed.tracker.end_s == split_point(latest)
    feed.close()
    assert feed.tracker.start_s == pytest.approx(split_point(latest))


@pytest.mark.parametrize("split_on_silence", [True, False], ids=["websocket", "wyoming"])
def test_without_any_pause_the_utterance_is_cut_at_the_limit_and_the_speech_goes_on_as_the_next(
    split_on_silence: bool,
) -> None:
    pcm = talk(32.0, {})
    assert pauses_in(pcm) == []
    feed = feeder(split_on_silence=split_on_silence)
    feed.feed(pcm)
    assert feed.tracker.start_s == pytest.approx(UTTERANCE_START_S)
    assert feed.tracker.end_s == feed.tracker.voice_end_s
    assert 30.0 <= feed.tracker.end_s - UTTERANCE_START_S < 30.0 + CHUNK_BYTES / BYTES_PER_S
    cut_s = feed.tracker.end_s
    feed.close()
    assert feed.tracker.start_s == pytest.approx(cut_s)
    assert not feed.tracker.ending


def test_a_pause_going_on_at_the_limit_is_the_split_and_the_voice_after_it_opens_the_next() -> None:
    # The voice stops just before the limit (30 s after the utterance start), in a pause shorter than silence_ms.
    pcm = talk(30.0, {5.0: LONG_SILENCE_S}) + silence(SHORT_SILENCE_S) + voiced(2.0) + silence(ENDING_SILENCE_S)
    _, resumed = pauses_in(pcm)
    feed = feeder()
    fed = 0
    while not feed.tracker.ending:
        feed.feed(pcm[fed : fed + CHUNK_BYTES])
        fed += CHUNK_BYTES
    assert feed.audio.end_s < resumed.end_s, "the limit came in the pause"
    assert feed.tracker.voice_end_s == resumed.start_s, "the pause going on is the latest, and in the second half"
    assert feed.tracker.end_s == split_point(VadPause(resumed.start_s, feed.audio.end_s))
    feed.close()
    assert not feed.tracker.active, "no voice after the pause yet"
    feed.feed(pcm[fed:])
    # The next utterance opens where the VAD hears the voice again, with the preroll the pause still holds.
    split_s = feed.closed[0].end_s
    assert split_s is not None
    assert feed.tracker.start_s == pytest.approx(max(split_s, resumed.end_s - PREROLL_S))
    assert feed.tracker.ending
    assert len(feed.opened_at) == 2


def test_the_pauses_after_the_split_are_the_next_utterances_own() -> None:
    # The next utterance reaches the limit too, with no pause in its second half: its latest pause is one it took
    # over from the first.
    pcm = talk(52.0, {20.0: LONG_SILENCE_S, 26.0: SHORT_SILENCE_S})
    longer, later = pauses_in(pcm)
    feed = feeder(fast_finals=True)
    feed.feed(pcm)
    first, second = feed.closed
    assert first.voice_end_s == longer.start_s
    assert second.start_s == pytest.approx(split_point(longer))
    assert second.voice_end_s == later.start_s
    assert feed.tracker.start_s == pytest.approx(split_point(later))


def test_the_pauses_remembered_stay_few_when_the_vad_flaps() -> None:
    # A voice that stops for one to seven VAD frames every quarter second, for longer than the limit.
    pcm = silence(LEAD_S) + b"".join(voiced(0.12) + silence(0.1 + 0.05 * (index % 5)) for index in range(130))
    heard = pauses_in(pcm)
    lengths = {round(pause.length_s / FRAME_S) for pause in heard}
    assert len(heard) > 100
    feed = feeder()
    remembered = 0
    for offset in range(0, len(pcm), CHUNK_BYTES):
        feed.feed(pcm[offset : offset + CHUNK_BYTES])
        if feed.tracker.ending:
            break
        remembered = max(remembered, len(feed.tracker._pauses))
    assert feed.tracker.ending
    # Each pause remembered is longer than all after it: no more of them than there are lengths.
    assert remembered <= len(lengths)
    # The split is still at the longest pause of the second half, the latest of that length.
    second_half = [p for p in heard if p.start_s >= UTTERANCE_START_S + 15.0 and p.end_s <= feed.audio.end_s]
    longest = max(pause.length_s for pause in second_half)
    best = [p for p in second_half if p.length_s > longest - 1e-6][-1]
    assert feed.tracker.voice_end_s == best.start_s
