"""FastAPI/uvicorn adapter: the live page at `/`, `/ws/stream` streaming transcription, `/health` and `/metrics`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.websockets import WebSocketState

from adapters.wire_json import MAX_JSON_DEPTH, NotJson, TooDeep, load_json
from edge_asr.api import (
    AudioFormatError,
    EngineBusy,
    EngineNotReady,
    EngineRefusal,
    EngineShuttingDown,
    InvalidSite,
    SessionRequest,
    SpeechEngine,
    SpeechSession,
    UnsupportedLanguage,
    is_text,
    refusal_error,
    request_names,
)
from edge_asr.audio import SAMPLE_RATE
from edge_asr.config import ConfigError, LimitSettings, Settings
from edge_asr.events import Final, Ready, SessionError, quoted
from edge_asr.metrics import CONTENT_TYPE

from .http_gate import AccessGate
from .http_server import WebSocketProtocol, redact_secrets_in_logs, request_limits_protocol
from .pump import SessionPump, limit_send_buffer

_LOGGER = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
# RFC 6455 close codes.
CLOSE_NORMAL = 1000
CLOSE_TOO_BIG = 1009
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013
MAX_TEXT_BYTES = 64 * 1024
GRACEFUL_SHUTDOWN_S = 3


def protocol_max_bytes(limits: LimitSettings) -> int:
    """The largest message the WebSocket protocol buffers: above our own limits, so that an oversized frame
    reaches us and gets its `frame_too_large` event; past this the protocol closes with 1009 unread."""
    return 2 * limits.max_frame_bytes + MAX_TEXT_BYTES


def create_app(engine: SpeechEngine, settings: Settings) -> FastAPI:
    """The ASGI app: health, metrics and the streaming WebSocket, behind the gate that decides whom they serve."""
    app = FastAPI(title="edge-asr", docs_url=None, redoc_url=None)
    app.add_middleware(AccessGate, settings=settings.http)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 with model and session facts once the model is warm, 503 with the reason before."""
        facts = engine.health()
        return JSONResponse(dataclasses.asdict(facts), status_code=200 if facts.ready else 503)

    @app.get("/health/live")
    async def live() -> JSONResponse:
        """Liveness: 200 while the process and its decode scheduler work (also while the model loads)."""
        facts = engine.health()
        return JSONResponse({"live": facts.live, "status": facts.status}, status_code=200 if facts.live else 503)

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        """Readiness, for balancers: 200 when a new session would be taken; 503 while loading, draining, full or
        failing, with the reason."""
        facts = engine.health()
        status = "full" if facts.ready and facts.sessions >= facts.max_sessions else facts.status
        body = {
            "ready": facts.accepting,
            "status": status,
            "sessions": facts.sessions,
            "max_sessions": facts.max_sessions,
        }
        return JSONResponse(body, status_code=200 if facts.accepting else 503)

    @app.get("/")
    async def live_page() -> HTMLResponse:
        """The live page: a microphone button, partials in grey, finals in black with their timings."""
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/pcm16k-worklet.js")
    async def pcm_worklet() -> Response:
        """The AudioWorklet that turns the microphone into 16 kHz s16le frames in the browser."""
        script = (STATIC_DIR / "pcm16k-worklet.js").read_text(encoding="utf-8")
        return Response(script, media_type="text/javascript")

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.websocket("/ws/stream")
    async def stream(websocket: WebSocket) -> None:
        """Stream PCM in, partial and final transcripts out."""
        await websocket.accept()
        query = websocket.query_params
        try:
            session = engine.session(
                SessionRequest(
                    source="websocket",
                    language=query.get("language") or None,
                    prompt=query.get("prompt", ""),
                    site=query.get("site") or None,
                    # The gate has put the client's address here (the real one behind a trusted proxy).
                    peer=websocket.client.host if websocket.client is not None else None,
                )
            )
        except EngineRefusal as err:
            pump = SessionPump(settings.limits, "WebSocket client")
            await _close_with(pump, websocket, refusal_error(err), _refusal_close_code(err))
            return
        async with session:
            await WebSocketStream(websocket, session, settings.limits).run()

    return app


async def _close_with(pump: SessionPump, websocket: WebSocket, error: SessionError, code: int) -> None:
    """Send an error outside any session's event order (before a session exists or after it ends), then close."""
    with contextlib.suppress(Exception):  # the client is gone
        await pump.send(websocket.send_text(error.to_json()))
    with contextlib.suppress(Exception):
        await pump.send(websocket.close(code))


def _refusal_close_code(refusal: EngineRefusal) -> int:
    """RFC 6455's codes: a node that is stopping or busy tells the client to come back (or go elsewhere)."""
    if isinstance(refusal, EngineShuttingDown):
        return CLOSE_SERVICE_RESTART
    if isinstance(refusal, (EngineBusy, EngineNotReady)):
        return CLOSE_TRY_AGAIN
    return CLOSE_NORMAL


class WebSocketStream:
    """Translates one WebSocket connection into engine session calls and events back."""

    def __init__(self, websocket: WebSocket, session: SpeechSession, limits: LimitSettings) -> None:
        self._ws = websocket
        self._session = session
        self._limits = limits
        self._pump = SessionPump(limits, f"Session {session.info.id}")
        self._finishing: asyncio.Task[Final | None] | None = None

    async def run(self) -> None:
        """Send `ready`, then pump frames in and events out until the client leaves, stops reading, or breaks
        a limit."""
        ready = Ready(self._session.info.id, SAMPLE_RATE, self._session.info.language, self._limits.max_frame_bytes)
        if not await self._send(ready.to_json()):
            return
        reader = asyncio.create_task(self._read_frames())
        writer = asyncio.create_task(self._write_events())
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await reader
            await self._pump.finish_orphan(self._session)
            if self._finishing is not None:
                self._finishing.cancel()
            self._session.close()
            await writer

    async def _read_frames(self) -> None:
        while True:
            try:
                message = await self._pump.receive(self._session, self._ws.receive, self._limits.idle_timeout_s)
            except asyncio.TimeoutError:
                await self._close_with(
                    SessionError("idle_timeout", f"no message for {self._limits.idle_timeout_s:g} s"), CLOSE_NORMAL
                )
                return
            if message["type"] == "websocket.disconnect":
                _LOGGER.debug("Session %d: client went away", self._session.info.id)
                return
            data: bytes | None = message.get("bytes")
            text: str | None = message.get("text")
            size = len(data) if data is not None else len((text or "").encode())
            limit = self._limits.max_frame_bytes if data is not None else MAX_TEXT_BYTES
            if size > limit:
                await self._close_with(
                    SessionError("frame_too_large", f"a frame of {size} bytes exceeds the limit of {limit}"),
                    CLOSE_TOO_BIG,
                )
                return
            if data is not None:
                self._on_audio(data)
            elif text is not None:
                await self._on_text(text)

    def _on_audio(self, data: bytes) -> None:
        try:
            self._session.feed(data)
        except AudioFormatError as err:
            self._refused(err, "; frame dropped (expected s16le mono 16 kHz)")

    async def _on_text(self, text: str) -> None:
        try:
            message = _json_value(text)
        except BadJson as err:
            self._session.report_error("bad_json", str(err))
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "end":
            await self._finish_in_background()
        elif kind == "config":
            self._on_config(message)
        else:
            self._session.report_error(
                "unknown_message", f"unknown message type {quoted(kind)}; expected config or end"
            )

    async def _finish_in_background(self) -> None:
        """Finalise without blocking the reader: audio after `end` keeps flowing in. An `end` while the one before
        is still finishing waits for it, so that a flood of them cannot pile up."""
        if self._finishing is not None:
            await asyncio.wait((self._finishing,))
        self._finishing = asyncio.create_task(self._session.finish())

    def _on_config(self, message: dict[str, Any]) -> None:
        unknown = sorted(set(message) - {"type", "language", "prompt", "site", "vocabulary", "partials"})
        if unknown:
            self._session.report_error("bad_config", f"unknown config keys: {quoted(', '.join(unknown))}")
            return
        partials = message.get("partials", True)
        if not isinstance(partials, bool):
            self._session.report_error("bad_config", "partials must be true or false")
            return
        prompt, language = message.get("prompt", ""), message.get("language", self._session.info.language)
        site = message.get("site", self._session.info.site)
        if not all(is_text(value) for value in (prompt, language, site)):
            self._session.report_error("bad_config", "prompt, language and site must be strings of valid Unicode text")
            return
        try:
            names = request_names(message.get("vocabulary"), "vocabulary")
        except ValueError as err:
            self._session.report_error("bad_config", str(err))
            return
        if "vocabulary" in message:
            self._session.set_vocabulary(names)
        try:
            self._session.set_language(language)
            self._session.set_site(site or self._session.info.site)
        except (UnsupportedLanguage, InvalidSite) as err:
            self._refused(err)  # the session goes on as it was (but for a language set before a refused site)
            return
        if "prompt" in message:
            self._session.set_prompt(prompt)
        if "partials" in message:
            self._session.set_partials(partials)

    def _refused(self, refusal: EngineRefusal, detail: str = "") -> None:
        error = refusal_error(refusal)
        self._session.report_error(error.code, error.message + detail)

    async def _close_with(self, error: SessionError, code: int) -> None:
        self._session.close()
        await _close_with(self._pump, self._ws, error, code)

    async def _write_events(self) -> None:
        """Send the session's events until it closes; stop at a client that does not take them."""
        async for event in self._session.events():
            if self._ws.application_state != WebSocketState.CONNECTED:
                continue
            if not await self._send(event.to_json()):
                return

    async def _send(self, text: str) -> bool:
        """Send one message within `limits.send_timeout_s`; False when the client is gone or does not read."""
        try:
            return await self._pump.send(self._ws.send_text(text))
        except Exception:  # the client is gone
            _LOGGER.debug("Session %d: dropped an event for a closed socket", self._session.info.id)
            return False


class BadJson(ValueError):
    """A text frame that is not JSON or nests too deep; the message is the client's."""


def _json_value(text: str) -> Any:
    """A text frame's JSON value; BadJson for text that is not JSON or nests deeper than MAX_JSON_DEPTH."""
    try:
        return load_json(text)
    except TooDeep as err:
        raise BadJson(f"text frames must not nest deeper than {MAX_JSON_DEPTH} levels") from err
    except NotJson as err:
        raise BadJson("text frames must be JSON objects") from err


def _listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn (which, binding itself, would exit the process on failure)."""
    try:
        family, kind, protocol, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, protocol)
    except OSError as err:
        raise ConfigError(f"http.host: cannot listen on {host!r}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        limit_send_buffer(sock)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"http.port: cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class HttpAdapter:
    """Runs the FastAPI app on uvicorn inside the service's event loop."""

    name = "http"

    def __init__(self, engine: SpeechEngine, settings: Settings) -> None:
        self._settings = settings
        config = uvicorn.Config(
            create_app(engine, settings),
            host=settings.http.host,
            port=settings.http.port,
            http=request_limits_protocol(settings.limits.handshake_timeout_s),
            ws=WebSocketProtocol,
            # Forwarded headers are the gate's to read, from http.trusted_proxies only: uvicorn's own reading
            # would believe any local process (it trusts 127.0.0.1 and FORWARDED_ALLOW_IPS by default).
            proxy_headers=False,
            ssl_certfile=settings.http.tls_cert_file or None,
            ssl_keyfile=settings.http.tls_key_file or None,
            log_config=None,
            access_log=False,
            ws_max_size=protocol_max_bytes(settings.limits),
            lifespan="off",
            # The drain has let every utterance end; connections still open are closed within this.
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            # A client that answers no ping (it reads nothing) is closed after as long as a send may take.
            ws_ping_interval=settings.limits.send_timeout_s,
            ws_ping_timeout=settings.limits.send_timeout_s,
        )
        self._server = uvicorn.Server(config)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and listen; a port that cannot be bound is a ConfigError naming `http.port`."""
        config = self._server.config
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        redact_secrets_in_logs()
        await self._server.startup(sockets=[_listening_socket(self._settings.http.host, self._settings.http.port)])
        scheme = "wss" if config.ssl is not None else "ws"
        _LOGGER.info("WebSocket on %s://%s:%d/ws/stream", scheme, self._settings.http.host, self.port)

    async def stop(self) -> None:
        """Close the listener and the open connections."""
        self._server.should_exit = True
        await self._server.shutdown()
