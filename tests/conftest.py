"""Shared fixtures; the helpers behind them live in `speech`, `server` and the client modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import Service, start_service


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service for the tests that need no special settings."""
    running = start_service(tmp_path_factory.mktemp("service"))
    yield running
    running.stop()
