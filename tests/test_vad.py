"""Unit tests for the webrtcvad speech gate in edge_asr.vad, on real speech from the shipped corpus."""

from __future__ import annotations

import pytest
import webrtcvad

from edge_asr.vad import WEBRTC_FRAME_BYTES as FRAME_BYTES
from edge_asr.vad import WEBRTC_FRAME_MS as FRAME_MS
from edge_asr.vad import VadChange, VadGate, VadPause, WebRtcFrames

from .speech import BYTES_PER_S, RATE, read_pcm, silence, voiced

pytestmark = pytest.mark.fast

FRAME_S = FRAME_MS / 1000
AGGRESSIVENESS = 2


def voiced_frames(pcm: bytes) -> list[bool]:
    """Independent oracle: webrtcvad's verdict on each whole 30 ms frame, from the stream start."""
    vad = webrtcvad.Vad(AGGRESSIVENESS)
    return [vad.is_speech(pcm[i : i + FRAME_BYTES], RATE) for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]


def push_in_chunks(gate: VadGate, pcm: bytes, sizes: list[int]) -> list[VadChange]:
    """Feed pcm in chunks whose sizes cycle through `sizes`; collect every change."""
    changes: list[VadChange] = []
    offset, index = 0, 0
    while offset < len(pcm):
        size = sizes[index % len(sizes)]
        changes += gate.push(pcm[offset : offset + size])
        offset += size
        index += 1
    return changes


LEAD_S = 0.3
SPEECH = "cmd_piper_joe_03"  # "set the thermostat to seventy two degrees"


def utterance(trailing_s: float = 1.0) -> bytes:
    """0.3 s of silence, one spoken command, then trailing digital silence."""
    return silence(LEAD_S) + read_pcm(SPEECH) + silence(trailing_s)


def test_speech_gives_one_start_then_one_end() -> None:
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    changes = gate.push(utterance())
    assert [change.speaking for change in changes] == [True, False]
    start, end = changes
    speech_end_s = LEAD_S + len(read_pcm(SPEECH)) / BYTES_PER_S
    assert LEAD_S - FRAME_S < start.at_s < LEAD_S + 2 * FRAME_S
    assert start.at_s < end.at_s <= speech_end_s + 3 * FRAME_S
    assert gate.speaking is False


def test_start_is_the_first_voiced_frame() -> None:
    pcm = utterance()
    flags = voiced_frames(pcm)
    first_voiced = flags.index(True)
    changes = VadGate(WebRtcFrames(AGGRESSIVENESS), 350).push(pcm)
    vote_frame = next(i for i in range(len(flags)) if sum(flags[max(0, i - 4) : i + 1]) >= 3)
    assert changes[0].speaking
    assert changes[0].at_s == pytest.approx(first_voiced * FRAME_S)
    assert changes[0].detected_s == pytest.approx((vote_frame + 1) * FRAME_S)


def test_start_is_reported_once_three_of_five_frames_are_voiced() -> None:
    pcm = utterance()
    flags = voiced_frames(pcm)
    vote_frame = next(i for i in range(len(flags)) if sum(flags[max(0, i - 4) : i + 1]) >= 3)
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    for index in range(len(flags)):
        changes = gate.push(pcm[index * FRAME_BYTES : (index + 1) * FRAME_BYTES])
        if changes:
            break
    assert index == vote_frame
    assert changes[0].speaking


def test_silence_gives_no_change() -> None:
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    assert gate.push(read_pcm("silence_3s")) == []
    assert gate.speaking is False
    assert gate.last_voice_end_s == 0.0


def test_speaking_while_speech_goes_on() -> None:
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    speech = read_pcm(SPEECH)
    changes = gate.push(silence(LEAD_S) + speech[: len(speech) // 2])
    assert [change.speaking for change in changes] == [True]
    assert gate.speaking is True


def test_end_is_at_the_last_voiced_frame() -> None:
    pcm = utterance()
    flags = voiced_frames(pcm)
    last_voiced_end_s = (len(flags) - flags[::-1].index(True)) * FRAME_S
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    changes = gate.push(pcm)
    assert changes[-1].speaking is False
    assert changes[-1].at_s == pytest.approx(last_voiced_end_s)
    assert changes[-1].detected_s == pytest.approx(last_voiced_end_s + 12 * FRAME_S)
    assert gate.last_voice_end_s == pytest.approx(last_voiced_end_s)


def end_position(silence_ms: int, pcm: bytes) -> tuple[float, VadChange]:
    """Feed pcm one frame at a time; return how much audio was in when the end came, and the end."""
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), silence_ms)
    for offset in range(0, len(pcm), FRAME_BYTES):
        for change in gate.push(pcm[offset : offset + FRAME_BYTES]):
            if not change.speaking:
                return (offset + FRAME_BYTES) / BYTES_PER_S, change
    raise AssertionError("no end of speech reported")


@pytest.mark.parametrize("silence_ms", [300, 350, 600])
def test_end_comes_after_silence_ms_of_non_speech_and_not_before(silence_ms: int) -> None:
    """The end needs silence_ms of non-speech after the last voiced frame (and comes within a frame of it)."""
    heard_s, end = end_position(silence_ms, utterance(trailing_s=silence_ms / 1000 + 0.5))
    silence_heard_s = heard_s - end.at_s
    assert silence_heard_s >= silence_ms / 1000 - 1e-9
    assert silence_heard_s < silence_ms / 1000 + FRAME_S


@pytest.mark.parametrize("silence_ms", [300, 350])
def test_no_end_while_the_silence_is_shorter_than_silence_ms(silence_ms: int) -> None:
    """Speech, then 10 ms less non-speech than silence_ms after the last voiced frame: no end yet."""
    speech = silence(LEAD_S) + read_pcm(SPEECH)
    flags = voiced_frames(speech + silence(1.0))
    last_voiced_end_s = (len(flags) - flags[::-1].index(True)) * FRAME_S
    pcm = (speech + silence(1.0))[: round((last_voiced_end_s + silence_ms / 1000 - 0.01) * RATE) * 2]
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), silence_ms)
    changes = gate.push(pcm)
    assert [change.speaking for change in changes] == [True]
    assert gate.speaking is True


@pytest.mark.parametrize("sizes", [[7, 1, 961, 2, 13, 640, 9], [640], [1], [959, 961]])
def test_chunked_feed_gives_the_same_changes_as_whole(sizes: list[int]) -> None:
    pcm = utterance() + read_pcm("cmd_piper_joe_01") + silence(1.0)
    assert len(pcm) % 2 == 0
    whole_gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    whole = whole_gate.push(pcm)
    chunked_gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    chunked = push_in_chunks(chunked_gate, pcm, sizes)
    assert [change.speaking for change in whole] == [True, False, True, False]
    assert chunked == whole
    assert chunked_gate.last_voice_end_s == whole_gate.last_voice_end_s


def test_empty_push_changes_nothing() -> None:
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    assert gate.push(b"") == []
    assert gate.push(silence(LEAD_S) + read_pcm(SPEECH)[: FRAME_BYTES * 20]) != []
    assert gate.push(b"") == []
    assert gate.speaking is True


def test_reset_forgets_speech_and_the_next_speech_starts_anew() -> None:
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    speech = read_pcm(SPEECH)
    head = silence(LEAD_S) + speech[: len(speech) // 2 // FRAME_BYTES * FRAME_BYTES]
    assert [change.speaking for change in gate.push(head)] == [True]
    gate.reset()
    assert gate.speaking is False
    # The speech goes on: it is a new start, placed after the reset point, then an end.
    changes = gate.push(speech[len(head) - round(LEAD_S * RATE) * 2 :] + silence(1.0))
    assert [change.speaking for change in changes] == [True, False]
    reset_at_s = len(head) / BYTES_PER_S
    assert reset_at_s - 1e-9 <= changes[0].at_s < reset_at_s + 6 * FRAME_S


def test_reset_during_silence_changes_nothing() -> None:
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    gate.push(silence(0.6))
    gate.reset()
    assert gate.push(silence(0.6)) == []
    assert gate.speaking is False


def test_reset_keeps_the_stream_position() -> None:
    """`reset()` forgets the speech state, "not the stream position": later times stay stream positions."""
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    for _ in range(10):
        gate.push(silence(FRAME_S / 2))  # half a frame, held back until the frame is whole
        gate.reset()
    pushed_s = 10 * FRAME_S / 2
    changes = gate.push(silence(LEAD_S) + read_pcm(SPEECH) + silence(1.0))
    onset_s = pushed_s + LEAD_S
    assert changes[0].speaking is True
    assert onset_s - FRAME_S < changes[0].at_s < onset_s + 2 * FRAME_S


def test_a_pause_inside_speech_is_heard_from_the_last_voiced_frame_to_the_next() -> None:
    pcm = silence(LEAD_S) + voiced(2.0) + silence(0.3) + voiced(1.0) + silence(1.0)
    flags = voiced_frames(pcm)
    gaps = [index for index in range(1, len(flags) - 1) if flags[index - 1] and not flags[index]]
    resumes = [index for index in range(1, len(flags)) if flags[index] and not flags[index - 1]]
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    start, pause, end = gate.hear(pcm)
    assert isinstance(start, VadChange)
    assert isinstance(pause, VadPause)
    assert isinstance(end, VadChange)
    assert pause.start_s == pytest.approx(gaps[0] * FRAME_S)
    assert pause.end_s == pytest.approx(resumes[1] * FRAME_S)
    assert 0 < pause.length_s < 0.35, "shorter than silence_ms: the speech did not end"
    assert (start, end) == tuple(VadGate(WebRtcFrames(AGGRESSIVENESS), 350).push(pcm))
    assert [change.speaking for change in (start, end)] == [True, False]


def test_a_pause_between_two_speeches_is_heard_when_the_second_starts() -> None:
    pcm = silence(LEAD_S) + voiced(1.0) + silence(1.0) + voiced(1.0) + silence(1.0)
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    first_start, first_end, pause, second_start, second_end = gate.hear(pcm)
    assert isinstance(first_end, VadChange)
    assert isinstance(second_start, VadChange)
    assert pause == VadPause(first_end.at_s, second_start.at_s)
    changes = VadGate(WebRtcFrames(AGGRESSIVENESS), 350).push(pcm)
    assert changes == [first_start, first_end, second_start, second_end]


def test_no_pause_before_the_first_speech_nor_across_a_reset() -> None:
    gate = VadGate(WebRtcFrames(AGGRESSIVENESS), 350)
    assert [type(event) for event in gate.hear(silence(1.0) + voiced(1.0) + silence(1.0))] == [VadChange, VadChange]
    gate.reset()
    assert [type(event) for event in gate.hear(silence(1.0) + voiced(1.0) + silence(1.0))] == [VadChange, VadChange]
