"""The bench's Wyoming client: speaks to any Wyoming speech-to-text server as a satellite does."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error

from ..audio import SAMPLE_RATE, SAMPLE_WIDTH


@dataclass(frozen=True)
class WyomingReply:
    """An event from a Wyoming server as plain values: its type (e.g. "transcript-chunk"), text and error code."""

    kind: str
    text: str = ""
    code: str = ""


class WyomingClient:
    """One connection to a Wyoming speech-to-text server (tcp:// or unix://), sending what a satellite sends;
    `names` go in `transcribe`'s `transcript_names` (Wyoming 1.10)."""

    def __init__(self, uri: str, connect_timeout_s: float, names: tuple[str, ...] = ()) -> None:
        parts = urlsplit(uri)
        if not ((parts.scheme == "tcp" and parts.hostname and parts.port) or (parts.scheme == "unix" and parts.path)):
            raise ValueError(f"{uri}: expected tcp://HOST:PORT or unix://PATH")
        self._client = AsyncClient.from_uri(uri, connect_timeout=connect_timeout_s)
        self._names = names

    async def __aenter__(self) -> WyomingClient:
        """Connect."""
        await self._client.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Disconnect."""
        with contextlib.suppress(ConnectionError):
            await self._client.disconnect()

    async def start(self, language: str | None) -> None:
        """Ask for a transcript (`transcribe`, with the names if any) and announce 16 kHz mono s16le audio
        (`audio-start`)."""
        # Without names the field is left out, as a satellite that knows none sends it.
        names = list(self._names) or None
        await self._client.write_event(Transcribe(language=language, transcript_names=names).event())
        await self._client.write_event(AudioStart(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=1).event())

    async def send(self, pcm: bytes) -> None:
        """One `audio-chunk` of 16 kHz mono s16le audio."""
        await self._client.write_event(AudioChunk(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=1, audio=pcm).event())

    async def stop(self) -> None:
        """End the audio (`audio-stop`); the server answers with its transcript."""
        await self._client.write_event(AudioStop().event())

    async def reply(self) -> WyomingReply | None:
        """The server's next event; None once it closed the connection."""
        try:
            event = await self._client.read_event()
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        except ValueError as err:
            return WyomingReply("error", f"unreadable event: {err}", "bad_event")
        if event is None:
            return None
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
