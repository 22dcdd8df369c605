"""Unit tests for the audio buffer: positions, slicing, dropping and arrival times."""

from __future__ import annotations

import numpy as np
import pytest

from edge_asr.stream_audio import AudioBuffer

pytestmark = pytest.mark.fast

BYTES_PER_S = 32_000


def ramp(samples: int, first: int = 0) -> bytes:
    """s16le samples that each say where they are (modulo 2**15), so a slice shows which audio it holds."""
    return ((np.arange(first, first + samples) % 32768).astype("<i2")).tobytes()


def filled(chunks: int, chunk_samples: int = 320, start_now: float = 100.0) -> AudioBuffer:
    """A buffer fed `chunks` chunks of the ramp, chunk i arriving at start_now + i."""
    buffer = AudioBuffer()
    for index in range(chunks):
        buffer.append(ramp(chunk_samples, index * chunk_samples), start_now + index)
    return buffer


def test_an_empty_buffer_holds_nothing_and_knows_no_arrival() -> None:
    buffer = AudioBuffer()
    assert (buffer.start_s, buffer.end_s) == (0.0, 0.0)
    assert buffer.slice(0.0, 1.0) == b""
    assert buffer.arrival_of(0.5) == 0.0


def test_appending_moves_the_end_by_the_audio_appended() -> None:
    buffer = AudioBuffer()
    buffer.append(ramp(320), 1.0)
    buffer.append(ramp(8000), 2.0)
    assert buffer.end_s == pytest.approx((320 + 8000) * 2 / BYTES_PER_S)
    assert buffer.start_s == 0.0


def test_a_slice_is_the_audio_between_two_positions() -> None:
    buffer = filled(10)  # 10 chunks of 20 ms: samples 0..3199
    assert buffer.slice(0.02, 0.05) == ramp(480, first=320)
    assert buffer.slice(0.0, buffer.end_s) == ramp(3200)


def test_a_slice_beyond_the_audio_held_is_cut_to_it() -> None:
    buffer = filled(5)
    assert buffer.slice(-1.0, 0.02) == ramp(320)
    assert buffer.slice(0.08, 5.0) == ramp(320, first=1280)
    assert buffer.slice(0.06, 0.03) == b""


def test_dropping_forgets_the_audio_before_a_time_and_keeps_positions() -> None:
    buffer = filled(10)
    buffer.drop_before(0.05)
    assert buffer.start_s == pytest.approx(0.05)
    assert buffer.end_s == pytest.approx(0.2)
    # Positions still name the same audio; what was dropped is gone from a slice that reaches back.
    assert buffer.slice(0.06, 0.08) == ramp(320, first=960)
    assert buffer.slice(0.0, 0.06) == ramp(160, first=800)


def test_dropping_before_the_oldest_audio_changes_nothing() -> None:
    buffer = filled(10)
    buffer.drop_before(0.1)
    buffer.drop_before(0.04)
    assert buffer.start_s == pytest.approx(0.1)
    assert buffer.slice(0.0, buffer.end_s) == ramp(1600, first=1600)


def test_dropping_past_the_end_keeps_whole_samples_and_an_end_after_the_start() -> None:
    buffer = AudioBuffer()
    buffer.append(ramp(100) + b"\x01", 1.0)  # a half sample at the end
    buffer.drop_before(10.0)
    assert buffer.start_s == pytest.approx(100 / 16_000)
    assert buffer.slice(0.0, 10.0) == b"\x01"
    buffer.append(b"\x02" + ramp(10), 2.0)
    assert buffer.slice(buffer.start_s, buffer.end_s) == b"\x01\x02" + ramp(10)


def test_the_arrival_of_a_position_is_that_of_the_chunk_holding_it() -> None:
    buffer = filled(10)
    assert buffer.arrival_of(0.0) == 100.0
    assert buffer.arrival_of(0.03) == 101.0
    assert buffer.arrival_of(0.04) == 101.0  # the end of the second chunk
    assert buffer.arrival_of(0.19) == 109.0
    assert buffer.arrival_of(7.0) == 109.0  # past the end: the newest arrival


def test_arrivals_outlive_dropped_audio_but_not_a_long_stream() -> None:
    buffer = filled(5000)
    buffer.drop_before(99.0)
    assert buffer.arrival_of(buffer.end_s) == 100.0 + 4999
    # Only the newest 4096 chunks' arrivals are kept: an older position gets the oldest one kept.
    assert buffer.arrival_of(0.0) == 100.0 + 5000 - 4096
    assert buffer.arrival_of(95.0) == 100.0 + 4749
