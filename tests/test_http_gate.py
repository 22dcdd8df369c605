"""Who the HTTP listener serves, on a real socket: web origins, the token (and that no log line shows it), the
address allow-list behind trusted proxies, and the connection limit that spares /health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from adapters.http import HttpAdapter
from adapters.http_server import RedactSecrets
from edge_asr.config import build_settings
from edge_asr.engine import Engine
from edge_asr.events import Message, Ready, SessionError, message_from_dict

from .fakes import FakeEngine, ScriptedTranscriber

pytestmark = pytest.mark.fast

WAIT_S = 5.0
TOKEN = "s3cret-t0ken"
# A test client connects from 127.0.0.1: trusting that as a proxy lets it say who the client is.
LOOPBACK_PROXY = ["127.0.0.0/8"]
HOME = ["192.168.0.0/16"]
# Far more than a linear scan of a long log line takes, far less than a quadratic one.
SLOW_S = 2.0

Serve = Callable[..., Awaitable[str]]


@pytest.fixture
def engine() -> FakeEngine:
    """A fresh fake engine per test."""
    return FakeEngine()


@pytest.fixture
async def serve(engine: FakeEngine) -> AsyncIterator[Serve]:
    """Start adapters on free loopback ports with `http` settings (and `limits`); each one's `host:port`."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(limits: dict[str, Any] | None = None, **http: Any) -> str:
            settings = build_settings({"http": {"host": "127.0.0.1", "port": 0, **http}, "limits": limits or {}})
            adapter = HttpAdapter(engine, settings)
            await adapter.start()
            stack.push_async_callback(adapter.stop)
            return f"127.0.0.1:{adapter.port}"

        yield start


async def _receive(ws: ClientConnection) -> Message:
    return message_from_dict(json.loads(await asyncio.wait_for(ws.recv(), WAIT_S)))


async def _handshake_status(url: str, origin: str | None = None, headers: dict[str, str] | None = None) -> int:
    """101 when the WebSocket opens (and says ready), else the HTTP status that refused it."""
    try:
        async with connect(
            url, origin=None if origin is None else Origin(origin), additional_headers=headers, open_timeout=WAIT_S
        ) as ws:
            assert isinstance(await _receive(ws), Ready)
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


async def _get_status(url: str, headers: dict[str, str] | None = None) -> int:
    async with httpx.AsyncClient() as client:
        return (await client.get(url, headers=headers)).status_code


async def test_browsers_may_open_the_stream_only_from_the_own_page_and_listed_origins(
    serve: Serve, engine: FakeEngine
) -> None:
    base = await serve(allowed_origins=["http://hub.local:8123"])
    url = f"ws://{base}/ws/stream"

    assert await _handshake_status(url, origin="http://evil.example") == 403
    assert await _handshake_status(url, origin="http://hub.local:8124") == 403
    assert await _handshake_status(url, origin="https://" + base) == 403  # the listener is plain http
    assert engine.sessions == []  # refused before the engine was asked
    assert await _handshake_status(url, origin="http://" + base) == 101
    assert await _handshake_status(url, origin="http://HUB.local:8123") == 101
    assert await _handshake_status(url) == 101  # no Origin: a satellite, a script, an app


async def test_with_a_token_the_stream_and_metrics_need_it_and_health_and_the_page_stay_open(serve: Serve) -> None:
    base = await serve(token=TOKEN)
    url = f"ws://{base}/ws/stream"

    assert await _handshake_status(url) == 401
    assert await _handshake_status(f"{url}?token=wrong") == 401
    assert await _handshake_status(url, headers={"Authorization": "Bearer wrong"}) == 401
    assert await _handshake_status(url, headers={"Authorization": f"Basic {TOKEN}"}) == 401
    assert await _handshake_status(f"{url}?token={TOKEN}") == 101
    assert await _handshake_status(url, headers={"Authorization": f"Bearer {TOKEN}"}) == 101
    assert await _handshake_status(url, headers={"Authorization": f"bearer {TOKEN}"}) == 101
    assert await _get_status(f"http://{base}/metrics") == 401
    assert await _get_status(f"http://{base}/metrics?token={TOKEN}") == 401  # a URL ends up in logs and histories
    assert await _get_status(f"http://{base}/metrics", {"Authorization": f"Bearer {TOKEN}"}) == 200
    assert await _get_status(f"http://{base}/health") == 200
    assert await _get_status(f"http://{base}/") == 200
    assert await _get_status(f"http://{base}/static/pcm16k-worklet.js") == 200


async def test_a_refusal_says_what_is_missing(serve: Serve) -> None:
    base = await serve(token=TOKEN)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{base}/metrics")

    assert response.headers["www-authenticate"] == "Bearer"
    assert "token" in response.text


async def test_the_token_never_reaches_the_log(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    base = await serve(token=TOKEN)

    assert await _handshake_status(f"ws://{base}/ws/stream?site=hall&token={TOKEN}") == 101
    assert await _handshake_status(f"ws://{base}/ws/stream?token={TOKEN}x") == 401
    assert await _handshake_status(f"ws://{base}/ws/stream", headers={"Authorization": f"Bearer {TOKEN}"}) == 101

    # The test's own client (websockets.client) logs what it sends; the service must not.
    service = [record for record in caplog.records if not record.name.startswith("websockets.client")]
    assert not [record.getMessage() for record in service if TOKEN in record.getMessage()]
    assert any(record.getMessage() == "< authorization: [redacted]" for record in service)
    assert not [record.getMessage() for record in service if record.levelno >= logging.ERROR]  # nor a refusal
    lines = [record.getMessage() for record in service if record.name == "uvicorn.error"]
    assert [line.partition(" - ")[2] for line in lines if '"WebSocket' in line] == [
        '"WebSocket /ws/stream?[query redacted]" [accepted]',
        '"WebSocket /ws/stream?[query redacted]" 401',
        '"WebSocket /ws/stream" [accepted]',
    ]


@pytest.mark.parametrize(
    ("line", "logged"),
    [
        (
            '1.2.3.4:5 - "WebSocket /ws/stream?token=x&site=a" 401',
            '1.2.3.4:5 - "WebSocket /ws/stream?[query redacted]" 401',
        ),
        ("< GET /ws/stream?token=x HTTP/1.1", "< GET /ws/stream?[query redacted] HTTP/1.1"),
        ("< Authorization: Bearer x", "< Authorization: [redacted]"),
        ("Is it? No.", "Is it? No."),
        ("/" * 200_000 + "?token=x", "/" * 200_000 + "?[query redacted]"),  # in linear time
    ],
)
def test_log_lines_lose_query_strings_and_authorization_values(line: str, logged: str) -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "%s", (line,), None)
    started = time.monotonic()

    RedactSecrets().filter(record)

    assert time.monotonic() - started < SLOW_S
    assert record.getMessage() == logged


async def test_an_address_outside_the_allowed_networks_gets_403_for_everything(
    serve: Serve, engine: FakeEngine
) -> None:
    base = await serve(allowed_networks=["10.0.0.0/8"])

    assert await _handshake_status(f"ws://{base}/ws/stream") == 403
    for path in ("/health", "/", "/metrics", "/nowhere"):
        assert await _get_status(f"http://{base}{path}") == 403, path
    assert engine.sessions == []


@pytest.mark.parametrize(
    ("headers", "status", "client"),
    [
        ({"X-Forwarded-For": "192.168.1.7"}, 101, "192.168.1.7"),
        ({"X-Forwarded-For": "8.8.8.8, 192.168.1.7, 127.0.0.9"}, 101, "192.168.1.7"),
        ({"X-Forwarded-For": "192.168.1.7, 8.8.8.8"}, 403, None),  # the rightmost untrusted hop is the client
        ({"Forwarded": 'for="192.168.1.8:4711";proto=http'}, 101, "192.168.1.8"),
        ({"Forwarded": "for=8.8.8.8"}, 403, None),
        ({"X-Forwarded-For": "192.168.1.7", "Forwarded": "for=192.168.1.7"}, 101, "192.168.1.7"),
        ({"X-Forwarded-For": "192.168.1.7", "Forwarded": "for=192.168.1.9"}, 403, None),  # which one is true?
        ({"X-Forwarded-For": "unknown"}, 403, None),
        ({}, 403, None),  # the proxy itself is not in the allowed networks
    ],
)
async def test_behind_a_trusted_proxy_the_forwarded_client_is_checked_and_given_to_the_engine(
    serve: Serve, engine: FakeEngine, headers: dict[str, str], status: int, client: str | None
) -> None:
    base = await serve(allowed_networks=HOME, trusted_proxies=LOOPBACK_PROXY)

    assert await _handshake_status(f"ws://{base}/ws/stream", headers=headers) == status
    assert engine.peers == ([client] if client else [])


async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(serve: Serve, engine: FakeEngine) -> None:
    base = await serve(allowed_networks=["127.0.0.0/8"])

    # uvicorn would believe this from 127.0.0.1 by default; the gate believes only http.trusted_proxies.
    assert await _handshake_status(f"ws://{base}/ws/stream", headers={"X-Forwarded-For": "192.168.1.7"}) == 101
    assert await _handshake_status(f"ws://{base}/ws/stream", headers={"Forwarded": "for=10.1.1.1"}) == 101
    assert engine.peers == ["127.0.0.1", "127.0.0.1"]


async def test_the_engine_caps_sessions_per_forwarded_client() -> None:
    settings = build_settings(
        {
            "http": {"host": "127.0.0.1", "port": 0, "allowed_networks": HOME, "trusted_proxies": LOOPBACK_PROXY},
            "limits": {"max_sessions_per_address": 1},
        }
    )
    engine = Engine(settings, ScriptedTranscriber)
    await engine.start()
    adapter = HttpAdapter(engine, settings)
    await adapter.start()
    url = f"ws://127.0.0.1:{adapter.port}/ws/stream"
    try:
        async with connect(url, additional_headers={"X-Forwarded-For": "192.168.1.7"}) as first:
            assert isinstance(await _receive(first), Ready)
            async with connect(url, additional_headers={"X-Forwarded-For": "192.168.1.7"}) as same:
                refused = await _receive(same)
            async with connect(url, additional_headers={"X-Forwarded-For": "192.168.1.8"}) as other:
                assert isinstance(await _receive(other), Ready)
    finally:
        await adapter.stop()
        await engine.stop()

    assert isinstance(refused, SessionError)
    assert refused.code == "busy"


async def test_past_max_connections_new_ones_get_503_but_health_is_answered(serve: Serve) -> None:
    base = await serve(max_connections=2)
    url = f"ws://{base}/ws/stream"
    async with connect(url) as first, connect(url) as second:
        for ws in (first, second):
            assert isinstance(await _receive(ws), Ready)
        full = await _handshake_status(url)
        health = await _get_status(f"http://{base}/health")
        metrics = await _get_status(f"http://{base}/metrics")
    # The closed connections are counted off once their handlers are done.
    await asyncio.sleep(0.2)
    after = await _handshake_status(url)

    assert (full, health, metrics, after) == (503, 200, 503, 101)
