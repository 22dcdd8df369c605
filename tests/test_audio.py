"""The PCM converter: any width, channel count and rate to 16 kHz mono s16le, chunk by chunk."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from edge_asr.audio import SAMPLE_RATE, PcmConverter

pytestmark = pytest.mark.fast

TONE_HZ = 440.0
AMPLITUDE = 0.3  # of full scale
SECONDS = 1.0
# Irregular chunk sizes in frames, cycled: odd boundaries, single frames, chunks shorter than an output step.
CHUNK_FRAMES = (1000, 333, 1, 2, 4410, 57)
# numpy's type and full scale of each sample width (8-bit is unsigned, centred on 128).
FORMATS = {1: ("u1", 127.0), 2: ("<i2", 32767.0), 4: ("<i4", 2147483647.0)}
U8_ZERO = 128
S16_FULL = 32767.0

Samples = npt.NDArray[np.float64]


def tone(rate: int, seconds: float = SECONDS) -> Samples:
    """A 440 Hz sine at `rate`, as a fraction of full scale."""
    return AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * np.arange(round(rate * seconds)) / rate)


def encode(channels: list[Samples], width: int) -> bytes:
    """Interleaved PCM of that width from per-channel signals in [-1, 1]."""
    dtype, full = FORMATS[width]
    frames = np.stack(channels, axis=1) * full
    if width == 1:
        frames += U8_ZERO
    return np.rint(frames).astype(dtype).tobytes()


def split(pcm: bytes, frame: int) -> list[bytes]:
    """The PCM cut into CHUNK_FRAMES-sized chunks (cycled)."""
    chunks, offset, index = [], 0, 0
    while offset < len(pcm):
        size = CHUNK_FRAMES[index % len(CHUNK_FRAMES)] * frame
        chunks.append(pcm[offset : offset + size])
        offset, index = offset + size, index + 1
    return chunks


def samples(pcm: bytes) -> Samples:
    """16 kHz s16le as a fraction of full scale."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64) / S16_FULL


def zero_crossing_hz(signal: Samples, rate: int) -> float:
    """The frequency of a sine from its sign changes."""
    changes = np.count_nonzero(np.diff(np.signbit(signal)))
    return changes / 2 / (len(signal) / rate)


@pytest.mark.parametrize(
    ("rate", "width", "channels"),
    [(44_100, 2, 2), (48_000, 2, 3), (16_000, 1, 1), (22_050, 4, 1), (1_000, 2, 1), (8_000, 1, 3)],
    ids=["44k-stereo", "48k-3ch", "16k-8bit", "22k-32bit", "1k", "8k-8bit-3ch"],
)
def test_a_tone_comes_out_at_16k_with_its_length_and_frequency_whatever_the_chunking(
    rate: int, width: int, channels: int
) -> None:
    pcm = encode([tone(rate)] * channels, width)
    converter = PcmConverter()
    frame = width * channels
    outputs = [converter.convert(chunk, rate, width, channels) for chunk in split(pcm, frame)]

    step = SAMPLE_RATE / rate  # outputs per input frame
    frames_in = samples_out = 0
    for index, (chunk, output) in enumerate(zip(split(pcm, frame), outputs, strict=True)):
        if index:  # the first chunk's last frame waits for the next one to interpolate towards
            assert abs(len(output) // 2 - len(chunk) // frame * step) <= 1
        frames_in, samples_out = frames_in + len(chunk) // frame, samples_out + len(output) // 2
        assert -1 < frames_in * step - samples_out <= step, "never more than one input frame behind"
    out = samples(b"".join(outputs))
    assert zero_crossing_hz(out, SAMPLE_RATE) == pytest.approx(TONE_HZ, rel=0.01)
    # Chunk boundaries leave no trace: the chunks convert to exactly what the whole signal does.
    assert out.tobytes() == samples(PcmConverter().convert(pcm, rate, width, channels)).tobytes()


@pytest.mark.parametrize(("rate", "width"), [(44_100, 2), (48_000, 4), (16_000, 2), (22_050, 1)])
def test_resampling_follows_the_tone_without_a_jump_at_any_chunk_boundary(rate: int, width: int) -> None:
    converter = PcmConverter()
    pcm = encode([tone(rate)], width)
    out = samples(b"".join(converter.convert(chunk, rate, width, 1) for chunk in split(pcm, width)))

    expected = tone(SAMPLE_RATE)[: len(out)]
    quantum = 1 / FORMATS[width][1]
    # Linear interpolation of a 440 Hz tone sampled at 22 kHz or more errs by well under 1 % of its amplitude.
    assert np.max(np.abs(out - expected)) < 0.01 * AMPLITUDE + quantum


def test_16k_mono_16_bit_passes_unchanged() -> None:
    pcm = encode([tone(SAMPLE_RATE)], 2)
    converter = PcmConverter()

    assert b"".join(converter.convert(chunk, SAMPLE_RATE, 2, 1) for chunk in split(pcm, 2)) == pcm


def test_three_channels_with_one_silent_average_to_a_third_of_their_sum() -> None:
    left, right = np.full(160, 300, dtype="<i2"), np.full(160, -900, dtype="<i2")
    pcm = np.stack([left, right, np.zeros(160, dtype="<i2")], axis=1).tobytes()

    out = np.frombuffer(PcmConverter().convert(pcm, SAMPLE_RATE, 2, 3), dtype="<i2")

    assert out.tolist() == [-200] * 160


@pytest.mark.parametrize(
    ("width", "frame", "value"),
    [
        (1, bytes([U8_ZERO]), 0),
        (1, bytes([255]), 127 * 256),
        (1, bytes([0]), -32768),
        (4, (1000 * 65536).to_bytes(4, "little", signed=True), 1000),
        (4, (-(2**31)).to_bytes(4, "little", signed=True), -32768),
    ],
    ids=["u8-centre", "u8-top", "u8-bottom", "s32", "s32-bottom"],
)
def test_8_bit_is_unsigned_and_32_bit_signed(width: int, frame: bytes, value: int) -> None:
    out = np.frombuffer(PcmConverter().convert(frame * 4, SAMPLE_RATE, width, 1), dtype="<i2")

    assert out.tolist() == [value] * 4


def test_a_chunk_of_partial_frames_is_refused_and_leaves_the_stream_as_it_was() -> None:
    pcm = encode([tone(44_100, 0.1)] * 2, 2)
    first, second = pcm[:4000], pcm[4000:]
    converter = PcmConverter()
    untouched = PcmConverter()

    converter.convert(first, 44_100, 2, 2)
    untouched.convert(first, 44_100, 2, 2)
    with pytest.raises(ValueError, match="not whole 4-byte frames"):
        converter.convert(second[:6], 44_100, 2, 2)

    assert converter.convert(second, 44_100, 2, 2) == untouched.convert(second, 44_100, 2, 2)


def test_a_rate_that_changes_between_chunks_is_taken_as_announced() -> None:
    converter = PcmConverter()
    first = converter.convert(encode([tone(48_000, 0.5)], 2), 48_000, 2, 1)
    second = converter.convert(encode([tone(8_000, 0.5)], 2), 8_000, 2, 1)

    assert abs(len(first) // 2 - SAMPLE_RATE / 2) <= 1
    assert abs(len(second) // 2 - SAMPLE_RATE / 2) <= 2
    assert zero_crossing_hz(samples(second), SAMPLE_RATE) == pytest.approx(TONE_HZ, rel=0.01)


@pytest.mark.parametrize(("rate", "width", "channels"), [(1_000, 1, 1), (44_100, 2, 2), (7_919, 4, 3)])
def test_converted_size_bounds_every_chunk(rate: int, width: int, channels: int) -> None:
    converter = PcmConverter()
    frame = width * channels
    for chunk in split(encode([tone(rate)] * channels, width), frame):
        assert len(converter.convert(chunk, rate, width, channels)) <= converter.converted_size(
            len(chunk), rate, width, channels
        )
