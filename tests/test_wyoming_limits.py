"""Bounded Wyoming connections on the real service: idle sockets, slow headers and a flood of connections
neither queue nor crowd out a satellite, memory and descriptors stay bounded, /health answers throughout;
behind a trusted balancer the engine caps sessions per real client address."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from wyoming.error import Error
from wyoming.event import Event, async_read_event

from edge_asr.bench.processes import Service
from edge_asr.bench.wyoming_client import transcribe, transcript_text

from .server import start_service
from .speech import normalise, read_pcm, reference
from .wyoming_client import proxy_v2, wire_event

CLIP = "asterisk_conf-hasjoin"
# Short enough that the idle sockets of a test expire while it runs.
HANDSHAKE_S = 3.0
# How long after the last connection of a flood every refused one must have had its answer.
ANSWER_S = 3.0
# What many connections may add to the service's memory (they hold no audio).
RSS_GROWTH_KIB = 32 * 1024
FLOOD = 1000
# The default wyoming.max_connections.
DEFAULT_MAX_CONNECTIONS = 64
TRANSCRIBE = wire_event("transcribe", {"language": "en"})
START = wire_event("audio-start", {"rate": 16000, "width": 2, "channels": 1})
CHUNK = wire_event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, bytes(3200))
STOP = wire_event("audio-stop")

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _rss_kib(pid: int) -> int:
    """A process's resident memory, as the kernel counts it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def _health_watched(service: Service) -> Iterator[list[int]]:
    """/health's status every 0.2 s while the block runs (0 for no answer at all)."""
    statuses: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                statuses.append(service.health()[0])
            except OSError:
                statuses.append(0)
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield statuses
    finally:
        done.set()
        watcher.join()


async def _answer(reader: asyncio.StreamReader, wait_s: float) -> tuple[list[str], bool]:
    """The error codes a connection gets within `wait_s`, and whether it was closed by then."""
    codes: list[str] = []

    async def read() -> None:
        while (event := await async_read_event(reader)) is not None:
            assert Error.is_type(event.type), f"{event.type} on a connection that sent nothing"
            codes.append(str(Error.from_event(event).code))

    try:
        await asyncio.wait_for(read(), wait_s)
    except asyncio.TimeoutError:
        return codes, False
    except ConnectionError:
        pass
    return codes, True


async def _slow_header(port: int) -> tuple[list[str], float]:
    """A client that sends a header a byte at a time, slower than the handshake time allows: what it gets,
    and after how long the server closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    answer = asyncio.create_task(_answer(reader, HANDSHAKE_S + 10))
    for byte in wire_event("describe"):
        if answer.done():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.25)
    codes, _closed = await answer
    writer.close()
    return codes, time.monotonic() - started


def test_idle_and_slow_clients_cannot_crowd_out_a_satellite(tmp_path: Path) -> None:
    cap = 50
    service = start_service(tmp_path, f"wyoming.max_connections={cap}", f"limits.handshake_timeout_s={HANDSHAKE_S}")

    async def crowd() -> tuple[list[tuple[list[str], bool]], tuple[list[str], float], str, int]:
        port = service.wyoming_port
        before = _rss_kib(service.process.pid)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
        slow = asyncio.create_task(_slow_header(port))
        await asyncio.sleep(0.5)
        growth = _rss_kib(service.process.pid) - before
        received, _stop_at = await transcribe(port, read_pcm(CLIP))
        answers = await asyncio.gather(*(_answer(reader, HANDSHAKE_S + 5) for reader, _writer in idle))
        for _reader, writer in idle:
            writer.close()
        return answers, await slow, transcript_text(received), growth

    try:
        with _health_watched(service) as statuses:
            idle_answers, (slow_codes, slow_closed_after), text, growth = asyncio.run(crowd())
    finally:
        service.stop()

    assert normalise(text) == normalise(reference(CLIP)), "the satellite was served"
    assert all(closed for _codes, closed in idle_answers)
    # The slow client and the satellite each took the place of the connection idle longest; the rest of
    # the idle sockets met the handshake time limit.
    assert Counter(tuple(codes) for codes, _closed in idle_answers) == {
        ("too_many_connections",): 2,
        ("handshake_timeout",): cap - 2,
    }
    assert slow_codes == ["handshake_timeout"]
    assert HANDSHAKE_S - 0.1 <= slow_closed_after < HANDSHAKE_S + 2
    assert growth < RSS_GROWTH_KIB
    assert statuses
    assert set(statuses) == {200}


def test_a_flood_of_connections_is_answered_at_once_not_queued(service: Service) -> None:
    pid = service.process.pid

    async def flood() -> tuple[list[tuple[list[str], bool]], int, int, str]:
        rss, descriptors = _rss_kib(pid), _descriptors(pid)
        connections = [await asyncio.open_connection("127.0.0.1", service.wyoming_port) for _ in range(FLOOD)]
        answers = await asyncio.gather(*(_answer(reader, ANSWER_S) for reader, _writer in connections))
        extra_descriptors = _descriptors(pid) - descriptors
        rss_growth = _rss_kib(pid) - rss
        # The cap is full of idle connections: a satellite still gets in.
        received, _stop_at = await transcribe(service.wyoming_port, read_pcm(CLIP))
        for _reader, writer in connections:
            writer.close()
        return answers, extra_descriptors, rss_growth, transcript_text(received)

    with _health_watched(service) as statuses:
        answers, extra_descriptors, rss_growth, text = asyncio.run(flood())

    refused = [codes for codes, closed in answers if closed]
    still_open = [codes for codes, closed in answers if not closed]
    assert len(still_open) <= DEFAULT_MAX_CONNECTIONS
    assert not [codes for codes in still_open if codes], "an open connection got an error"
    assert len(refused) >= FLOOD - DEFAULT_MAX_CONNECTIONS
    assert {tuple(codes) for codes in refused} == {("too_many_connections",)}
    assert extra_descriptors <= DEFAULT_MAX_CONNECTIONS + 8
    assert rss_growth < RSS_GROWTH_KIB
    assert normalise(text) == normalise(reference(CLIP))
    assert statuses
    assert set(statuses) == {200}
    assert service.sessions_drop_to(0)


async def _read_until(reader: asyncio.StreamReader, event_type: str) -> list[Event]:
    events: list[Event] = []
    while not events or events[-1].type != event_type:
        event = await asyncio.wait_for(async_read_event(reader), 10)
        assert event is not None, f"closed before {event_type}; got {events}"
        events.append(event)
    return events


async def _proxied(port: int, client: str, data: bytes) -> Connection:
    """A connection through a balancer (this host) for `client` that sent `data`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(proxy_v2(client) + data)
    return reader, writer


def test_behind_a_balancer_the_engine_caps_sessions_per_real_client_address(tmp_path: Path) -> None:
    service = start_service(tmp_path, "wyoming.trusted_proxies=127.0.0.1/32", "limits.max_sessions_per_address=1")

    async def two_clients() -> tuple[list[Event], list[Event], list[Event]]:
        port = service.wyoming_port
        first_reader, first_writer = await _proxied(port, "192.168.1.50", TRANSCRIBE + START + CHUNK)
        await _read_until(first_reader, "transcript-start")
        same_reader, same_writer = await _proxied(port, "192.168.1.50", TRANSCRIBE + START + CHUNK + STOP)
        same = await _read_until(same_reader, "transcript-stop")
        other_reader, other_writer = await _proxied(port, "192.168.1.51", TRANSCRIBE + START + CHUNK + STOP)
        other = await _read_until(other_reader, "transcript-stop")
        first_writer.write(STOP)
        first = await _read_until(first_reader, "transcript-stop")
        for writer in (first_writer, same_writer, other_writer):
            writer.close()
        return same, other, first

    try:
        same, other, first = asyncio.run(two_clients())
        assert service.sessions_drop_to(0)
    finally:
        service.stop()

    assert [e.type for e in same] == ["error", "transcript", "transcript-stop"]
    assert Error.from_event(same[0]).code == "busy"
    assert not [e for e in other + first if Error.is_type(e.type)], "other addresses and the first are served"
    assert other[0].type == "transcript-start"
