"""Waiting until a condition holds, failing (not hanging): the one polling helper of the bench and the tests, for
threads and processes (`until`) and inside an event loop (`eventually`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

WAIT_S = 30.0
# Short against what is waited for (a decode, a connection), long enough not to spin.
POLL_S = 0.02


class NotReached(AssertionError):
    """A condition that did not hold in time: an AssertionError, as a test that waits for it expects it to hold."""


def until(
    condition: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "the condition", poll_s: float = POLL_S
) -> float:
    """Wait (blocking this thread) until `condition` holds; the seconds it took. NotReached after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started >= timeout_s:
            raise NotReached(f"{what}: not reached within {timeout_s} s")
        time.sleep(poll_s)
    return time.monotonic() - started


async def eventually(
    condition: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "the condition", poll_s: float = POLL_S
) -> float:
    """Wait (letting the event loop run) until `condition` holds; the seconds it took. NotReached after
    `timeout_s`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not condition():
        if loop.time() - started >= timeout_s:
            raise NotReached(f"{what}: not reached within {timeout_s} s")
        await asyncio.sleep(poll_s)
    return loop.time() - started
