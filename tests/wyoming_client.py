"""Wyoming for the tests: a satellite's request through the `wyoming` package's client, and raw wire bytes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from dataclasses import dataclass

from wyoming.asr import Transcribe, Transcript, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event, read_event

CHUNK_S = 0.1


@dataclass
class Received:
    """An event and when it arrived."""

    event: Event
    at: float


async def read_until(client: AsyncTcpClient, last_type: str, timeout_s: float = 30.0) -> list[Received]:
    """Events up to and including the first of `last_type`; fails when the server closes first."""
    received: list[Received] = []
    while True:
        event = await asyncio.wait_for(client.read_event(), timeout_s)
        assert event is not None, "connection closed early"
        received.append(Received(event, time.monotonic()))
        if event.type == last_type:
            return received


async def send_clip(
    client: AsyncTcpClient, pcm: bytes, rate: int = 16000, width: int = 2, channels: int = 1, trailing_s: float = 0.3
) -> float:
    """Paced audio-start, chunks and audio-stop; returns when audio-stop was sent."""
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    frame = width * channels
    audio = pcm + bytes(int(trailing_s * rate) * frame)
    step = int(CHUNK_S * rate) * frame
    started = time.monotonic()
    for offset in range(0, len(audio), step):
        await client.write_event(
            AudioChunk(rate=rate, width=width, channels=channels, audio=audio[offset : offset + step]).event()
        )
        delay = started + (offset + step) / (rate * frame) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    await client.write_event(AudioStop().event())
    return time.monotonic()


async def transcribe(port: int, pcm: bytes, **audio: int) -> tuple[list[Received], float]:
    """One satellite request on a new connection: its events and when `audio-stop` was sent."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        reader = asyncio.create_task(read_until(client, TranscriptStop().event().type))
        stop_at = await send_clip(client, pcm, **audio)
        return await reader, stop_at


def transcript_text(received: list[Received]) -> str:
    """The text of the request's `transcript`."""
    return next(Transcript.from_event(r.event).text for r in received if Transcript.is_type(r.event.type))


def raw_exchange(port: int, data: bytes, wait_s: float = 5.0, linger_s: float = 0.5) -> tuple[list[Event], bool]:
    """Write raw bytes; read events back with the wyoming framing until an info or error event, the server
    closing, or `wait_s`; return them and whether the server closed the connection."""
    events: list[Event] = []
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        with contextlib.suppress(ConnectionError):  # the server may close before it read everything
            sock.sendall(data)
        stream = sock.makefile("rb")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                event = read_event(stream)
            except ConnectionError:  # closed with bytes of ours unread: a reset after the events it sent
                return events, True
            except OSError:  # the read timed out
                return events, False
            if event is None:
                return events, True
            events.append(event)
            if event.type in ("info", "error"):
                # a connection the server means to close is closed right after the error
                deadline = min(deadline, time.monotonic() + linger_s)
    return events, False


def wire_event(event_type: str, data: dict[str, object] | None = None, payload: bytes = b"") -> bytes:
    """An event's bytes on the wire, built by hand (so tests can also build wrong ones)."""
    header: dict[str, object] = {"type": event_type, "data": data or {}}
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header).encode() + b"\n" + payload


def error_codes(port: int, data: bytes, wait_s: float = 5.0) -> tuple[list[str], bool]:
    """The error codes the server answers raw bytes with, and whether it closed the connection."""
    events, closed = raw_exchange(port, data, wait_s)
    return [str(Error.from_event(e).code) for e in events if Error.is_type(e.type)], closed


async def async_exchange(
    port: int, data: bytes, until: str = "info", timeout_s: float = 5.0
) -> tuple[list[Event], bool]:
    """Write raw bytes on a new connection (from inside an event loop) and read events back until one of type
    `until` or the server closing the connection; return them and whether it closed. AssertionError when
    neither happens within `timeout_s`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    events: list[Event] = []

    async def collect() -> bool:
        while True:
            try:
                event = await async_read_event(reader)
            except ConnectionError:  # closed with bytes of ours unread: a reset after the events it sent
                return True
            if event is None:
                return True
            events.append(event)
            if event.type == until:
                return False

    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):  # the server may close before it read everything
            await writer.drain()
        closed = await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise AssertionError(f"neither {until!r} nor a close within {timeout_s} s; got {events}") from None
    finally:
        writer.close()
    return events, closed
