"""The soak's own processes: a mosquitto broker it can stop and start again, and `edge-asr serve` under test."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from .errors import BenchError
from .resources import cpu_seconds

_LOGGER = logging.getLogger(__name__)

MOSQUITTO = Path("/usr/sbin/mosquitto")
BROKER_START_TIMEOUT_S = 10.0
# The model loads and warms before /health turns 200; a busy small box takes a while.
SERVICE_START_TIMEOUT_S = 120.0
# SIGTERM drains (service.drain_accept_s, open utterances) before the service exits.
STOP_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 5.0
POLL_S = 0.2
# Lines of the service's log that tell of a problem, whatever the log format around them.
_PROBLEM_MARKERS = (" ERROR ", " CRITICAL ", "Traceback")
MAX_PROBLEM_LINES = 20


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _append_to(path: Path) -> IO[bytes]:
    """A log file opened for appending (a sync helper: a local file opens at once)."""
    return path.open("ab")


def _tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, for an error message."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def _terminate(process: asyncio.subprocess.Process, timeout_s: float) -> int | None:
    """SIGTERM a child and wait for it, SIGKILL it after `timeout_s`; its exit code (None when it had to be killed)."""
    if process.returncode is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), timeout_s)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        return None


def _mosquitto() -> Path:
    """Debian's mosquitto, or one on PATH."""
    if MOSQUITTO.exists():
        return MOSQUITTO
    found = shutil.which("mosquitto")
    if found is None:
        raise BenchError("--soak needs mosquitto (Debian package mosquitto): not at /usr/sbin/mosquitto nor on PATH")
    return Path(found)


class Broker:
    """mosquitto on a loopback port with a persistent store: stopped and started again on the same port, it keeps
    the soak subscriber's session and the messages queued for it."""

    def __init__(self, directory: Path, port: int) -> None:
        self.port = port
        self._executable = _mosquitto()
        self._conf = directory / "mosquitto.conf"
        self._log = directory / "mosquitto.log"
        store = directory / "mosquitto-store"
        store.mkdir(exist_ok=True)
        lines = [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {store}/",
        ]
        if os.geteuid() == 0:  # mosquitto would switch to its own user, who cannot write the temporary store
            lines.append("user root")
        self._conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start mosquitto and wait until it takes connections."""
        with _append_to(self._log) as log:
            self._process = await asyncio.create_subprocess_exec(
                str(self._executable), "-c", str(self._conf), stdout=log, stderr=log
            )
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.returncode is not None:
                raise BenchError(f"mosquitto exited with {self._process.returncode}: {_tail(self._log)}")
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise BenchError(f"mosquitto did not listen on port {self.port} within {BROKER_START_TIMEOUT_S:g} s")

    async def stop(self) -> None:
        """SIGTERM mosquitto (it writes its store on the way out) and wait for it."""
        if self._process is not None:
            await _terminate(self._process, STOP_TIMEOUT_S)
            self._process = None


@dataclass(frozen=True)
class ServiceMetrics:
    """What the soak reads from the service's `/metrics`; None for a metric the service does not expose."""

    event_loop_tasks: int | None
    finals: int | None
    events_dropped: int | None
    mqtt_finals_dropped: int | None


def parse_metrics(text: str) -> ServiceMetrics:
    """The soak's figures from a Prometheus text exposition; a labelled series not seen yet counts 0 when its metric
    exists, and a metric the service does not have is None."""
    families: set[str] = set()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(family: str, name: str, **labels: str) -> int | None:
        found = samples.get((name, tuple(sorted(labels.items()))))
        if found is None:
            return 0 if labels and family in families else None
        return round(found)

    return ServiceMetrics(
        event_loop_tasks=value("edge_asr_event_loop_tasks", "edge_asr_event_loop_tasks"),
        finals=value("edge_asr_events", "edge_asr_events_total", type="final"),
        events_dropped=value("edge_asr_events_dropped", "edge_asr_events_dropped_total"),
        mqtt_finals_dropped=value("edge_asr_mqtt_finals_dropped", "edge_asr_mqtt_finals_dropped_total"),
    )


def _get(url: str) -> tuple[int, str]:
    """Status and body of an HTTP GET (blocking: run it in a thread)."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class Service:
    """`edge-asr serve` as a child process on free loopback ports, publishing to the soak's broker."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, wyoming_port: int, log: Path) -> None:
        self._process = process
        self.port = port
        self.wyoming_port = wyoming_port
        self.log = log
        self._ps = psutil.Process(process.pid)

    @property
    def pid(self) -> int:
        """The service's process id."""
        return self._process.pid

    @property
    def ws_url(self) -> str:
        """Its `/ws/stream`."""
        return f"ws://127.0.0.1:{self.port}/ws/stream"

    @property
    def wyoming_uri(self) -> str:
        """Its Wyoming server."""
        return f"tcp://127.0.0.1:{self.wyoming_port}"

    @classmethod
    async def start(cls, directory: Path, config: Path | None, flags: Sequence[str], broker_port: int) -> Service:
        """Start the service with the user's `flags` and the soak's own settings after them (the soak's win), and
        wait until it is ready and connected to the broker."""
        port, wyoming_port = free_port(), free_port()
        command = [sys.executable, "-m", "edge_asr", "serve", *(["--config", str(config)] if config else [])]
        command += flags
        for setting in (
            "http.enabled=true",
            "http.host=127.0.0.1",
            f"http.port={port}",
            "wyoming.enabled=true",
            f"wyoming.uri=tcp://127.0.0.1:{wyoming_port}",
            "mqtt.enabled=true",
            "mqtt.host=127.0.0.1",
            f"mqtt.port={broker_port}",
            "mqtt.tls=false",
        ):
            command += ["--set", setting]
        log = directory / "service.log"
        with _append_to(log) as out:
            process = await asyncio.create_subprocess_exec(*command, stdout=out, stderr=asyncio.subprocess.STDOUT)
        service = cls(process, port, wyoming_port, log)
        try:
            await service._wait_ready()
        except BaseException:
            await _terminate(process, STOP_TIMEOUT_S)
            raise
        _LOGGER.info("Service ready (pid %d): %s, %s", service.pid, service.ws_url, service.wyoming_uri)
        return service

    async def _wait_ready(self) -> None:
        """Until /health is 200 and says MQTT is connected, so that the first final already has a broker."""
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.returncode is not None:
                raise BenchError(f"the service exited with {self._process.returncode}:\n{_tail(self.log, 20)}")
            try:
                status, health = await self.health()
            except OSError:
                status, health = 0, {}
            components = {item.get("name"): item for item in health.get("components", ()) if isinstance(item, dict)}
            if status == 200 and components.get("mqtt", {}).get("healthy"):
                return
            await asyncio.sleep(POLL_S)
        raise BenchError(f"the service was not ready within {SERVICE_START_TIMEOUT_S:g} s:\n{_tail(self.log, 20)}")

    async def health(self) -> tuple[int, dict[str, Any]]:
        """/health's status and JSON; OSError when the service does not answer."""
        status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{self.port}/health")
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            data = {}
        return status, data if isinstance(data, dict) else {}

    async def sessions(self) -> int | None:
        """Open sessions by /health; None when it does not say."""
        try:
            _status, health = await self.health()
        except OSError:
            return None
        sessions = health.get("sessions")
        return sessions if isinstance(sessions, int) else None

    async def metrics(self) -> ServiceMetrics:
        """The soak's figures from /metrics; OSError when the service does not answer."""
        _status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{self.port}/metrics")
        return parse_metrics(body)

    def rss_mb(self) -> float:
        """Resident memory now, in MiB."""
        return float(self._ps.memory_info().rss) / 2**20

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far."""
        return cpu_seconds(self._ps)

    async def stop(self) -> int | None:
        """SIGTERM the service (it drains, then exits); its exit code, None when it had to be killed."""
        return await _terminate(self._process, STOP_TIMEOUT_S)

    def log_problems(self) -> tuple[str, ...]:
        """Error lines and tracebacks in the service's log (the first MAX_PROBLEM_LINES)."""
        try:
            lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ()
        return tuple(line for line in lines if any(marker in line for marker in _PROBLEM_MARKERS))[:MAX_PROBLEM_LINES]
