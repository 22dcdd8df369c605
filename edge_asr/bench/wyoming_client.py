"""The Wyoming client of the bench and the tests: speaks to any Wyoming speech-to-text server as a satellite does
(`transcribe`, `audio-start`, paced `audio-chunk`s, `audio-stop`) and reads its transcript events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.event import Event

from ..audio import SAMPLE_RATE, SAMPLE_WIDTH
from .pacing import Replay, send_audio

# A satellite's chunks when the caller does not choose: 0.1 s, as Home Assistant's satellites send them.
CLIP_CHUNK_S = 0.1
READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WyomingReply:
    """An event from a Wyoming server as plain values: its type (e.g. "transcript-chunk"), text and error code."""

    kind: str
    text: str = ""
    code: str = ""


@dataclass(frozen=True)
class ReceivedEvent:
    """A Wyoming event and the monotonic time it arrived."""

    event: Event
    at: float


def reply_of(event: Event) -> WyomingReply:
    """A server's event as a WyomingReply; a malformed transcript or error event becomes a `bad_event` error."""
    try:
        if Transcript.is_type(event.type):
            return WyomingReply(event.type, Transcript.from_event(event).text)
        if TranscriptChunk.is_type(event.type):
            return WyomingReply(event.type, TranscriptChunk.from_event(event).text)
        if Error.is_type(event.type):
            error = Error.from_event(event)
            return WyomingReply(event.type, error.text, error.code or "")
    except (KeyError, TypeError, ValueError) as err:
        return WyomingReply("error", f"malformed {event.type} event: {err!r}", "bad_event")
    return WyomingReply(event.type)


async def read_until(client: AsyncClient, last_type: str, timeout_s: float = READ_TIMEOUT_S) -> list[ReceivedEvent]:
    """Events up to and including the first of `last_type`; ConnectionError when the server closes first."""
    received: list[ReceivedEvent] = []
    while True:
        event = await asyncio.wait_for(client.read_event(), timeout_s)
        if event is None:
            raise ConnectionError(f"the server closed the connection before {last_type}")
        received.append(ReceivedEvent(event, time.monotonic()))
        if event.type == last_type:
            return received


async def send_clip(
    client: AsyncClient,
    pcm: bytes,
    rate: int = SAMPLE_RATE,
    width: int = SAMPLE_WIDTH,
    channels: int = 1,
    trailing_s: float = 0.3,
    *,
    realtime: bool = True,
    chunk_s: float = CLIP_CHUNK_S,
    sent: list[tuple[float, float]] | None = None,
) -> float:
    """`audio-start`, the clip and `trailing_s` of silence in `audio-chunk`s (paced unless not `realtime`, each
    recorded in `sent`) and `audio-stop`; returns when `audio-stop` was sent."""
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())

    async def chunk(audio: bytes) -> None:
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())

    replay = Replay(realtime, trailing_s)
    await send_audio(pcm, replay, chunk, sent, rate=rate, frame_bytes=width * channels, chunk_s=chunk_s)
    await client.write_event(AudioStop().event())
    return time.monotonic()


class WyomingClient:
    """One connection to a Wyoming speech-to-text server (tcp:// or unix://), asking as a satellite does; `names` go
    in `transcribe`'s `transcript_names` (Wyoming 1.10), `context` (e.g. the satellite's site) in its context."""

    def __init__(
        self,
        uri: str,
        connect_timeout_s: float,
        names: tuple[str, ...] = (),
        context: Mapping[str, Any] | None = None,
    ) -> None:
        parts = urlsplit(uri)
        if not ((parts.scheme == "tcp" and parts.hostname and parts.port) or (parts.scheme == "unix" and parts.path)):
            raise ValueError(f"{uri}: expected tcp://HOST:PORT or unix://PATH")
        self.connection = AsyncClient.from_uri(uri, connect_timeout=connect_timeout_s)
        self._names = names
        self._context = dict(context) if context else None

    async def __aenter__(self) -> WyomingClient:
        """Connect."""
        await self.connection.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Disconnect."""
        with contextlib.suppress(ConnectionError):
            await self.connection.disconnect()

    async def ask(self, language: str | None) -> None:
        """Ask for a transcript: `transcribe`, with the names and the context if any."""
        # Without names the field is left out, as a satellite that knows none sends it.
        names = list(self._names) or None
        await self.connection.write_event(
            Transcribe(language=language, transcript_names=names, context=self._context).event()
        )

    async def reply(self) -> WyomingReply | None:
        """The server's next event; None once it closed the connection."""
        try:
            event = await self.connection.read_event()
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        except ValueError as err:
            return WyomingReply("error", f"unreadable event: {err}", "bad_event")
        return None if event is None else reply_of(event)


async def transcribe(
    port: int, pcm: bytes, rate: int = SAMPLE_RATE, width: int = SAMPLE_WIDTH, channels: int = 1
) -> tuple[list[ReceivedEvent], float]:
    """One satellite request (in English) to the server on a loopback `port`, on a new connection: its events up to
    `transcript-stop` and when `audio-stop` was sent."""
    async with WyomingClient(f"tcp://127.0.0.1:{port}", READ_TIMEOUT_S) as client:
        await client.ask("en")
        reader = asyncio.create_task(read_until(client.connection, TranscriptStop().event().type))
        stop_at = await send_clip(client.connection, pcm, rate, width, channels)
        return await reader, stop_at


def transcript_text(received: list[ReceivedEvent]) -> str:
    """The text of the request's `transcript`."""
    return next(Transcript.from_event(r.event).text for r in received if Transcript.is_type(r.event.type))
