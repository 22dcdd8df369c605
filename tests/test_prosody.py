"""The pitch at the end of a voice: on voiced sounds of known pitch, on real speech, and on anything at all."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_asr.audio import SAMPLE_RATE, pcm16_to_float
from edge_asr.prosody import final_pitch_st

from .speech import read_pcm, silence

pytestmark = pytest.mark.fast


def voiced(pitch_hz: list[float], seconds: float) -> np.ndarray:
    """A vowel-like sound (five harmonics) whose pitch glides through `pitch_hz`, between 0.3 s of silence."""
    count = int(seconds * SAMPLE_RATE)
    contour = np.interp(np.linspace(0, 1, count), np.linspace(0, 1, len(pitch_hz)), pitch_hz)
    phase = 2 * np.pi * np.cumsum(contour) / SAMPLE_RATE
    sound = sum(np.sin(k * phase) / k for k in range(1, 6))
    quiet = np.zeros(int(0.3 * SAMPLE_RATE))
    return np.concatenate([quiet, 0.2 * sound, quiet]).astype(np.float32)


def semitones(high_hz: float, low_hz: float) -> float:
    return float(12 * np.log2(high_hz / low_hz))


def test_a_voice_that_falls_at_its_end_ends_below_its_median() -> None:
    # Level at 150 Hz, then down to 110 Hz over its last fifth.
    pitch = final_pitch_st(voiced([150, 150, 150, 150, 150, 110], 1.5))
    assert pitch is not None
    assert pitch < -semitones(150, 125)


def test_a_voice_that_rises_or_stays_level_does_not_end_low() -> None:
    rising = final_pitch_st(voiced([120, 120, 120, 120, 120, 170], 1.5))
    level = final_pitch_st(voiced([140], 1.5))
    assert rising is not None
    assert rising > semitones(150, 120)
    assert level == pytest.approx(0.0, abs=0.3)


def test_the_measure_holds_across_voices_from_low_to_high() -> None:
    for base_hz in (90.0, 200.0, 320.0):
        pitch = final_pitch_st(voiced([base_hz, base_hz, base_hz, base_hz * 0.8], 1.5))
        assert pitch is not None
        assert pitch == pytest.approx(-semitones(1.0, 0.8), abs=1.0)


def test_silence_noise_and_a_blip_tell_nothing() -> None:
    assert final_pitch_st(np.zeros(SAMPLE_RATE, np.float32)) is None
    noise = np.random.default_rng(1).normal(0, 0.1, SAMPLE_RATE).astype(np.float32)
    assert final_pitch_st(noise) is None
    assert final_pitch_st(voiced([150], 0.08)) is None
    assert final_pitch_st(np.zeros(10, np.float32)) is None


def test_a_spoken_statement_ends_falling() -> None:
    # "Set the thermostat to seventy two degrees.", as a voice says it, with the silence a whole decode has after it.
    pitch = final_pitch_st(pcm16_to_float(silence(0.3) + read_pcm("cmd_piper_joe_03") + silence(0.3)))
    assert pitch is not None
    assert pitch < -1.5


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float32,
        st.integers(0, 3 * SAMPLE_RATE),
        elements=st.floats(-1.0, 1.0, width=32),
    )
)
def test_any_audio_gives_a_finite_pitch_or_none(audio: np.ndarray) -> None:
    pitch = final_pitch_st(audio)
    assert pitch is None or np.isfinite(pitch)
