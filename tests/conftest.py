"""Shared fixtures; the helpers behind them live in `speech`, `server` and the client modules."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from edge_asr.bench.processes import Service

from . import image
from .server import STARTED, start_service
from .speech import REPO


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what importing and collecting made, so the tests' own `gc.collect()` calls scan only their objects."""
    # Without this, each of the hundreds of fast tests that collect garbage (to see a task that died unseen)
    # spends about 0.1 s walking every imported module's objects: a third of the fast tier's time.
    gc.collect()
    gc.freeze()


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


@pytest.fixture(scope="session")
def service_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The root Dockerfile built on the mmdebstrap bookworm base (tests/image.py), once per session."""
    image.remove_stale_containers()
    base = image.base_image(tmp_path_factory.mktemp("image-base"))
    return image.build_image(REPO, image.SERVICE_IMAGE, {"BUILD_FROM": base})


@pytest.fixture(autouse=True)
def stop_the_containers_the_test_started() -> Iterator[None]:
    """Containers a test started are stopped and removed when it ends, also when it fails half way."""
    before = len(image.RUNNING)
    yield
    for running in image.RUNNING[before:]:
        running.stop(timeout_s=5)
    del image.RUNNING[before:]
