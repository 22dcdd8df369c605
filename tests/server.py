"""The real service for the tests: started with the repository's configuration and stopped when the test ends."""

from __future__ import annotations

from pathlib import Path

from edge_asr.bench import processes
from edge_asr.bench.processes import Service

from .speech import REPO

START_TIMEOUT_S = 60.0

# Every service a test started, so that one whose test failed half way is still stopped (conftest).
STARTED: list[Service] = []


def start_service(
    tmp_path: Path, *settings: str, wait_ready: bool = True, environ: dict[str, str] | None = None
) -> Service:
    """Start the real service with the repository's configuration, `--set` overrides and extra environment
    variables; wait for /health 200 if asked."""
    service = processes.start_service(
        tmp_path,
        *settings,
        config=REPO / "config" / "edge-asr.yaml",
        environ=environ,
        cwd=REPO,
        wait_ready=wait_ready,
        timeout_s=START_TIMEOUT_S,
    )
    STARTED.append(service)
    return service
