"""The HTTP listener's gate: whom it serves (address, web origin, token) and how many at once, decided before a
request reaches the app."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from edge_asr.config import HttpSettings

from .access import (
    IPAddress,
    client_address,
    forwarded_for,
    network_allowed,
    origin_allowed,
    parse_address,
    parse_networks,
    token_matches,
    x_forwarded_for,
)

_LOGGER = logging.getLogger(__name__)

# Answered however many connections are open: a balancer must not take a full node for a dead one.
ALWAYS_SERVED_PATHS = frozenset({"/health", "/health/live", "/health/ready"})
# HTTP paths that need the token when one is set; the WebSocket always does.
TOKEN_PATHS = frozenset({"/metrics"})
BEARER_PREFIX = "bearer "
# The port of a client known only from a proxy's header.
UNKNOWN_PORT = 0


@dataclass(frozen=True)
class Refusal:
    """An HTTP status and the reason the client is told."""

    status: int
    reason: str


class AccessGate:
    """ASGI middleware in front of the app: 403 for an address outside `http.allowed_networks` or for a web page
    of a foreign origin, 401 without the token where one is needed, 503 past `http.max_connections` (except
    /health). The app then sees the client's address (read from a trusted proxy's headers) as `scope["client"]`."""

    def __init__(self, app: ASGIApp, settings: HttpSettings) -> None:
        self._app = app
        self._settings = settings
        self._networks = parse_networks(settings.allowed_networks)
        self._proxies = parse_networks(settings.trusted_proxies)
        # Requests and WebSockets being served. Not uvicorn's limit_concurrency: it never limits WebSocket upgrades,
        # and once that many connections are open it answers every plain request with 503, /health too.
        self._open = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request, or pass it on and count it while it is open."""
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        refusal = self._refusal(connection)
        if refusal is not None:
            client = connection.client.host if connection.client else "?"
            kind, path = scope["type"], scope["path"]
            _LOGGER.info("Refused %s %r from %s: %d %s", kind, path, client, refusal.status, refusal.reason)
            await _refuse(scope, receive, send, refusal)
            return
        self._open += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self._open -= 1

    def _refusal(self, connection: HTTPConnection) -> Refusal | None:
        client = connection.client
        peer = parse_address(client.host) if client is not None else None
        address = None if peer is None else self._client_address(peer, connection.headers)
        if client is None or address is None or not network_allowed(address, self._networks):
            return Refusal(403, "this address may not connect (http.allowed_networks)")
        # The app (which passes it to the engine) and uvicorn's log lines see the client, not its proxy.
        connection.scope["client"] = (str(address), client.port if address == peer else UNKNOWN_PORT)
        path, websocket = connection.scope["path"], connection.scope["type"] == "websocket"
        if self._open >= self._settings.max_connections and path not in ALWAYS_SERVED_PATHS:
            return Refusal(503, f"all {self._settings.max_connections} connections are in use (http.max_connections)")
        origin = connection.headers.get("origin")
        if websocket and origin is not None and not self._origin_allowed(connection, origin):
            return Refusal(403, "pages of this origin may not open the stream (http.allowed_origins)")
        if self._settings.token and (websocket or path in TOKEN_PATHS):
            given = [_bearer(connection.headers)] + ([connection.query_params.get("token")] if websocket else [])
            if not any(token_matches(candidate, self._settings.token) for candidate in given):
                return Refusal(401, "a valid token is needed (Authorization: Bearer, or ?token= for the WebSocket)")
        return None

    def _client_address(self, peer: IPAddress, headers: Headers) -> IPAddress | None:
        """The client's address, from a trusted proxy's headers when the peer is one; None when it cannot be told."""
        recorded = (x_forwarded_for(headers.getlist("x-forwarded-for")), forwarded_for(headers.getlist("forwarded")))
        chains = [chain for chain in recorded if chain]
        # A client may send either header itself and a proxy may pass it on untouched: when both are present and
        # name different clients, which one the proxy wrote cannot be told.
        candidates = {client_address(peer, chain, self._proxies) for chain in chains or [[]]}
        return candidates.pop() if len(candidates) == 1 else None

    def _origin_allowed(self, connection: HTTPConnection, origin: str) -> bool:
        """The service's own page (the scheme of this listener, the host and port the browser asked for) or one of
        `http.allowed_origins`."""
        scheme = "https" if connection.scope["scheme"] in ("https", "wss") else "http"
        own_origin = f"{scheme}://{connection.headers.get('host', '')}"
        return origin_allowed(origin, own_origin, self._settings.allowed_origins)


def _bearer(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer ...` header."""
    authorization = headers.get("authorization", "")
    if authorization[: len(BEARER_PREFIX)].lower() != BEARER_PREFIX:
        return None
    return authorization[len(BEARER_PREFIX) :].strip()


async def _refuse(scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
    """Answer with the refusal's status; a WebSocket gets it as the handshake's answer, before any upgrade."""
    # RFC 9110: a 401 names the scheme that would be accepted.
    headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
    response = PlainTextResponse(refusal.reason + "\n", refusal.status, headers=headers)
    if scope["type"] == "websocket":
        await WebSocket(scope, receive, send).send_denial_response(response)
    else:
        await response(scope, receive, send)
