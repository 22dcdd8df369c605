"""Wyoming for the tests beyond the client they share with the bench (edge_asr.bench.wyoming_client): raw wire
bytes (also generated ones, for fuzzing), PROXY protocol headers, and the adapter itself on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from hypothesis import strategies as st
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event, read_event
from wyoming.info import Describe, Info

from adapters.proxy_protocol import V2_SIGNATURE
from adapters.wyoming import WyomingAdapter
from edge_asr.api import SpeechEngine
from edge_asr.bench.processes import free_port
from edge_asr.config import build_settings

# PROXY v2: version 2 with the LOCAL or PROXY command; TCP over IPv4 or IPv6.
PROXY_V2_LOCAL, PROXY_V2_PROXY = 0x20, 0x21
PROXY_V2_TCP4, PROXY_V2_TCP6 = 0x11, 0x21
# What a fuzzed connection ends with: its pong tells that everything before it was answered.
END_MARK = "end-of-fuzzed-input"
END = json.dumps({"type": "ping", "data": {"text": END_MARK}}).encode() + b"\n"
# The codes of the faults input can have, whoever reads it (the README's table); none means an unforeseen fault.
FAULT_CODES = frozenset(
    {
        "bad_json",
        "bad_header",
        "too_large",
        "bad_data",
        "read_timeout",
        "bad_event",
        "bad_audio",
        "no_audio_start",
        "unknown_event",
        "unsupported_language",
        "bad_config",
    }
)


def raw_exchange(port: int, data: bytes, wait_s: float = 5.0, linger_s: float = 0.5) -> tuple[list[Event], bool]:
    """Write raw bytes; read events back with the wyoming framing until an info or error event, the server
    closing, or `wait_s`; return them and whether the server closed the connection."""
    events: list[Event] = []
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        with contextlib.suppress(ConnectionError):  # the server may close before it read everything
            sock.sendall(data)
        stream = sock.makefile("rb")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                event = read_event(stream)
            except ConnectionError:  # closed with bytes of ours unread: a reset after the events it sent
                return events, True
            except OSError:  # the read timed out
                return events, False
            if event is None:
                return events, True
            events.append(event)
            if event.type in ("info", "error"):
                # a connection the server means to close is closed right after the error
                deadline = min(deadline, time.monotonic() + linger_s)
    return events, False


def describe(port: int) -> Info:
    """The `info` a Wyoming server on a loopback port answers `describe` with."""

    async def ask() -> Info:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            event = await asyncio.wait_for(client.read_event(), 5)
            assert event is not None
            return Info.from_event(event)

    return asyncio.run(ask())


def wire_event(event_type: str, data: dict[str, object] | None = None, payload: bytes = b"") -> bytes:
    """An event's bytes on the wire, built by hand (so tests can also build wrong ones)."""
    header: dict[str, object] = {"type": event_type, "data": data or {}}
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header).encode() + b"\n" + payload


def error_codes(port: int, data: bytes, wait_s: float = 5.0) -> tuple[list[str], bool]:
    """The error codes the server answers raw bytes with, and whether it closed the connection."""
    events, closed = raw_exchange(port, data, wait_s)
    return [str(Error.from_event(e).code) for e in events if Error.is_type(e.type)], closed


async def async_exchange(
    port: int, data: bytes, until: str | Callable[[Event], bool] = "info", timeout_s: float = 5.0
) -> tuple[list[Event], bool]:
    """Write raw bytes on a new connection (from inside an event loop) and read events back until one of type
    `until` (or one `until` accepts) or the server closing the connection; return them and whether it closed.
    AssertionError when neither happens within `timeout_s`."""
    last = until if callable(until) else lambda event: event.type == until
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    events: list[Event] = []

    async def collect() -> bool:
        while True:
            try:
                event = await async_read_event(reader)
            except ConnectionError:  # closed with bytes of ours unread: a reset after the events it sent
                return True
            if event is None:
                return True
            events.append(event)
            if last(event):
                return False

    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):  # the server may close before it read everything
            await writer.drain()
        closed = await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise AssertionError(f"neither {until!r} nor a close within {timeout_s} s; got {events}") from None
    finally:
        writer.close()
    return events, closed


def proxy_v2(source: str, destination: str = "127.0.0.1", command: int = PROXY_V2_PROXY, tlvs: bytes = b"") -> bytes:
    """A PROXY protocol v2 header built by hand: TCP from `source` port 50000 to `destination` port 10300."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = PROXY_V2_TCP4 if src.version == 4 else PROXY_V2_TCP6
    block = src.packed + dst.packed + (50000).to_bytes(2, "big") + (10300).to_bytes(2, "big") + tlvs
    return V2_SIGNATURE + bytes([command, family]) + len(block).to_bytes(2, "big") + block


@contextlib.asynccontextmanager
async def serving(
    engine: SpeechEngine, wyoming: Mapping[str, object] | None = None, **limits: float
) -> AsyncIterator[int]:
    """The adapter listening on a free loopback port, with these `wyoming` and `limits` settings."""
    port = free_port()
    settings = build_settings({"wyoming": {"uri": f"tcp://127.0.0.1:{port}", **(wyoming or {})}, "limits": limits})
    adapter = WyomingAdapter(engine, settings)
    await adapter.start()
    try:
        yield port
    finally:
        await adapter.stop()


def assert_no_tracebacks(records: list[logging.LogRecord]) -> None:
    """Nothing at WARNING or above in `records`, such as a task that died with nobody to see it (reported when
    it is collected, hence the collection first)."""
    gc.collect()
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Any JSON value: scalars, and lists and objects of them."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=max_leaves,
    )


def _request() -> bytes:
    """A satellite's request as the wyoming package writes it (data in a data block)."""
    events = [
        Transcribe(language="en", context={"site": "hall"}).event(),
        AudioStart(rate=16000, width=2, channels=1).event(),
        AudioChunk(rate=16000, width=2, channels=1, audio=bytes(64)).event(),
        AudioStop().event(),
    ]
    return b"".join(_written(event) for event in events)


def _written(event: Event) -> bytes:
    header: dict[str, object] = {"type": event.type}
    block = json.dumps(event.data).encode()
    if event.data:
        header["data_length"] = len(block)
    if event.payload:
        header["payload_length"] = len(event.payload)
    return json.dumps(header).encode() + b"\n" + (block if event.data else b"") + (event.payload or b"")


REQUEST = _request()


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A valid request with bytes changed, inserted, deleted, or cut off."""
    data = bytearray(REQUEST)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        operation = draw(st.sampled_from(["change", "insert", "delete", "cut"]))
        byte = draw(st.integers(0, 255))
        if operation == "change" and position < len(data):
            data[position] = byte
        elif operation == "insert":
            data.insert(position, byte)
        elif operation == "delete" and position < len(data):
            del data[position]
        elif operation == "cut":
            del data[position:]
    return bytes(data)


@st.composite
def misframed_events(draw: st.DrawFn) -> bytes:
    """An event whose announced data or payload length is not what follows."""
    block = json.dumps(draw(st.dictionaries(st.text(max_size=6), json_values(), max_size=3))).encode()
    payload = draw(st.binary(max_size=64))
    header: dict[str, object] = {"type": draw(st.sampled_from(["audio-chunk", "transcribe", "describe"]))}
    header["data_length"] = max(0, len(block) + draw(st.integers(-len(block), 8)))
    header["payload_length"] = draw(st.one_of(st.integers(0, 128), json_values(2)))
    return json.dumps(header).encode() + b"\n" + block + payload


def wire_inputs() -> st.SearchStrategy[bytes]:
    """Bytes a broken or hostile client could send: mutated requests, misframed events, anything."""
    return st.one_of(mutated_requests(), misframed_events(), st.binary(max_size=200))


def exchange_to_end(port: int, data: bytes, wait_s: float = 5.0) -> tuple[list[Event], bool]:
    """Write raw bytes and END on a new connection; the events up to END's pong or the server's close, and
    whether it closed. AssertionError when neither comes within `wait_s`."""
    events: list[Event] = []
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        with contextlib.suppress(ConnectionError):  # the server may close before it read everything
            sock.sendall(data + END)
        stream = sock.makefile("rb")
        while True:
            try:
                event = read_event(stream)
            except ConnectionError:  # closed with bytes of ours unread: a reset after the events it sent
                return events, True
            except TimeoutError:
                raise AssertionError(f"neither END's pong nor a close within {wait_s} s; got {events}") from None
            if event is None:
                return events, True
            events.append(event)
            if event.type == "pong" and event.data.get("text") == END_MARK:
                return events, False


def assert_answered(events: list[Event], closed: bool) -> None:
    """The invariant for any input followed by END: a connection the server closed ended with the error event
    that says why; one it kept answered everything up to END. Every error is a fault of the input."""
    codes = {str(e.data.get("code")) for e in events if Error.is_type(e.type)}
    assert codes <= FAULT_CODES
    if closed:
        assert events, "closed without an error event"
        assert Error.is_type(events[-1].type), f"closed after {events[-1].type}, not an error"
    else:
        assert events[-1].type == "pong"
        assert events[-1].data.get("text") == END_MARK
