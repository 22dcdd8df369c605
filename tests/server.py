"""The real service as a subprocess on free loopback ports, and small HTTP and process helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .speech import REPO

START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str) -> tuple[int, dict[str, object] | str]:
    """Status and body (JSON when it parses) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read().decode()
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def stop_process(process: subprocess.Popen[str] | subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM a test's subprocess, SIGKILL it if it outlives `timeout_s`; its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


@dataclass
class Service:
    """A running `edge-asr serve` subprocess."""

    process: subprocess.Popen[str]
    port: int
    wyoming_port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/stream"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def health(self) -> tuple[int, dict[str, object] | str]:
        return http_get(f"{self.base_url}/health")

    def sessions_drop_to(self, count: int, timeout_s: float = 20.0) -> bool:
        """Wait until /health reports `count` open sessions; False if it does not in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _status, health = self.health()
            if isinstance(health, dict) and health["sessions"] == count:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> int:
        return stop_process(self.process, timeout_s=15)


# Every service a test started, so that one whose test failed half way is still stopped (conftest).
STARTED: list[Service] = []


def start_service(
    tmp_path: Path, *settings: str, wait_ready: bool = True, environ: dict[str, str] | None = None
) -> Service:
    """Start the real service on free ports (HTTP and Wyoming) with `--set` overrides and extra environment
    variables; wait for /health 200 if asked."""
    port, wyoming_port = free_port(), free_port()
    log_path = tmp_path / f"service-{port}.log"
    args = [sys.executable, "-m", "edge_asr", "serve", "--config", str(REPO / "config" / "edge-asr.yaml")]
    args += ["--host", "127.0.0.1", "--port", str(port), "--set", f"wyoming.uri=tcp://127.0.0.1:{wyoming_port}"]
    for item in settings:
        args += ["--set", item]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            args, cwd=REPO, env={**os.environ, **(environ or {})}, stdout=log, stderr=subprocess.STDOUT, text=True
        )
    service = Service(process, port, wyoming_port, log_path)
    STARTED.append(service)
    if wait_ready:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"service exited with {process.returncode}:\n{service.log()}")
            try:
                if service.health()[0] == 200:
                    return service
            except OSError:
                pass
            time.sleep(0.05)
        service.stop()
        raise AssertionError(f"service not ready in {START_TIMEOUT_S} s:\n{service.log()}")
    return service
