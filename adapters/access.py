"""Who may connect, for any adapter: client addresses behind trusted proxies, network allow-lists, web origins
and shared tokens."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_networks(networks: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings (the settings have checked them) as networks."""
    return tuple(ipaddress.ip_network(network, strict=False) for network in networks)


def parse_address(text: str) -> IPAddress | None:
    """An IP address, IPv4-mapped IPv6 (`::ffff:192.168.1.5`, as a dual-stack socket reports IPv4 peers) as
    IPv4; None for anything else (`unknown`, an obfuscated RFC 7239 node, a host name)."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def network_allowed(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    """Whether `address` is in one of `networks`."""
    return any(address in network for network in networks)


def client_address(peer: IPAddress, forwarded: Sequence[str], trusted: Sequence[IPNetwork]) -> IPAddress | None:
    """The client's address: `peer`, or, when `peer` is a trusted proxy, the rightmost address of `forwarded`
    (the addresses the proxies recorded, client first) that is not itself a trusted proxy. None when the entry
    that would name the client is not an address: the client cannot be told, so it must not be let in."""
    if not network_allowed(peer, trusted):
        return peer  # anyone can write forwarded headers: only a trusted proxy's are believed
    address = peer
    for entry in reversed(forwarded):
        parsed = parse_address(_without_port(entry))
        if parsed is None:
            return None
        address = parsed
        if not network_allowed(address, trusted):
            return address
    return address  # every hop was a trusted proxy: the farthest is the client


def x_forwarded_for(values: Iterable[str]) -> list[str]:
    """The addresses of `X-Forwarded-For` header values, client first (several headers read as one list)."""
    return [item.strip() for value in values for item in value.split(",")]


def forwarded_for(values: Iterable[str]) -> list[str]:
    """The `for=` nodes of RFC 7239 `Forwarded` header values, client first; "" for an element without one."""
    nodes = []
    for value in values:
        for element in value.split(","):
            pairs = (pair.partition("=") for pair in element.split(";"))
            nodes.append(next((node.strip() for name, _, node in pairs if name.strip().lower() == "for"), ""))
    return nodes


def _without_port(node: str) -> str:
    """The address of a node as proxies write it: `"[2001:db8::1]:4711"`, `192.0.2.1:80` or a bare address."""
    node = node.strip().strip('"')
    if node.startswith("["):
        return node[1:].partition("]")[0]
    if node.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has several colons
        return node.partition(":")[0]
    return node


def origin_allowed(origin: str, own_origin: str, allowed: Iterable[str]) -> bool:
    """Whether a browser page at `origin` may connect: the service's own page, or one of `allowed`
    (compared as scheme, host and port, so `http://Hub:80` is `http://hub`)."""
    key = _origin_key(origin)
    return key is not None and any(key == _origin_key(other) for other in (own_origin, *allowed))


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:  # a port that is not a number, or an unbalanced IPv6 bracket
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname, port or DEFAULT_PORTS[scheme]


def token_matches(given: str | None, token: str) -> bool:
    """Whether `given` is `token`, compared in constant time (no timing tells how much of a guess was right)."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass"))
