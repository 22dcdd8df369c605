"""Rooms made up for the endpointing bench: room noise (a fan, mains hum, hiss), speech mixed into it at a given
SNR, a pause put between two words, and where the speech in a clip ends."""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from ..audio import SAMPLE_RATE

Samples = npt.NDArray[np.float32]
NoiseKind = Literal["fan", "hum", "hiss"]
NOISE_KINDS: tuple[NoiseKind, ...] = ("fan", "hum", "hiss")
# A sample above this share of full scale is speech, not the quiet around it (sox's usual trim level, -40 dBFS).
SPEECH_THRESHOLD = 0.01
# Mains hum: the grid's frequency and the harmonics a transformer or a fridge adds.
_MAINS_HZ = 50.0
_HUM_HARMONICS = (1.0, 0.6, 0.35, 0.2, 0.1)
# A fan: broadband noise whose energy falls with frequency (a one-pole low-pass), rising and falling with its blades.
_FAN_SMOOTHING = 0.97
_FAN_BLADE_HZ = 12.0
_FAN_BLADE_DEPTH = 0.15


def pcm_to_samples(pcm: bytes) -> Samples:
    """s16le bytes as float samples in [-1, 1)."""
    return (np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)


def samples_to_pcm(samples: Samples) -> bytes:
    """Float samples as s16le bytes, clipped to full scale."""
    return bytes((np.clip(samples, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes())


def speech_end_s(samples: Samples) -> float:
    """Where speech ends: just after the last sample above `SPEECH_THRESHOLD` (0.0 for a clip without speech)."""
    loud = np.flatnonzero(np.abs(samples) > SPEECH_THRESHOLD)
    return 0.0 if not loud.size else float(loud[-1] + 1) / SAMPLE_RATE


def room_noise(kind: NoiseKind, count: int, rng: np.random.Generator) -> Samples:
    """`count` samples of a room's noise at an RMS of 1."""
    white = rng.standard_normal(count)
    if kind == "hiss":
        noise = white
    elif kind == "fan":
        low = np.empty(count)
        level = 0.0
        for index, value in enumerate(white):
            level = _FAN_SMOOTHING * level + (1 - _FAN_SMOOTHING) * value
            low[index] = level
        times = np.arange(count) / SAMPLE_RATE
        noise = low * (1 + _FAN_BLADE_DEPTH * np.sin(2 * np.pi * _FAN_BLADE_HZ * times))
    else:
        times = np.arange(count) / SAMPLE_RATE
        phases = rng.uniform(0, 2 * np.pi, len(_HUM_HARMONICS))
        noise = sum(
            weight * np.sin(2 * np.pi * _MAINS_HZ * (order + 1) * times + phase)
            for order, (weight, phase) in enumerate(zip(_HUM_HARMONICS, phases, strict=True))
        )
        noise = noise + 0.05 * white  # no hum is a pure tone
    rms = float(np.sqrt(np.mean(np.square(noise)))) or 1.0
    return (noise / rms).astype(np.float32)


def speech_rms(samples: Samples) -> float:
    """The RMS of the speech itself: of the 30 ms frames that hold a sample above `SPEECH_THRESHOLD`."""
    frame = SAMPLE_RATE * 30 // 1000
    whole = samples[: len(samples) - len(samples) % frame].reshape(-1, frame)
    loud = whole[np.abs(whole).max(axis=1) > SPEECH_THRESHOLD]
    return float(np.sqrt(np.mean(np.square(loud)))) if loud.size else 0.0


def mix(speech: Samples, noise: Samples, snr_db: float) -> Samples:
    """Speech with noise under it (as long as the speech), the noise scaled so that the speech is `snr_db` louder."""
    level = speech_rms(speech) / (10 ** (snr_db / 20))
    return (speech + level * noise[: len(speech)]).astype(np.float32)


def quietest_point(samples: Samples, start_s: float, end_s: float) -> float:
    """The quietest 10 ms between two times (the gap between two words): where a pause goes in."""
    step = SAMPLE_RATE // 100
    first, last = int(start_s * SAMPLE_RATE), int(end_s * SAMPLE_RATE)
    if last - first < step:
        return (start_s + end_s) / 2
    energies = [float(np.sum(np.square(samples[at : at + step]))) for at in range(first, last - step + 1, step)]
    return (first + step * int(np.argmin(energies)) + step // 2) / SAMPLE_RATE


def with_pause(samples: Samples, at_s: float, pause_s: float) -> Samples:
    """The clip with `pause_s` of digital silence put in at `at_s` (room noise goes over it when mixed)."""
    cut = int(at_s * SAMPLE_RATE)
    return np.concatenate([samples[:cut], np.zeros(int(pause_s * SAMPLE_RATE), np.float32), samples[cut:]])
