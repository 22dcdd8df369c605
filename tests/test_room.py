"""The endpointing bench's made-up rooms: noise at a measured SNR, pauses between words, where speech ends."""

from __future__ import annotations

import numpy as np
import pytest

from edge_asr.bench.room import (
    NOISE_KINDS,
    SPEECH_THRESHOLD,
    mix,
    pcm_to_samples,
    quietest_point,
    room_noise,
    samples_to_pcm,
    speech_end_s,
    speech_rms,
    with_pause,
)

from .speech import read_pcm, silence

pytestmark = pytest.mark.fast

RATE = 16000


def test_speech_ends_after_its_last_sample_above_the_threshold() -> None:
    samples = np.zeros(RATE, np.float32)
    samples[4000] = 0.5
    samples[7999] = -2 * SPEECH_THRESHOLD
    samples[9000] = SPEECH_THRESHOLD / 2  # too quiet to be speech
    assert speech_end_s(samples) == 8000 / RATE
    assert speech_end_s(np.zeros(RATE, np.float32)) == 0.0


def test_a_clip_s_speech_ends_before_its_trailing_silence() -> None:
    clip = pcm_to_samples(read_pcm("cmd_piper_joe_05") + silence(1.0))
    end = speech_end_s(clip)
    assert 0.5 < end <= len(clip) / RATE - 1.0


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_noise_is_mixed_in_at_the_asked_snr(kind: str) -> None:
    speech = pcm_to_samples(read_pcm("cmd_piper_joe_05"))
    rng = np.random.default_rng(1)
    noise = room_noise(kind, len(speech), rng)  # type: ignore[arg-type]
    assert float(np.sqrt(np.mean(np.square(noise)))) == pytest.approx(1.0, rel=1e-3)
    noisy = mix(speech, noise, 5.0)
    added = noisy - speech
    snr_db = 20 * np.log10(speech_rms(speech) / float(np.sqrt(np.mean(np.square(added)))))
    assert snr_db == pytest.approx(5.0, abs=0.01)


def test_the_hum_is_at_the_mains_frequency_and_the_fan_is_low_pitched() -> None:
    rng = np.random.default_rng(2)
    count = 4 * RATE
    frequencies = np.fft.rfftfreq(count, 1 / RATE)
    hum = np.abs(np.fft.rfft(room_noise("hum", count, rng)))
    assert frequencies[int(np.argmax(hum))] == pytest.approx(50.0, abs=0.5)
    fan = np.abs(np.fft.rfft(room_noise("fan", count, rng))) ** 2
    hiss = np.abs(np.fft.rfft(room_noise("hiss", count, rng))) ** 2
    low = frequencies < 500
    assert fan[low].sum() / fan.sum() > 0.8 > hiss[low].sum() / hiss.sum()


def test_a_pause_goes_in_at_the_quietest_point_between_two_words() -> None:
    samples = np.full(RATE, 0.3, np.float32)
    samples[5000:5300] = 0.001  # the gap between two words
    point = quietest_point(samples, 0.25, 0.4)
    assert 5000 / RATE <= point <= 5300 / RATE
    paused = with_pause(samples, point, 0.5)
    assert len(paused) == len(samples) + RATE // 2
    cut = int(point * RATE)
    assert not paused[cut : cut + RATE // 2].any()
    assert np.array_equal(paused[:cut], samples[:cut])
    assert np.array_equal(paused[cut + RATE // 2 :], samples[cut:])


def test_samples_go_back_to_the_same_pcm() -> None:
    pcm = read_pcm("cmd_piper_joe_05")
    assert samples_to_pcm(pcm_to_samples(pcm)) == pcm
    assert samples_to_pcm(np.array([2.0, -2.0], np.float32)) == np.array([32767, -32768], "<i2").tobytes()
