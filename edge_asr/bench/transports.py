"""The ways a clip reaches a recogniser (the engine in-process, a WebSocket server, a Wyoming server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from ..api import SessionRequest
from ..engine import Engine
from ..events import Done, Event, Final, Message, Partial, Ready, SessionError, message_from_dict
from .errors import BenchError
from .pacing import CHUNK_S, Replay, send_audio
from .timing import Playback, Received
from .wyoming_client import WyomingClient, WyomingReply, send_clip

READY_TIMEOUT_S = 30.0
MAX_WAIT_AFTER_END_S = 10.0
MAX_WAIT_AFTER_AUDIO_STOP_S = 30.0


class Transport(Protocol):
    """A way to reach the recogniser: plays one clip as one request and returns what came back."""

    async def play(self, pcm: bytes) -> Playback:
        """Send the clip (then silence and the end signal) and collect its events."""
        ...


class EngineTransport:
    """The engine in this process, one session per clip."""

    def __init__(self, engine: Engine, replay: Replay) -> None:
        self._engine = engine
        self._replay = replay

    async def play(self, pcm: bytes) -> Playback:
        """Feed the clip to a new session, then finish it."""
        received: list[Received] = []
        sent: list[tuple[float, float]] = []
        async with self._engine.session(SessionRequest(source="bench", names=self._replay.names)) as session:

            async def read() -> None:
                async for event in session.events():
                    received.append(Received(time.monotonic(), event))

            async def send(chunk: bytes) -> None:
                session.feed(chunk)

            reader = asyncio.create_task(read())
            await send_audio(pcm, self._replay, send, sent)
            end_at = time.monotonic()
            await session.finish()
        await reader
        return Playback(tuple(received), tuple(sent), end_at)


def read_message(raw: str | bytes) -> Message:
    """A server message; one that is not JSON or not a well-formed message becomes a `bad_message` error."""
    try:
        return message_from_dict(json.loads(raw))
    except ValueError as err:
        return SessionError("bad_message", f"unreadable server message {raw!r:.200}: {err!r}")


class WebSocketTransport:
    """A running server's `/ws/stream`, one connection per clip."""

    def __init__(self, url: str, replay: Replay) -> None:
        self._url = url
        self._replay = replay

    async def play(self, pcm: bytes) -> Playback:
        """Connect, wait for `ready`, send the names (a `config` message), stream the clip, send `end` and read
        until the clip is done."""
        try:
            async with connect(self._url, open_timeout=READY_TIMEOUT_S, max_size=None) as ws:
                return await self._play(ws, pcm)
        except (OSError, WebSocketException, asyncio.TimeoutError) as err:
            raise BenchError(f"{self._url}: {err or type(err).__name__}") from None

    async def _play(self, ws: ClientConnection, pcm: bytes) -> Playback:
        first = read_message(await asyncio.wait_for(ws.recv(), READY_TIMEOUT_S))
        if not isinstance(first, Ready):
            error = (
                first
                if isinstance(first, SessionError)
                else SessionError("no_ready", f"the server's first message was {first.kind!r}, not ready")
            )
            return Playback((Received(time.monotonic(), error),), (), time.monotonic())
        received: list[Received] = []

        async def read() -> bool:
            """Record events until `done`; False when the server closed first."""
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    at = time.monotonic()
                    message = read_message(raw)
                    if isinstance(message, Event):
                        received.append(Received(at, message))
                    if isinstance(message, Done):
                        return True
            return False

        reader = asyncio.create_task(read())
        sent: list[tuple[float, float]] = []
        with contextlib.suppress(ConnectionClosed):
            if self._replay.names:
                await ws.send(json.dumps({"type": "config", "vocabulary": list(self._replay.names)}))
            await send_audio(pcm, self._replay, ws.send, sent)
            await ws.send(json.dumps({"type": "end"}))
        end_at = time.monotonic()
        try:
            finished = await asyncio.wait_for(reader, MAX_WAIT_AFTER_END_S)
            problem = None if finished else SessionError("closed", "the server closed the connection before done")
        except asyncio.TimeoutError:
            problem = SessionError("no_done", f"no done message within {MAX_WAIT_AFTER_END_S:g} s of the end")
        if problem is not None and not any(isinstance(item.event, SessionError) for item in received):
            received.append(Received(time.monotonic(), problem))
        return Playback(tuple(received), tuple(sent), end_at)


class WyomingReplies:
    """A Wyoming server's replies to one request as bench events.

    `transcript-chunk`s add up to the text so far (a partial); `transcript` is the final. The request is
    answered at `transcript-stop` or, from a server that sent no `transcript-start`, at `transcript` or `error`.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._text = ""
        self._streaming = False

    def add(self, at: float, reply: WyomingReply) -> bool:
        """Record one reply received at `at`; True when it answers the request."""
        if reply.kind == "transcript-start":
            self._streaming = True
        elif reply.kind == "transcript-chunk":
            self._text += reply.text
            self.received.append(Received(at, Partial(self._text, self._text, utterance=1, asr_ms=0, e2e_ms=0)))
        elif reply.kind == "transcript":
            final = Final(reply.text, utterance=1, asr_ms=0, e2e_ms=0, ttct_ms=0, start=0.0, end=0.0)
            self.received.append(Received(at, final))
        elif reply.kind == "error":
            self.received.append(Received(at, SessionError(reply.code or "error", reply.text)))
        return reply.kind == "transcript-stop" or (not self._streaming and reply.kind in ("transcript", "error"))


class WyomingTransport:
    """A Wyoming speech-to-text server (edge-asr's or another), one connection and one request per clip."""

    def __init__(self, uri: str, language: str, replay: Replay, context: Mapping[str, Any] | None = None) -> None:
        self._uri = uri
        self._language = language
        self._replay = replay
        self._context = context

    async def play(self, pcm: bytes) -> Playback:
        """Connect, send transcribe (with the names and the context), audio-start, the clip and audio-stop, and read
        until the transcript."""
        try:
            client = WyomingClient(self._uri, READY_TIMEOUT_S, self._replay.names, self._context)
        except ValueError as err:
            raise BenchError(f"--wyoming {err}") from None
        try:
            async with client:
                return await self._play(client, pcm)
        except (OSError, asyncio.TimeoutError) as err:
            raise BenchError(f"{self._uri}: {err or type(err).__name__}") from None

    async def _play(self, client: WyomingClient, pcm: bytes) -> Playback:
        replies = WyomingReplies()

        async def read() -> bool:
            """Record replies until the request is answered; False when the server closed first."""
            while (reply := await client.reply()) is not None:
                if replies.add(time.monotonic(), reply):
                    return True
            return False

        reader = asyncio.create_task(read())
        sent: list[tuple[float, float]] = []
        with contextlib.suppress(ConnectionError):
            await client.ask(self._language)
            replay = self._replay
            await send_clip(
                client.connection,
                pcm,
                trailing_s=replay.trailing_silence_s,
                realtime=replay.realtime,
                chunk_s=CHUNK_S,
                sent=sent,
            )
        end_at = time.monotonic()
        try:
            finished = await asyncio.wait_for(reader, MAX_WAIT_AFTER_AUDIO_STOP_S)
            problem = None if finished else SessionError("closed", "the server closed the connection before answering")
        except asyncio.TimeoutError:
            problem = SessionError(
                "no_transcript", f"no transcript within {MAX_WAIT_AFTER_AUDIO_STOP_S:g} s of audio-stop"
            )
        if problem is not None and not any(isinstance(item.event, SessionError) for item in replies.received):
            replies.received.append(Received(time.monotonic(), problem))
        return Playback(tuple(replies.received), tuple(sent), end_at, timed=False)
