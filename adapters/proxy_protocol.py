"""The PROXY protocol header (v2 binary, v1 text) a trusted balancer sends first: the client's real address."""

from __future__ import annotations

import asyncio
import ipaddress
import re

from .access import IPAddress

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
# The longest v1 line the specification allows ("PROXY UNKNOWN" with two IPv6 addresses and ports, CRLF).
V1_MAX_BYTES = 107
# Signature, version and command, family and transport, and the 2-byte length of what follows.
V2_FIXED_BYTES = 16
_V2_VERSION = 2
_LOCAL, _PROXY = 0, 1
# Family (high nibble) and transport (low nibble) bytes this server takes, with their address bytes: a
# source and a destination address, then a source and a destination port.
_UNSPEC = 0x00
_TCP4, _TCP6, _UNIX_STREAM = 0x11, 0x21, 0x31
_ADDRESS_BLOCK = {_TCP4: 2 * 4 + 4, _TCP6: 2 * 16 + 4, _UNIX_STREAM: 2 * 108}
_TLV_HEADER_BYTES = 3
_V1_ADDRESS = {"TCP4": re.compile(r"[0-9.]{7,15}"), "TCP6": re.compile(r"[0-9A-Fa-f:.]{2,45}")}
_PORT = re.compile(r"[0-9]{1,5}")
_MAX_PORT = 65_535


class ProxyHeaderError(Exception):
    """A PROXY header that is malformed, of a kind this server does not take, or cut short."""


async def read_proxy_header(reader: asyncio.StreamReader) -> IPAddress | None:
    """Read one PROXY header (v2, or v1) and nothing after it; the client's address, or None when the header
    says the connection's own peer is the client (v2 `LOCAL`, as in health checks; `UNSPEC`; v1 `UNKNOWN`).
    Raises ProxyHeaderError (or what was set on `reader`); the caller bounds the time it may take."""
    first = await _exactly(reader, 1)
    if first == V2_SIGNATURE[:1]:
        fixed = first + await _exactly(reader, V2_FIXED_BYTES - 1)
        return parse_v2(fixed + await _exactly(reader, v2_length(fixed)))
    if first == V1_PREFIX[:1]:
        line = first
        # Byte by byte: nothing of the first event may be consumed, and the line is short.
        while not line.endswith(b"\n"):
            if len(line) >= V1_MAX_BYTES:
                raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX_BYTES} bytes")
            line += await _exactly(reader, 1)
        return parse_v1(line)
    raise ProxyHeaderError("the connection does not start with a PROXY protocol header")


def v2_length(fixed: bytes) -> int:
    """The byte count after a v2 header's first 16 bytes, once these are checked."""
    if len(fixed) != V2_FIXED_BYTES or not fixed.startswith(V2_SIGNATURE):
        raise ProxyHeaderError("not a PROXY v2 signature")
    if fixed[12] >> 4 != _V2_VERSION:
        raise ProxyHeaderError(f"PROXY protocol version {fixed[12] >> 4} is not 2")
    if fixed[12] & 0x0F not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"PROXY v2 command {fixed[12] & 0x0F} is neither LOCAL nor PROXY")
    return int.from_bytes(fixed[14:16], "big")


def parse_v2(header: bytes) -> IPAddress | None:
    """The source address of a whole v2 header (16 bytes, then as many as it announces)."""
    length = v2_length(header[:V2_FIXED_BYTES])
    body = header[V2_FIXED_BYTES:]
    if len(body) != length:
        raise ProxyHeaderError(f"PROXY v2 header announces {length} bytes after its first 16, not {len(body)}")
    if header[12] & 0x0F == _LOCAL:  # the balancer's own connection: its block, if any, says nothing
        return None
    family = header[13]
    if family == _UNSPEC:
        return None
    if family not in _ADDRESS_BLOCK:
        raise ProxyHeaderError(f"PROXY v2 family and transport 0x{family:02x} is not TCP over IPv4, IPv6 or a socket")
    block = _ADDRESS_BLOCK[family]
    if length < block:
        raise ProxyHeaderError(f"PROXY v2 addresses need {block} bytes, the header has {length}")
    _check_tlvs(body[block:])
    if family == _UNIX_STREAM:  # the client is local to the balancer, which is trusted: it is the client
        return None
    size = block // 2 - 2
    return _client(ipaddress.ip_address(body[:size]))


def _check_tlvs(tlvs: bytes) -> None:
    """The type-length-value records after the addresses must fill their space exactly (their contents are
    not needed here)."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < _TLV_HEADER_BYTES:
            raise ProxyHeaderError("PROXY v2 header ends inside a TLV header")
        offset += _TLV_HEADER_BYTES + int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
        if offset > len(tlvs):
            raise ProxyHeaderError("PROXY v2 TLV longer than the header")


def parse_v1(line: bytes) -> IPAddress | None:
    """The source address of a v1 line (`PROXY TCP4 src dst sport dport\\r\\n`; `PROXY UNKNOWN ...\\r\\n`)."""
    if len(line) > V1_MAX_BYTES or not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyHeaderError("not a PROXY v1 line")
    try:
        fields = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    protocol = fields[1]
    if protocol == "UNKNOWN":  # the rest of the line is to be ignored
        return None
    if protocol not in _V1_ADDRESS or len(fields) != 6:
        raise ProxyHeaderError("PROXY v1 line must be PROXY TCP4|TCP6 source destination sport dport")
    source, destination, *ports = fields[2:]
    for port in ports:
        if not _PORT.fullmatch(port) or int(port) > _MAX_PORT:
            raise ProxyHeaderError("PROXY v1 port must be a number from 0 to 65535")
    pattern = _V1_ADDRESS[protocol]
    addresses = []
    for text in (source, destination):
        try:
            # The pattern first: it keeps out what the parser would take besides a plain address (a scope).
            address = ipaddress.ip_address(text) if pattern.fullmatch(text) else None
        except ValueError:
            address = None
        if address is None or f"TCP{address.version}" != protocol:
            raise ProxyHeaderError(f"PROXY v1 address is not an {protocol} address")
        addresses.append(address)
    return _client(addresses[0])


def _client(address: IPAddress) -> IPAddress:
    """The source address as the client's: a balancer listening on IPv6 shows an IPv4 client as IPv4-mapped."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


async def _exactly(reader: asyncio.StreamReader, count: int) -> bytes:
    try:
        return await reader.readexactly(count)
    except asyncio.IncompleteReadError:
        raise ProxyHeaderError("the connection ended inside the PROXY header") from None
