"""Who may connect, as pure functions: the client behind trusted proxies, networks, origins and tokens."""

from __future__ import annotations

import ipaddress

import pytest

from adapters.access import (
    client_address,
    forwarded_for,
    network_allowed,
    origin_allowed,
    parse_address,
    parse_networks,
    token_matches,
    x_forwarded_for,
)

pytestmark = pytest.mark.fast

PROXIES = parse_networks(["10.0.0.0/24", "fd00::/64"])
PROXY = ipaddress.ip_address("10.0.0.2")


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        ([], "10.0.0.2"),  # the balancer's own request (a health check)
        (["192.168.1.7"], "192.168.1.7"),
        (["203.0.113.9", "192.168.1.7"], "192.168.1.7"),  # what the client wrote itself is left of the truth
        (["192.168.1.7", "10.0.0.1"], "192.168.1.7"),  # a second trusted proxy in front
        (["192.168.1.7:51234"], "192.168.1.7"),
        (["[2001:db8::7]:4711"], "2001:db8::7"),
        (["10.0.0.1", "10.0.0.3"], "10.0.0.1"),  # proxies all the way: the farthest
        (["192.168.1.7", "unknown"], None),
        (["192.168.1.7", "_hidden"], None),
        ([""], None),
    ],
)
def test_a_trusted_proxy_names_the_rightmost_address_that_is_not_a_proxy(
    forwarded: list[str], client: str | None
) -> None:
    address = client_address(PROXY, forwarded, PROXIES)

    assert address == (None if client is None else ipaddress.ip_address(client))


def test_an_untrusted_peer_is_the_client_whatever_it_claims() -> None:
    peer = ipaddress.ip_address("192.168.1.50")

    assert client_address(peer, ["127.0.0.1"], PROXIES) == peer


def test_forwarded_headers_read_as_the_chain_client_first() -> None:
    assert x_forwarded_for(["192.168.1.7, 10.0.0.1", "10.0.0.3"]) == ["192.168.1.7", "10.0.0.1", "10.0.0.3"]
    assert forwarded_for(['for=192.168.1.7;proto=https, For="[2001:db8::7]:4711"', "by=10.0.0.1"]) == [
        "192.168.1.7",
        '"[2001:db8::7]:4711"',
        "",
    ]


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("192.168.1.5", True),
        ("::ffff:192.168.1.5", True),  # how a dual-stack listener reports an IPv4 client
        ("fe80::1%eth0", True),
        ("8.8.8.8", False),
        ("2001:4860::8888", False),
    ],
)
def test_networks_hold_addresses_of_either_family(address: str, allowed: bool) -> None:
    parsed = parse_address(address)

    assert parsed is not None
    assert network_allowed(parsed, parse_networks(["192.168.0.0/16", "fe80::/10"])) is allowed


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://127.0.0.1:8787", True),  # the service's own page
        ("HTTP://127.0.0.1:8787", True),
        ("http://Hub.local", True),
        ("http://hub.local:80", True),
        ("https://hub.local", False),  # another scheme is another origin
        ("http://127.0.0.1:8788", False),
        ("http://evil.example", False),
        ("null", False),  # a sandboxed frame or a file:// page
        ("http://[::1", False),
        ("", False),
    ],
)
def test_an_origin_is_the_own_page_or_a_listed_one(origin: str, allowed: bool) -> None:
    assert origin_allowed(origin, "http://127.0.0.1:8787", ["http://hub.local"]) is allowed


def test_a_token_matches_only_itself() -> None:
    assert token_matches("s3cret-ü", "s3cret-ü")
    assert not token_matches("s3cret", "s3cret-ü")
    assert not token_matches("", "s3cret")
    assert not token_matches(None, "s3cret")
    assert not token_matches("\udcff", "s3cret")  # a lone surrogate is compared, not an exception
