"""The waits every streaming adapter bounds the same way, whatever its protocol library: the client's next input,
a send to it, and the finish of a session whose client vanished."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from edge_asr.api import SpeechSession
from edge_asr.config import LimitSettings

_LOGGER = logging.getLogger(__name__)

# How long a vanished client's open utterance may take to be finalised for the listeners.
ORPHAN_FINISH_S = 10.0
SEND_BUFFER_BYTES = 64 * 1024

T = TypeVar("T")


def limit_send_buffer(sock: socket.socket) -> None:
    """Make a client that does not read stall our writes (and meet `limits.send_timeout_s`) after SEND_BUFFER_BYTES,
    instead of after the megabytes the kernel would buffer for it; accepted sockets inherit it from a listener."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


@dataclass(frozen=True)
class SessionPump:
    """Moves one client's input into its session and the session's events out, each wait bounded by `limits`."""

    limits: LimitSettings
    # Who the log lines are about ("Wyoming client", "Session 3").
    client: str

    async def receive(self, session: SpeechSession | None, read: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """The client's next input, read once `session` has room for it: a client that sends faster than its speech
        can be decoded is not read until there is room. The wait for room is bounded by `limits.idle_timeout_s`,
        the read by `timeout_s`; asyncio.TimeoutError when either runs out."""
        if session is not None:
            await asyncio.wait_for(session.room(), self.limits.idle_timeout_s)
        return await asyncio.wait_for(read(), timeout_s)

    async def send(self, send: Awaitable[None]) -> bool:
        """Await one send within `limits.send_timeout_s`; False when the client took nothing in that time."""
        try:
            await asyncio.wait_for(send, self.limits.send_timeout_s)
        except asyncio.TimeoutError:
            _LOGGER.info("%s took nothing for %g s: cut off", self.client, self.limits.send_timeout_s)
            return False
        return True

    async def finish_orphan(self, session: SpeechSession) -> None:
        """The client is gone (or stopped reading) mid-utterance: the listeners (MQTT) still get the final of what
        it said, within ORPHAN_FINISH_S."""
        if session.has_open_utterance:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(session.finish(), ORPHAN_FINISH_S)
