"""The soak's clients: Wyoming satellites, WebSocket speakers, and WebSocket clients that vanish mid-utterance, read
late or never read; each plays one clip in real time and records what it got."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from ..events import Done, Final, Message, Partial, Ready, SessionError
from .errors import BenchError
from .pacing import Replay, send_audio
from .timing import Playback
from .transports import READY_TIMEOUT_S, WyomingTransport, read_message

ClientKind = Literal["wyoming", "websocket", "vanishing", "slow-reader", "never-reader"]
# How a client's connection ended: it got its `done` or transcript; it went away mid-utterance on purpose; the
# service closed it; it gave up on a service that did not close it; the soak's time was up; something went wrong.
Ending = Literal["done", "vanished", "cut off", "gave up", "run ended", "failed"]

# As long as a Wyoming satellite waits for its transcript (WyomingTransport's limit for the bench).
DONE_TIMEOUT_S = 30.0
# A receive buffer this small fills with a few events, so a client that does not read stalls the service's sends.
SMALL_RCVBUF = 4096
# How long the slow reader reads nothing before reading everything.
SLOW_READER_PAUSE_S = 3.0
# A never-reading client that the service has not cut off by then is a missed target (and is closed by the soak).
NEVER_READER_GIVE_UP_S = 120.0
_END = json.dumps({"type": "end"})


@dataclass(frozen=True)
class ReceivedFinal:
    """A final as a client received it (Wyoming: the request's transcript, as utterance 1)."""

    utterance: int
    text: str


@dataclass(frozen=True)
class ClientRun:
    """One client's life: who it was, what it sent and received, and how it ended.

    `session` is the service's session number from `ready` (None for Wyoming, whose protocol does not say).
    `owed` lists the utterances it saw partials of but left before their final: the service then still owes
    their finals to MQTT. `spoke_unread` marks a never-reading client that spoke a clip with words: at least one
    final of its session must reach MQTT. `cut_off_after_s` is connect → the service closing the connection.
    """

    kind: ClientKind
    site: str
    clip: str
    started_s: float
    audio_s: float
    session: int | None
    finals: tuple[ReceivedFinal, ...]
    owed: tuple[int, ...]
    spoke_unread: bool
    ended: Ending
    cut_off_after_s: float | None
    errors: tuple[str, ...]


class _Inbox:
    """What a WebSocket client read: its session number, finals and errors, and the utterances shown as partials
    whose final has not come."""

    def __init__(self) -> None:
        self.session: int | None = None
        self.finals: list[ReceivedFinal] = []
        self.errors: list[str] = []
        self._open: set[int] = set()
        # Set once a partial came: the service then owes the client that utterance's final.
        self.partial_shown = asyncio.Event()

    def add(self, message: Message) -> bool:
        """Record a server message; True at `done`."""
        if isinstance(message, Ready):
            self.session = message.session
        elif isinstance(message, Partial):
            # A session that showed a partial always sends the utterance's final, even an empty one.
            self._open.add(message.utterance)
            self.partial_shown.set()
        elif isinstance(message, Final):
            self.finals.append(ReceivedFinal(message.utterance, message.text))
            self._open.discard(message.utterance)
        elif isinstance(message, SessionError):
            self.errors.append(f"{message.code}: {message.message}")
        return isinstance(message, Done)

    @property
    def owed(self) -> tuple[int, ...]:
        """Utterances shown as partials whose final did not come."""
        return tuple(sorted(self._open))

    def run(
        self,
        kind: ClientKind,
        site: str,
        clip: str,
        started_s: float,
        audio_s: float,
        ended: Ending,
        spoke_unread: bool = False,
        cut_off_after_s: float | None = None,
    ) -> ClientRun:
        """The client's record."""
        return ClientRun(
            kind=kind,
            site=site,
            clip=clip,
            started_s=started_s,
            audio_s=audio_s,
            session=self.session,
            finals=tuple(self.finals),
            owed=self.owed,
            spoke_unread=spoke_unread,
            ended=ended,
            cut_off_after_s=cut_off_after_s,
            errors=tuple(self.errors),
        )


def _audio_s(sent: Sequence[tuple[float, float]]) -> float:
    """Seconds of audio a `send_audio` sent, from its record of (audio seconds sent, time) per chunk."""
    return sent[-1][0] if sent else 0.0


def site_url(url: str, site: str) -> str:
    """`/ws/stream` with the client's site in the query."""
    return f"{url}?{urlencode({'site': site})}"


@contextlib.asynccontextmanager
async def _connect(url: str, small_rcvbuf: bool = False, keepalive: bool = True) -> AsyncIterator[ClientConnection]:
    """A WebSocket connection; with `small_rcvbuf` its socket buffers little and the library reads no further than
    one message ahead, so not reading stalls the service's sends as a slow device would."""
    sock: socket.socket | None = None
    if small_rcvbuf:
        parts = urlsplit(url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
        except OSError:
            sock.close()
            raise
    async with connect(
        url,
        sock=sock,
        open_timeout=READY_TIMEOUT_S,
        max_size=None,
        max_queue=1 if small_rcvbuf else 16,
        # Without pings of its own, a client that does not read is ended by the service, not by itself.
        ping_interval=20 if keepalive else None,
    ) as ws:
        yield ws


async def _read(ws: ClientConnection, inbox: _Inbox, pause_s: float = 0.0) -> bool:
    """Read into `inbox` (after `pause_s`) until `done`; False when the connection ended first."""
    if pause_s:
        await asyncio.sleep(pause_s)
    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            if inbox.add(read_message(raw)):
                return True
    return False


async def speak(
    url: str, site: str, clip: str, pcm: bytes, replay: Replay, started_s: float, slow: bool = False
) -> ClientRun:
    """Stream a clip, send `end` and read until `done`. A slow reader reads nothing for SLOW_READER_PAUSE_S, then
    everything: the service may drop its stale partials, never its final."""
    kind: ClientKind = "slow-reader" if slow else "websocket"
    pause_s = SLOW_READER_PAUSE_S if slow else 0.0
    inbox = _Inbox()
    sent: list[tuple[float, float]] = []
    ended: Ending = "done"
    try:
        async with _connect(site_url(url, site), small_rcvbuf=slow) as ws:
            reader = asyncio.create_task(_read(ws, inbox, pause_s))
            with contextlib.suppress(ConnectionClosed):
                await send_audio(pcm, replay, ws.send, sent)
                await ws.send(_END)
            try:
                if not await asyncio.wait_for(reader, DONE_TIMEOUT_S + pause_s):
                    inbox.errors.append("closed: the service closed the connection before done")
                    ended = "failed"
            except asyncio.TimeoutError:
                inbox.errors.append(f"no_done: no done within {DONE_TIMEOUT_S + pause_s:g} s of the end")
                ended = "failed"
    except (OSError, WebSocketException, asyncio.TimeoutError) as err:
        inbox.errors.append(f"connect: {err or type(err).__name__}")
        ended = "failed"
    return inbox.run(kind, site, clip, started_s, _audio_s(sent), ended)


async def vanish(url: str, site: str, clip: str, pcm: bytes, cut_bytes: int, started_s: float) -> ClientRun:
    """Stream the clip up to `cut_bytes` (half-way through its speech) and on until the service shows a partial (or
    the clip ends), reading as a normal client does, then drop the TCP connection without a word (a device losing
    power): the service must still finish the utterance and publish its final."""
    inbox = _Inbox()
    first: list[tuple[float, float]] = []
    rest: list[tuple[float, float]] = []
    ended: Ending = "vanished"
    replay = Replay(realtime=True, trailing_silence_s=0.0)
    try:
        async with _connect(site_url(url, site)) as ws:
            reader = asyncio.create_task(_read(ws, inbox))
            with contextlib.suppress(ConnectionClosed):
                await send_audio(pcm[:cut_bytes], replay, ws.send, first)
                if not inbox.owed:
                    await _until_partial(inbox, send_audio(pcm[cut_bytes:], replay, ws.send, rest))
            ws.transport.abort()
            await reader
    except (OSError, WebSocketException, asyncio.TimeoutError) as err:
        inbox.errors.append(f"connect: {err or type(err).__name__}")
        ended = "failed"
    if inbox.session is None and not inbox.errors:
        inbox.errors.append("no_ready: vanished before the service's ready arrived")
        ended = "failed"
    return inbox.run("vanishing", site, clip, started_s, _audio_s(first) + _audio_s(rest), ended)


async def _until_partial(inbox: _Inbox, sending: Coroutine[Any, Any, None]) -> None:
    """Go on sending until the service shows a partial or the audio is all sent."""
    tasks = [asyncio.create_task(sending), asyncio.create_task(inbox.partial_shown.wait())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def never_read(
    url: str, site: str, clip: str, pcm: bytes, has_words: bool, started_s: float, until: float
) -> ClientRun:
    """Connect with a small receive buffer, read `ready` (to know the session) and nothing more, and stream the clip
    then silence, as a device whose reading side hung: the service must cut it off and free its session, and the
    clip's final still reaches MQTT. The soak closes it after NEVER_READER_GIVE_UP_S, or when the run ends at
    `until` (a monotonic time)."""
    inbox = _Inbox()
    sent: list[tuple[float, float]] = []
    ended: Ending = "failed"
    cut_off_after_s: float | None = None
    try:
        async with _connect(site_url(url, site), small_rcvbuf=True, keepalive=False) as ws:
            connected = time.monotonic()
            first = read_message(await asyncio.wait_for(ws.recv(), READY_TIMEOUT_S))
            inbox.add(first)
            if isinstance(first, Ready):
                # Not even the library reads on (it would answer the service's pings): only the kernel's buffer fills.
                ws.transport.pause_reading()
                limit_s = min(NEVER_READER_GIVE_UP_S, until - connected)
                replay = Replay(realtime=True, trailing_silence_s=NEVER_READER_GIVE_UP_S)
                try:
                    await asyncio.wait_for(send_audio(pcm, replay, ws.send, sent), max(0.0, limit_s))
                    ended = "gave up"
                except ConnectionClosed:
                    ended, cut_off_after_s = "cut off", time.monotonic() - connected
                except asyncio.TimeoutError:
                    ended = "gave up" if limit_s >= NEVER_READER_GIVE_UP_S else "run ended"
            else:
                inbox.errors.append(f"no_ready: the service's first message was {first.kind!r}")
            ws.transport.abort()
    except (OSError, WebSocketException, asyncio.TimeoutError) as err:
        inbox.errors.append(f"connect: {err or type(err).__name__}")
    spoke = has_words and inbox.session is not None
    return inbox.run("never-reader", site, clip, started_s, _audio_s(sent), ended, spoke, cut_off_after_s)


async def satellite(
    uri: str, language: str, site: str, clip: str, pcm: bytes, replay: Replay, started_s: float
) -> ClientRun:
    """A Wyoming satellite's request for one clip: its transcript is the final."""
    try:
        # The site in `transcribe`'s context tells its finals apart on MQTT.
        playback = await WyomingTransport(uri, language, replay, {"site": site}).play(pcm)
    except BenchError as err:
        playback, problem = Playback((), (), time.monotonic(), timed=False), f"connect: {err}"
    else:
        problem = ""
    events = [item.event for item in playback.events]
    errors = tuple(f"{event.code}: {event.message}" for event in events if isinstance(event, SessionError))
    errors += (problem,) if problem else ()
    return ClientRun(
        kind="wyoming",
        site=site,
        clip=clip,
        started_s=started_s,
        audio_s=_audio_s(playback.sent),
        session=None,
        finals=tuple(ReceivedFinal(event.utterance, event.text) for event in events if isinstance(event, Final)),
        owed=(),
        spoke_unread=False,
        ended="failed" if errors else "done",
        cut_off_after_s=None,
        errors=errors,
    )
