"""Waiting in async tests: let the code under test work until a condition holds, failing (not hanging)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .fakes import FakeEngine

WAIT_S = 30.0


async def eventually(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Wait (letting the event loop run) until `condition` holds; fails after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


def state(engine: FakeEngine, component: str = "mqtt") -> str:
    """A component's state as the fake engine's /health would show it ("" before any)."""
    found = engine.components.get(component)
    return found.state if found is not None else ""
