"""Sending a clip in chunks at the pace it would be spoken (or as fast as the other side takes it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..audio import SAMPLE_RATE, SAMPLE_WIDTH

CHUNK_S = 0.02
CHUNK_BYTES = int(CHUNK_S * SAMPLE_RATE) * SAMPLE_WIDTH


@dataclass(frozen=True)
class Replay:
    """How clips are sent: paced in real time or not, the digital silence after each, and the household's names
    every request carries (none: the request says nothing of names, as before they existed)."""

    realtime: bool
    trailing_silence_s: float
    names: tuple[str, ...] = ()


async def send_audio(
    pcm: bytes,
    replay: Replay,
    send: Callable[[bytes], Awaitable[None]],
    sent: list[tuple[float, float]] | None = None,
    rate: int = SAMPLE_RATE,
    frame_bytes: int = SAMPLE_WIDTH,
    chunk_s: float = CHUNK_S,
) -> None:
    """Send the clip and its trailing silence in chunks of `chunk_s` (16 kHz mono s16le unless `rate` and
    `frame_bytes` say otherwise), appending (audio seconds sent, time) per chunk to `sent`."""
    bytes_per_second = rate * frame_bytes
    audio = pcm + bytes(int(replay.trailing_silence_s * rate) * frame_bytes)
    step = int(chunk_s * rate) * frame_bytes
    started = time.monotonic()
    for offset in range(0, len(audio), step):
        chunk = audio[offset : offset + step]
        position_s = (offset + len(chunk)) / bytes_per_second
        if replay.realtime:
            # Paced against an absolute schedule, so a late send does not delay every chunk after it.
            delay = started + position_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)
        if sent is not None:
            sent.append((position_s, time.monotonic()))
        await send(chunk)
