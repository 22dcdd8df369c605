"""Shared fixtures; the helpers behind them live in `speech`, `server` and the client modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import STARTED, Service, start_service


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service for the tests that need no special settings."""
    running = start_service(tmp_path_factory.mktemp("service"))
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def stop_what_the_test_started() -> Iterator[None]:
    """Services a test started are stopped when it ends, also when it fails half way."""
    before = len(STARTED)
    yield
    for service in STARTED[before:]:
        service.stop()
    del STARTED[before:]
