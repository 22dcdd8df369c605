"""uvicorn with what the service needs of it and it lacks: a deadline and a size limit for each request (against
slowloris and header floods), WebSocket faults answered without a traceback, and no secret in its log lines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from edge_asr.events import SessionError

_LOGGER = logging.getLogger(__name__)

# No endpoint takes a body, and browsers send headers far smaller: more is a flood that uvicorn would buffer whole.
MAX_REQUEST_BYTES = 64 * 1024
# RFC 6455: a text message that is not UTF-8.
CLOSE_INVALID_DATA = 1007
NOT_UTF8 = "text frames must be UTF-8"
# uvicorn (and, at DEBUG, the websockets library under uvicorn's name) logs request lines with their query
# string and the handshake's headers: the token may be in either (`?token=` from browsers, `Authorization`).
UVICORN_LOGGER = "uvicorn.error"
# Each pattern starts at a fixed character or word, so a client's long path costs linear time, never more.
_SECRETS = (
    (re.compile(r'(?<=[^\s"])\?[^\s"]+'), "?[query redacted]"),
    (re.compile(r"(?i)(?P<name>authorization:\s*).*"), r"\g<name>[redacted]"),
)


def request_limits_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, but a request (line, headers and any body, or the WebSocket handshake) must arrive
    within `timeout_s` of the connection or of its first byte, and within MAX_REQUEST_BYTES, else the connection
    is closed: uvicorn has neither limit, so a client that sends its headers a byte at a time (slowloris) would hold
    a connection for ever, and one that sends endless headers would fill the memory."""

    class RequestLimitsProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _request_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_deadline()

        def data_received(self, data: bytes) -> None:
            if self._deadline is not None:  # a request is on its way
                self._request_bytes += len(data)
                if self._request_bytes > MAX_REQUEST_BYTES:
                    _LOGGER.debug(
                        "Closing the connection of %s: a request of over %d bytes", self.client, MAX_REQUEST_BYTES
                    )
                    self.transport.close()
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._start_deadline()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._cancel_deadline()

        def handle_websocket_upgrade(self) -> None:
            self._cancel_deadline()  # the WebSocket's own limits (idle, send, ping) take over
            super().handle_websocket_upgrade()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_deadline()
            super().connection_lost(exc)

        def _start_deadline(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(timeout_s, self._expired)
                self._request_bytes = 0

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            _LOGGER.debug("Closing the connection of %s: no whole request in %g s", self.client, timeout_s)
            self.transport.close()

    return RequestLimitsProtocol


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's default WebSocket protocol without two of its ERROR log lines that clients can cause at will, and
    with a connection that outlives its session cut off."""

    _linger: asyncio.TimerHandle | None = None

    async def run_asgi(self) -> None:
        """Run the app as uvicorn does, then abort the connection if it is still there after the ping timeout:
        uvicorn closes it with transport.close(), which waits for the client to take what is unsent, so a client
        that never reads would keep its socket (and a file descriptor) for as long as it likes."""
        await super().run_asgi()
        if not self.disconnected:
            self._linger = self.loop.call_later(self.config.ws_ping_timeout or 0.0, self._reset)

    def _reset(self) -> None:
        """Drop the connection and what it never took: a reset, not a close the kernel would go on delivering."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """End the connection as uvicorn does, and the wait for it."""
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    async def send(self, message: ASGISendEvent) -> None:
        """Send as uvicorn does; the end of a denial response (the gate's 401, 403 and 503) completes the handshake,
        else uvicorn logs "ASGI callable returned without completing handshake" (uvicorn pull request 3138)."""
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True

    def data_received(self, data: bytes) -> None:
        """Take data as uvicorn does; and answer a handshake websockets refused (a request line or headers too
        long) with the response it wrote for it (414, 431), which uvicorn would leave unsent."""
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.handshake_complete = self.close_sent = True
            self.transport.close()

    def send_receive_event_to_app(self) -> None:
        """Pass a whole message on as uvicorn does, but answer a text message that is not UTF-8 with `bad_json` and
        close code 1007 where uvicorn would log a traceback."""
        if self.curr_msg_data_type == "text" and not self.close_sent and not _is_utf8(b"".join(self.frames)):
            self.frames = []
            self.conn.send_text(SessionError("bad_json", NOT_UTF8).to_json().encode())
            self.conn.send_close(CLOSE_INVALID_DATA, NOT_UTF8)
            self.handle_parser_exception()  # uvicorn's own way out: tell the app, send the close, drop the connection
            return
        super().send_receive_event_to_app()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


class RedactSecrets(logging.Filter):
    """Cuts query strings and `Authorization` values out of uvicorn's log lines
    (`"WebSocket /ws/stream?token=..." [accepted]`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record with its secrets replaced; never drop it."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed log call: logging reports it, a filter must not raise
            return True
        redacted = message
        for pattern, replacement in _SECRETS:
            redacted = pattern.sub(replacement, redacted)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_REDACT_SECRETS = RedactSecrets()


def redact_secrets_in_logs() -> None:
    """Install the filter on uvicorn's logger (once, however many listeners start)."""
    logging.getLogger(UVICORN_LOGGER).addFilter(_REDACT_SECRETS)
