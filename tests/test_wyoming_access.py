"""Who the Wyoming adapter serves and how many at once, on real sockets against a fake engine: the address
allow-list, the address the engine is given, the connection cap (idle connections make room, requests do
not, nor do clients that do not read), the time limit on the first event."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from wyoming.error import Error
from wyoming.event import Event, async_read_event

from adapters.wyoming import WyomingAdapter
from edge_asr.config import build_settings

from .fakes import FakeEngine
from .wyoming_client import assert_no_tracebacks, async_exchange, serving, wire_event

pytestmark = pytest.mark.fast

WAIT_S = 5.0
# The lowest handshake time limit the settings take.
HANDSHAKE_S = 0.5
DESCRIBE = wire_event("describe")
TRANSCRIBE = wire_event("transcribe", {"language": "en"})
START = wire_event("audio-start", {"rate": 16000, "width": 2, "channels": 1})
CHUNK = wire_event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, bytes(640))
STOP = wire_event("audio-stop")
# Describe events a client that never reads sends, and its small receive buffer: the server's writes stall.
DESCRIBES = 20_000
SMALL_RCVBUF = 4096
POLL_S = 0.05

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test checks at its end that nothing reached the log at WARNING or above."""
    caplog.set_level(logging.DEBUG)
    yield
    assert_no_tracebacks(caplog.get_records("setup") + caplog.get_records("call"))


async def _read(reader: asyncio.StreamReader) -> Event | None:
    """The next event, None when the server closed the connection."""
    return await asyncio.wait_for(async_read_event(reader), WAIT_S)


async def _until(reader: asyncio.StreamReader, event_type: str) -> list[Event]:
    """Events up to and including the first of `event_type`."""
    events: list[Event] = []
    while not events or events[-1].type != event_type:
        event = await _read(reader)
        assert event is not None, f"closed before {event_type}; got {events}"
        events.append(event)
    return events


async def _connect(port: int, data: bytes = b"", until: str | None = None) -> Connection:
    """A connection that sent `data` and read up to an event of type `until`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if until is not None:
        await _until(reader, until)
    return reader, writer


async def _refusal(reader: asyncio.StreamReader) -> list[str | None]:
    """What a connection being closed gets: its error codes, then the end of the stream (asserted)."""
    codes = []
    while (event := await _read(reader)) is not None:
        assert Error.is_type(event.type), f"{event.type} before the close"
        codes.append(Error.from_event(event).code)
    return codes


async def _finish(connection: Connection) -> str:
    """Send a chunk and audio-stop on a connection with an open request; its transcript."""
    reader, writer = connection
    writer.write(CHUNK + STOP)
    events = await _until(reader, "transcript-stop")
    return str(events[-2].data["text"])


async def test_a_client_outside_the_allowed_networks_is_refused_before_anything_is_read() -> None:
    engine = FakeEngine()
    async with serving(engine, {"allowed_networks": ["10.0.0.0/8", "fd00::/8"]}) as port:
        reader, writer = await _connect(port, TRANSCRIBE + START + CHUNK + STOP + DESCRIBE)
        codes = await _refusal(reader)
        writer.close()

    assert codes == ["forbidden"]
    assert not engine.sessions


async def test_the_engine_is_given_the_clients_address() -> None:
    engine = FakeEngine()
    async with serving(engine) as port:
        transcript = await _finish(await _connect(port, TRANSCRIBE + START, until="transcript-start"))

    assert transcript == "w1"
    assert engine.peers == ["127.0.0.1"]


async def test_a_unix_socket_client_is_local_whatever_the_allowed_networks(tmp_path: Path) -> None:
    path = tmp_path / "wyoming.sock"
    engine = FakeEngine()
    settings = build_settings({"wyoming": {"uri": f"unix://{path}", "allowed_networks": ["10.0.0.0/8"]}})
    adapter = WyomingAdapter(engine, settings)
    await adapter.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(TRANSCRIBE + START)
        await _until(reader, "transcript-start")
        transcript = await _finish((reader, writer))
        writer.close()
    finally:
        await adapter.stop()

    assert transcript == "w1"
    assert engine.peers == [None], "no address: the per-address cap is for network clients"


async def test_at_the_cap_with_every_connection_in_a_request_a_new_one_is_refused() -> None:
    engine = FakeEngine()
    async with serving(engine, {"max_connections": 2}) as port:
        busy = [await _connect(port, TRANSCRIBE + START, until="transcript-start") for _ in range(2)]
        events, closed = await async_exchange(port, DESCRIBE, timeout_s=WAIT_S)
        transcripts = [await _finish(connection) for connection in busy]
        served_after = await _connect(port, DESCRIBE, until="info")
        for _reader, writer in [*busy, served_after]:
            writer.close()

    assert [Error.from_event(e).code for e in events] == ["too_many_connections"]
    assert closed
    assert transcripts == ["w1", "w1"], "the requests under way are not disturbed"


async def test_at_the_cap_the_connection_idle_longest_makes_room() -> None:
    engine = FakeEngine()
    async with serving(engine, {"max_connections": 3}) as port:
        first = await _connect(port, DESCRIBE, until="info")
        second = await _connect(port)
        busy = await _connect(port, TRANSCRIBE + START, until="transcript-start")
        first[1].write(DESCRIBE)  # the first connection is now the more recently active of the idle two
        await _until(first[0], "info")
        newcomer = await _connect(port, TRANSCRIBE + START, until="transcript-start")
        evicted = await _refusal(second[0])
        transcripts = [await _finish(newcomer), await _finish(busy)]
        first[1].write(DESCRIBE)
        still_served = await _until(first[0], "info")
        for _reader, writer in (first, second, busy, newcomer):
            writer.close()

    assert evicted == ["too_many_connections"]
    assert transcripts == ["w1", "w1"]
    assert [e.type for e in still_served] == ["info"]


async def test_a_request_the_engine_has_not_taken_does_not_hold_its_connection() -> None:
    engine = FakeEngine()
    async with serving(engine, {"max_connections": 1}) as port:
        waiting = await _connect(port, TRANSCRIBE + DESCRIBE, until="info")
        transcript = await _finish(await _connect(port, TRANSCRIBE + START, until="transcript-start"))
        evicted = await _refusal(waiting[0])
        waiting[1].close()

    assert evicted == ["too_many_connections"]
    assert transcript == "w1"


async def test_a_client_that_sends_nothing_is_closed_after_the_handshake_time() -> None:
    async with serving(FakeEngine(), handshake_timeout_s=HANDSHAKE_S) as port:
        reader, writer = await _connect(port)
        started = time.monotonic()
        codes = await _refusal(reader)
        closed_after = time.monotonic() - started
        writer.close()

    assert codes == ["handshake_timeout"]
    assert HANDSHAKE_S - 0.05 <= closed_after < HANDSHAKE_S + 1.0


async def test_a_header_sent_byte_by_byte_is_closed_after_the_handshake_time() -> None:
    async with serving(FakeEngine(), handshake_timeout_s=HANDSHAKE_S) as port:
        reader, writer = await _connect(port)
        started = time.monotonic()
        answer = asyncio.create_task(_refusal(reader))
        for byte in DESCRIBE:
            if answer.done():  # closed: what we would send now could only reset the connection
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(HANDSHAKE_S / 10)
        codes = await asyncio.wait_for(answer, WAIT_S)
        closed_after = time.monotonic() - started
        writer.close()

    assert codes == ["handshake_timeout"]
    assert closed_after < HANDSHAKE_S + 1.0


async def test_after_its_first_event_a_client_may_pause_longer_than_the_handshake_time() -> None:
    async with serving(FakeEngine(), handshake_timeout_s=HANDSHAKE_S) as port:
        reader, writer = await _connect(port, DESCRIBE, until="info")
        await asyncio.sleep(HANDSHAKE_S * 2)
        writer.write(DESCRIBE)
        events = await _until(reader, "info")
        writer.close()

    assert [e.type for e in events] == ["info"]


def _reset(sock: socket.socket) -> bool:
    """Whether the server reset this connection (while this side reads nothing)."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
    except OSError:  # asyncio met the reset in a write and closed the socket
        return True


async def test_an_idle_client_that_does_not_read_makes_room_at_once_not_after_the_send_timeout() -> None:
    send_timeout_s = 5.0
    async with serving(FakeEngine(), {"max_connections": 1}, send_timeout_s=send_timeout_s) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
        sock.connect(("127.0.0.1", port))
        _reader, stalled_writer = await asyncio.open_connection(sock=sock)
        transport = stalled_writer.transport
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # not even into this process: the server's writes stall
        stalled_writer.write(DESCRIBE * DESCRIBES)
        await asyncio.sleep(0.5)  # the server answers until its writes stall
        started = time.monotonic()
        transcript = await _finish(await _connect(port, TRANSCRIBE + START, until="transcript-start"))
        for _ in range(int(send_timeout_s / POLL_S)):  # the kernel has no event to wait on for this
            if _reset(sock):
                break
            await asyncio.sleep(POLL_S)
        gone_after = time.monotonic() - started
        transport.abort()

    assert transcript == "w1"
    assert gone_after < send_timeout_s / 2
