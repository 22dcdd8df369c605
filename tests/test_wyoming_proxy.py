"""PROXY protocol headers: the parser on its own (by hand and with hypothesis), and the Wyoming adapter taking
the client's address from a trusted balancer's header on a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from wyoming.error import Error

from adapters.proxy_protocol import (
    V1_MAX_BYTES,
    V2_SIGNATURE,
    ProxyHeaderError,
    parse_v1,
    parse_v2,
    read_proxy_header,
)

from .fakes import FakeEngine
from .wyoming_client import (
    PROXY_V2_LOCAL,
    assert_no_tracebacks,
    async_exchange,
    proxy_v2,
    serving,
    wire_event,
)

pytestmark = pytest.mark.fast

WAIT_S = 5.0
LOOPBACK = {"trusted_proxies": ["127.0.0.1/32"]}
DESCRIBE = wire_event("describe")
START = wire_event("audio-start", {"rate": 16000, "width": 2, "channels": 1})
CHUNK = wire_event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, bytes(640))
REQUEST = wire_event("transcribe", {"language": "en"}) + START + CHUNK * 2 + wire_event("audio-stop")
# A PP2_TYPE_UNIQUE_ID record as HAProxy appends it: type, 2-byte length, value.
UNIQUE_ID_TLV = b"\x05\x00\x04abcd"


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test checks at its end that nothing reached the log at WARNING or above."""
    caplog.set_level(logging.DEBUG)
    yield
    assert_no_tracebacks(caplog.get_records("setup") + caplog.get_records("call"))


async def _read_header(data: bytes) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, bytes]:
    """What `read_proxy_header` makes of a stream of `data`, and the bytes it left unread."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    address = await read_proxy_header(reader)
    return address, await reader.read()


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (proxy_v2("192.168.1.50"), "192.168.1.50"),
        (proxy_v2("fd00::5", "fd00::1"), "fd00::5"),
        (proxy_v2("::ffff:192.168.1.50", "::1"), "192.168.1.50"),
        (proxy_v2("192.168.1.50", tlvs=UNIQUE_ID_TLV), "192.168.1.50"),
        (proxy_v2("192.168.1.50", command=PROXY_V2_LOCAL), None),
        (V2_SIGNATURE + b"\x20\x00\x00\x00", None),
        (V2_SIGNATURE + b"\x21\x00\x00\x00", None),
        (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), None),
        (b"PROXY TCP4 192.168.1.50 10.0.0.2 50000 10300\r\n", "192.168.1.50"),
        (b"PROXY TCP6 fd00::5 fd00::1 50000 10300\r\n", "fd00::5"),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
    ],
    ids=[
        "v2-tcp4",
        "v2-tcp6",
        "v2-ipv4-mapped",
        "v2-tlv",
        "v2-local",
        "v2-local-unspec",
        "v2-proxy-unspec",
        "v2-unix",
        "v1-tcp4",
        "v1-tcp6",
        "v1-unknown",
        "v1-unknown-with-rest",
    ],
)
async def test_a_header_names_the_client_and_nothing_after_it_is_read(header: bytes, client: str | None) -> None:
    address, rest = await _read_header(header + DESCRIBE)

    assert (str(address) if address else None) == client
    assert rest == DESCRIBE


@pytest.mark.parametrize(
    "header",
    [
        b"",
        DESCRIBE,
        V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c" + bytes(12),
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),
        V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),
        V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),
        V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8),
        V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),
        proxy_v2("192.168.1.50", tlvs=b"\x05\x00\x09abcd"),
        proxy_v2("192.168.1.50", tlvs=b"\x05\x00"),
        proxy_v2("192.168.1.50")[:20],
        b"PROXY TCP4 192.168.1.50 10.0.0.2 50000 10300\n",
        b"PROXY TCP4 192.168.1.50 10.0.0.2 50000 10300",
        b"PROXY TCP4 192.168.1.50 10.0.0.2 50000\r\n",
        b"PROXY TCP4 192.168.1.50 10.0.0.2 50000 10300 x\r\n",
        b"PROXY TCP4 192.168.1.50 10.0.0.2 50000 65536\r\n",
        b"PROXY TCP4 192.168.1.50 10.0.0.2 -1 10300\r\n",
        b"PROXY TCP4 192.168.001.50 10.0.0.2 50000 10300\r\n",
        b"PROXY TCP4 fd00::5 10.0.0.2 50000 10300\r\n",
        b"PROXY TCP6 192.168.1.50 fd00::1 50000 10300\r\n",
        b"PROXY TCP6 fe80::1%eth0 fd00::1 50000 10300\r\n",
        b"PROXY tcp4 192.168.1.50 10.0.0.2 50000 10300\r\n",
        b"PROXY TCP4  192.168.1.50 10.0.0.2 50000 10300\r\n",
        b"PROXY TCP4 \xc0.168.1.50 10.0.0.2 50000 10300\r\n",
        b"PROXY UNKNOWN " + b"x" * V1_MAX_BYTES + b"\r\n",
    ],
    ids=[
        "empty",
        "no-header",
        "v2-bad-signature",
        "v2-version-1",
        "v2-command-2",
        "v2-udp",
        "v2-unknown-family",
        "v2-short-addresses",
        "v2-tcp6-short",
        "v2-tlv-overrun",
        "v2-tlv-cut",
        "v2-cut",
        "v1-lf-only",
        "v1-no-end",
        "v1-missing-port",
        "v1-extra-field",
        "v1-port-too-large",
        "v1-negative-port",
        "v1-leading-zero",
        "v1-tcp4-with-ipv6",
        "v1-tcp6-with-ipv4",
        "v1-scope",
        "v1-lowercase",
        "v1-double-space",
        "v1-not-ascii",
        "v1-too-long",
    ],
)
async def test_a_bad_header_is_refused(header: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        await _read_header(header)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
@example(data=V2_SIGNATURE + b"\x21\x11\xff\xff")
@example(data=b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r")
async def test_random_bytes_only_ever_raise_the_parsers_error(data: bytes) -> None:
    for parse in (parse_v1, parse_v2):
        with contextlib.suppress(ProxyHeaderError):
            parse(data)
    try:
        address, _rest = await _read_header(data)
    except ProxyHeaderError:
        return
    assert address is None or isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address))


_VALID_HEADERS = st.sampled_from(
    [
        proxy_v2("192.168.1.50"),
        proxy_v2("fd00::5", "fd00::1", tlvs=UNIQUE_ID_TLV),
        b"PROXY TCP4 192.168.1.50 10.0.0.2 50000 10300\r\n",
        b"PROXY TCP6 fd00::5 fd00::1 50000 10300\r\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(header=_VALID_HEADERS, position=st.integers(min_value=0), byte=st.integers(0, 255), tail=st.binary())
async def test_a_mutated_header_is_refused_or_read_to_its_end_and_no_further(
    header: bytes, position: int, byte: int, tail: bytes
) -> None:
    index = position % len(header)
    mutated = header[:index] + bytes([byte]) + header[index + 1 :]
    try:
        _address, rest = await _read_header(mutated + tail)
    except ProxyHeaderError:
        return
    # A header read whole: a v2 header is as long as it says, a v1 line ends at its first line feed.
    if mutated.startswith(V2_SIGNATURE):
        end = 16 + int.from_bytes(mutated[14:16], "big")
    else:
        end = (mutated + tail).index(b"\n") + 1
    assert rest == (mutated + tail)[end:]


async def _request_from(port: int, header: bytes) -> tuple[list[str], str | None]:
    """Error codes and the transcript a request gets after `header` on a new connection."""
    events, closed = await async_exchange(port, header + REQUEST, until="transcript-stop", timeout_s=WAIT_S)
    codes = [str(Error.from_event(e).code) for e in events if Error.is_type(e.type)]
    transcripts = [str(e.data["text"]) for e in events if e.type == "transcript"]
    assert closed == bool(codes), "a refused connection is closed; a served one is not"
    return codes, transcripts[0] if transcripts else None


@pytest.mark.parametrize(
    ("header", "peer"),
    [
        (proxy_v2("192.168.1.50"), "192.168.1.50"),
        (proxy_v2("fd00::5", "fd00::1"), "fd00::5"),
        (proxy_v2("::ffff:192.168.1.50", "::1"), "192.168.1.50"),
        (proxy_v2("203.0.113.7", command=PROXY_V2_LOCAL), "127.0.0.1"),
        (b"PROXY TCP4 10.1.2.3 10.0.0.2 50000 10300\r\n", "10.1.2.3"),
    ],
    ids=["v2-tcp4", "v2-tcp6", "v2-ipv4-mapped", "v2-local", "v1-tcp4"],
)
async def test_a_trusted_balancers_header_names_the_client_the_engine_sees(header: bytes, peer: str) -> None:
    engine = FakeEngine()
    async with serving(engine, LOOPBACK) as port:
        codes, transcript = await _request_from(port, header)

    assert (codes, transcript) == ([], "w1 w2")
    assert engine.peers == [peer]


async def test_the_allow_list_checks_the_client_the_header_names_not_the_balancer() -> None:
    engine = FakeEngine()
    async with serving(engine, LOOPBACK) as port:
        codes, transcript = await _request_from(port, proxy_v2("203.0.113.7"))

    assert (codes, transcript) == (["forbidden"], None)
    assert not engine.sessions


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (b"", "bad_proxy_header"),
        (b"PROXY TCP4 192.168.1.50\r\n", "bad_proxy_header"),
        (V2_SIGNATURE + b"\x21\x22\x00\x24" + bytes(36), "bad_proxy_header"),
    ],
    ids=["missing", "v1-garbage", "v2-udp"],
)
async def test_a_trusted_peer_without_a_good_header_is_closed(header: bytes, code: str) -> None:
    engine = FakeEngine()
    async with serving(engine, LOOPBACK) as port:
        codes, transcript = await _request_from(port, header)

    assert (codes, transcript) == ([code], None)
    assert not engine.sessions


@pytest.mark.parametrize(
    "header",
    [proxy_v2("192.168.1.50"), b"PROXY TCP4 192.168.1.50 10.0.0.2 50000 10300\r\n"],
    ids=["v2", "v1"],
)
async def test_a_header_from_a_peer_that_is_not_trusted_is_just_bad_input(header: bytes) -> None:
    engine = FakeEngine()
    async with serving(engine) as port:
        codes, transcript = await _request_from(port, header)

    assert (codes, transcript) == (["bad_json"], None)
    assert not engine.sessions


async def test_a_header_sent_byte_by_byte_meets_the_handshake_time_limit() -> None:
    handshake_s = 0.5
    header = proxy_v2("192.168.1.50")
    async with serving(FakeEngine(), LOOPBACK, handshake_timeout_s=handshake_s) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = asyncio.get_running_loop().time()
        answer = asyncio.create_task(reader.read())
        for byte in header[:-1]:
            if answer.done():  # closed: what we would send now could only reset the connection
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(handshake_s / 10)
        await asyncio.wait_for(answer, WAIT_S)
        closed_after = asyncio.get_running_loop().time() - started
        writer.close()

    assert b'"handshake_timeout"' in answer.result()
    assert handshake_s <= closed_after < handshake_s + 1.0
