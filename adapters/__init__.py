"""Protocol adapters that drive the edge-asr engine: WebSocket/HTTP with the live page, Wyoming and MQTT."""

from __future__ import annotations

from typing import Protocol


class Adapter(Protocol):
    """What the service needs of an adapter: a name for the log, and a start and a stop."""

    name: str

    async def start(self) -> None:
        """Begin serving (listen, or connect); raises when it cannot."""

    async def stop(self) -> None:
        """Stop serving and release what it holds; safe after a failed or partial start."""
