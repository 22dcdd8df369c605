"""Unit tests for the utterance tracker, driven by real speech: starts, ends, and ends that wait for a final."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from edge_asr.config import LimitSettings, StreamSettings
from edge_asr.stream_audio import AudioBuffer
from edge_asr.utterance import UtteranceState, UtteranceTracker
from edge_asr.vad import VadGate

from .speech import BYTES_PER_S, read_pcm, silence

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

    def feed(self, pcm: bytes) -> None:
        for offset in range(0, len(pcm), CHUNK_BYTES):
            chunk = pcm[offset : offset + CHUNK_BYTES]
            self.now += len(chunk) / BYTES_PER_S
            self.audio.append(chunk, self.now)
            if self.tracker.push(chunk, self.now):
                self.opened_at.append(self.audio.end_s)

    def end_of_audio(self) -> None:
        self.now += 0.005
        self.tracker.end_of_audio(self.now)

    def close(self) -> None:
        """What the session does once the final is out: the audio up to the end goes, the tracker moves on."""
        assert self.tracker.end_s is not None
        self.audio.drop_before(self.tracker.end_s)
        self.tracker.close()


def feeder(*, split_on_silence: bool = True, max_utterance_s: float = 30.0) -> Feeder:
    audio = AudioBuffer()
    limits = LimitSettings(max_utterance_s=max_utterance_s)
    tracker = UtteranceTracker(StreamSettings(), limits, audio, split_on_silence=split_on_silence)
    return Feeder(tracker, audio)


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
    assert feed.tracker.start_s == cut_s
    assert feed.tracker.end_s == stop_s
    assert feed.tracker.end_wall == feed.now
