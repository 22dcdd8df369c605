"""Slow and flooding clients on a real socket: a request (or WebSocket handshake) that does not arrive whole within
`limits.handshake_timeout_s`, or grows past 64 KiB, has its connection closed, while others are served and open
WebSockets live on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect

from adapters.http import HttpAdapter
from adapters.http_server import MAX_REQUEST_BYTES
from edge_asr.config import build_settings

from .fakes import FakeEngine

pytestmark = pytest.mark.fast

DEADLINE_S = 0.5
# Timer and scheduling slack on a loaded machine.
SLACK_S = 1.5
TRICKLE_S = 0.1
HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
UPGRADE = b"GET /ws/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"


@pytest.fixture
async def port() -> AsyncIterator[int]:
    """An adapter with the shortest handshake time limit, on a free loopback port."""
    settings = build_settings({"http": {"host": "127.0.0.1", "port": 0}, "limits": {"handshake_timeout_s": DEADLINE_S}})
    adapter = HttpAdapter(FakeEngine(), settings)
    await adapter.start()
    try:
        yield adapter.port
    finally:
        await adapter.stop()


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send `data` a byte at a time, then go silent; stop when the server has closed the connection."""
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(TRICKLE_S)


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    [length] = [
        int(line[len(b"content-length:") :]) for line in head.lower().split(b"\r\n") if b"content-length" in line
    ]
    return head + await reader.readexactly(length)


async def _closed_after(reader: asyncio.StreamReader, started: float) -> float:
    """Seconds from `started` until the server closes the connection (reading whatever it sends until then)."""
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(4096), DEADLINE_S + SLACK_S):
            pass
    return time.monotonic() - started


@pytest.mark.parametrize(
    ("before", "slowly"),
    [
        (b"", b""),  # connects and says nothing
        (HEALTH, b""),  # headers that never end
        (b"", HEALTH * 10),  # slowloris: a byte every 100 ms, for longer than the limit
        (UPGRADE, b"Sec-WebSocket-Version: 13\r\n"),  # a WebSocket handshake that never ends
    ],
    ids=["silent", "unfinished", "trickled", "websocket"],
)
async def test_a_request_that_does_not_arrive_in_time_is_cut_off_while_others_are_served(
    port: int, before: bytes, slowly: bytes
) -> None:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(before)
    trickling = asyncio.create_task(_trickle(writer, slowly))
    closing = asyncio.create_task(_closed_after(reader, started))
    try:
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{port}/health")
        closed_after = await closing
    finally:
        trickling.cancel()
        writer.close()

    assert health.status_code == 200
    assert DEADLINE_S * 0.9 <= closed_after <= DEADLINE_S + SLACK_S


async def test_each_request_on_a_kept_alive_connection_has_the_limit(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HEALTH + b"\r\n")
        first = await asyncio.wait_for(_read_response(reader), DEADLINE_S + SLACK_S)
        writer.write(HEALTH)  # the second request's headers never end
        closed_after = await _closed_after(reader, time.monotonic())
    finally:
        writer.close()

    assert first.startswith(b"HTTP/1.1 200")
    assert DEADLINE_S * 0.9 <= closed_after <= DEADLINE_S + SLACK_S


async def test_an_open_websocket_outlives_the_handshake_limit(port: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/ws/stream") as ws:
        ready = json.loads(await ws.recv())
        await asyncio.sleep(3 * DEADLINE_S)
        await ws.send(bytes(640))
        partial = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE_S + SLACK_S))

    assert (ready["type"], partial["type"]) == ("ready", "partial")


async def test_a_request_flooded_with_headers_is_cut_off_at_once() -> None:
    settings = build_settings({"http": {"host": "127.0.0.1", "port": 0}, "limits": {"handshake_timeout_s": 60}})
    adapter = HttpAdapter(FakeEngine(), settings)
    await adapter.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", adapter.port)
        started = time.monotonic()
        writer.write(HEALTH)
        with contextlib.suppress(ConnectionError):
            for _ in range(4 * MAX_REQUEST_BYTES // 1024):
                writer.write(b"X-Pad: " + b"a" * 1024 + b"\r\n")
                await writer.drain()
        closed_after = await _closed_after(reader, started)
        writer.close()
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{adapter.port}/health")
    finally:
        await adapter.stop()

    assert closed_after <= SLACK_S
    assert health.status_code == 200


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (UPGRADE.replace(b"/ws/stream", b"/ws/stream?site=" + b"k" * 9000), b"414"),
        (UPGRADE + b"X-Pad: " + b"a" * 9000 + b"\r\n", b"431"),
    ],
    ids=["request-line-over-8-KiB", "header-line-over-8-KiB"],
)
async def test_a_websocket_handshake_too_long_for_websockets_is_answered_not_left_waiting(
    port: int, request_head: bytes, status: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_head + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), DEADLINE_S / 2)
    writer.close()

    assert answer.split(b" ")[1] == status, answer[:80]
