"""How a voice ends: the pitch of its last voiced frames against the pitch of the whole utterance."""

from __future__ import annotations

import numpy as np

from .audio import SAMPLE_RATE, FloatAudio

# A frame every 10 ms, each 40 ms long: two periods of the lowest voice.
_HOP = SAMPLE_RATE // 100
_WINDOW = SAMPLE_RATE * 40 // 1000
# The pitch of speaking voices, from the lowest end of a man's statement to children.
_MIN_LAG = SAMPLE_RATE // 400
_MAX_LAG = SAMPLE_RATE // 60
# A frame is voiced when it repeats itself this well one period later (normalised correlation), and is not much
# quieter than the loud frames of the utterance (breath, the tail of a fricative, a fading voice tracked an octave
# off): their level is the 90th percentile, which silence before or after the voice does not move.
_MIN_PERIODICITY = 0.6
_MIN_RELATIVE_RMS = 0.25
_LOUD_PERCENTILE = 90
# Lags whose correlation comes this close to the frame's best are as good a period.
_NEAR_BEST = 0.9
# The end of the voice: its last voiced frames (about 80 ms); fewer voiced frames than this in all tell nothing.
_FINAL_FRAMES = 8


def final_pitch_st(audio: FloatAudio) -> float | None:
    """The pitch at the end of the voice in `audio`, in semitones above (negative: below) the median pitch of all its
    voiced frames; None when too little of it is voiced to tell.

    A statement's voice falls at its end; a phrase that goes on stays level or rises. The medians make the measure
    robust to a frame tracked an octave off.
    """
    pitches = _pitches(np.asarray(audio, dtype=np.float32))
    if len(pitches) < 2 * _FINAL_FRAMES:
        return None
    return float(12 * np.log2(np.median(pitches[-_FINAL_FRAMES:]) / np.median(pitches)))


def _pitches(audio: FloatAudio) -> np.ndarray:
    """The pitch in Hz of each voiced frame, in order."""
    span = _WINDOW + _MAX_LAG
    if len(audio) < span + _HOP:
        return np.empty(0)
    frames = np.lib.stride_tricks.sliding_window_view(audio, span)[::_HOP].astype(np.float64)
    heads = frames[:, :_WINDOW]
    levels = np.sqrt(np.mean(np.square(heads), axis=1))
    loud = levels >= _MIN_RELATIVE_RMS * np.percentile(levels, _LOUD_PERCENTILE)
    frames, heads = frames[loud], heads[loud]
    if not len(frames):
        return np.empty(0)
    # Each frame's head against the frame shifted by every lag, at once: a correlation by FFT.
    size = 1 << (span + _WINDOW - 1).bit_length()
    products = np.fft.irfft(np.fft.rfft(frames, size) * np.conj(np.fft.rfft(heads, size)), size)
    lags = np.arange(_MIN_LAG, _MAX_LAG)
    dots = products[:, lags]
    energy = np.concatenate([np.zeros((len(frames), 1)), np.cumsum(np.square(frames), axis=1)], axis=1)
    shifted = energy[:, lags + _WINDOW] - energy[:, lags]
    correlation = dots / (np.sqrt(np.sum(np.square(heads), axis=1))[:, None] * np.sqrt(shifted) + 1e-12)
    # A periodic frame repeats itself after two and three periods as well as after one: its period is the first peak
    # near the best, not the best (which would put the pitch an octave or more too low, a fall that is not there).
    near = correlation >= _NEAR_BEST * np.max(correlation, axis=1, keepdims=True)
    from_first = np.arange(len(lags)) >= np.argmax(near, axis=1)[:, None]
    first_run = near & from_first & (np.cumsum(~near & from_first, axis=1) == 0)
    best = np.argmax(np.where(first_run, correlation, -np.inf), axis=1)
    voiced = correlation[np.arange(len(frames)), best] > _MIN_PERIODICITY
    return np.asarray(SAMPLE_RATE / lags[best[voiced]], dtype=np.float64)
