"""Waiting in tests: let the code under test work until a condition holds, failing (not hanging). The one polling
helper, for async tests (`eventually`) and for threads and processes (`until`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .fakes import FakeEngine

WAIT_S = 30.0
# Short against what the tests wait for (a decode, a connection), long enough not to spin.
POLL_S = 0.02


async def eventually(condition: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "the condition") -> float:
    """Wait (letting the event loop run) until `condition` holds; the seconds it took. Fails after `timeout_s`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not condition():
        assert loop.time() - started < timeout_s, f"{what}: not reached within {timeout_s} s"
        await asyncio.sleep(POLL_S)
    return loop.time() - started


def until(condition: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "the condition") -> float:
    """Wait (blocking this thread) until `condition` holds; the seconds it took. Fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what}: not reached within {timeout_s} s"
        time.sleep(POLL_S)
    return time.monotonic() - started


def state(engine: FakeEngine, component: str = "mqtt") -> str:
    """A component's state as the fake engine's /health would show it ("" before any)."""
    found = engine.components.get(component)
    return found.state if found is not None else ""
