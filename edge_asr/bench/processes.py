"""The processes the soak and the tests run: `edge-asr serve` and mosquitto on free loopback ports, each with a log
file, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from .errors import BenchError
from .resources import cpu_seconds
from .waiting import NotReached, until

MOSQUITTO = Path("/usr/sbin/mosquitto")
BROKER_START_TIMEOUT_S = 10.0
# The model loads and warms before /health turns 200; a busy small box takes a while.
SERVICE_START_TIMEOUT_S = 120.0
# SIGTERM drains (service.drain_accept_s, open utterances) before the service exits.
STOP_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 5.0
# /health loads the service a little: polled less often than a plain condition.
HEALTH_POLL_S = 0.05
# Lines of the service's log that tell of a problem, whatever the log format around them.
_PROBLEM_MARKERS = (" ERROR ", " CRITICAL ", "Traceback")
MAX_PROBLEM_LINES = 20


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for an error message."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def http_text(url: str) -> tuple[int, str]:
    """Status and body of a GET; OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def http_get(url: str) -> tuple[int, dict[str, object] | str]:
    """Status and body (JSON when it parses) of a GET; OSError when nothing answers."""
    status, body = http_text(url)
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def stop_process(process: subprocess.Popen[Any], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM a child, SIGKILL it if it outlives `timeout_s`; its exit code (negative: the signal that ended it)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def mosquitto() -> Path:
    """Debian's mosquitto, or one on PATH."""
    if MOSQUITTO.exists():
        return MOSQUITTO
    found = shutil.which("mosquitto")
    if found is None:
        raise BenchError("mosquitto (Debian package mosquitto) is needed: not at /usr/sbin/mosquitto nor on PATH")
    return Path(found)


@dataclass
class Broker:
    """A mosquitto process on a loopback port, stoppable and restartable on the same port."""

    conf: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start mosquitto and wait until it takes connections."""
        with self.log_path.open("ab") as log:
            process = subprocess.Popen([str(mosquitto()), "-c", str(self.conf)], stdout=log, stderr=log)
        self.process = process

        def listening() -> bool:
            if process.poll() is not None:
                raise BenchError(f"mosquitto exited with {process.returncode}: {tail(self.log_path, 5)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return False
            return True

        try:
            until(listening, BROKER_START_TIMEOUT_S, f"mosquitto listening on port {self.port}")
        except NotReached as err:
            self.stop()
            raise BenchError(str(err)) from None

    def stop(self) -> None:
        """SIGTERM mosquitto (a persistent one writes its store on the way out) and wait for it."""
        if self.process is not None:
            stop_process(self.process, timeout_s=10)
            self.process = None


def make_broker(directory: Path, *lines: str, anonymous: bool = True) -> Broker:
    """Write a mosquitto config for a free port (with these extra `lines`; without persistence unless they ask for
    it) and start the broker."""
    port = free_port()
    conf = directory / f"mosquitto-{port}.conf"
    settings = [f"listener {port} 127.0.0.1", f"allow_anonymous {'true' if anonymous else 'false'}", *lines]
    if os.geteuid() == 0:  # mosquitto would switch to its own user, who cannot read our files nor write its store
        settings.append("user root")
    if not any(line.startswith("persistence ") for line in lines):
        settings.append("persistence false")
    conf.write_text("\n".join(settings) + "\n", encoding="utf-8")
    broker = Broker(conf, port, directory / f"mosquitto-{port}.log")
    broker.start()
    return broker


@dataclass(frozen=True)
class ServiceMetrics:
    """What the soak reads from the service's `/metrics`; None for a metric the service does not expose."""

    event_loop_tasks: int | None
    finals: int | None
    events_dropped: int | None
    mqtt_finals_dropped: int | None
    partial_decodes: int | None


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
        partial_decodes=value("edge_asr_decode_seconds", "edge_asr_decode_seconds_count", kind="partial"),
    )


def _healthy(health: dict[str, object] | str, component: str) -> bool:
    """Whether a /health body says `component` is healthy."""
    components = health.get("components") if isinstance(health, dict) else None
    return isinstance(components, list) and any(
        isinstance(item, dict) and item.get("name") == component and bool(item.get("healthy")) for item in components
    )


@dataclass
class Service:
    """A running `edge-asr serve` child process."""

    process: subprocess.Popen[bytes]
    port: int
    wyoming_port: int
    log_path: Path
    _ps: psutil.Process = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ps = psutil.Process(self.process.pid)

    @property
    def pid(self) -> int:
        """The service's process id."""
        return self.process.pid

    @property
    def base_url(self) -> str:
        """Its HTTP server."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """Its `/ws/stream`."""
        return f"ws://127.0.0.1:{self.port}/ws/stream"

    @property
    def wyoming_uri(self) -> str:
        """Its Wyoming server."""
        return f"tcp://127.0.0.1:{self.wyoming_port}"

    def log(self) -> str:
        """Everything it logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def health(self) -> tuple[int, dict[str, object] | str]:
        """/health's status and body; OSError when the service does not answer."""
        return http_get(f"{self.base_url}/health")

    def sessions(self) -> int | None:
        """Open sessions by /health; None when it does not say or does not answer."""
        try:
            _status, health = self.health()
        except OSError:
            return None
        sessions = health.get("sessions") if isinstance(health, dict) else None
        return sessions if isinstance(sessions, int) else None

    def sessions_drop_to(self, count: int, timeout_s: float = 20.0) -> bool:
        """Wait until /health reports `count` open sessions; False if it does not in time."""
        try:
            until(lambda: self.sessions() == count, timeout_s, f"{count} open sessions", HEALTH_POLL_S)
        except NotReached:
            return False
        return True

    def metrics(self) -> ServiceMetrics:
        """The soak's figures from /metrics; OSError when the service does not answer."""
        _status, body = http_text(f"{self.base_url}/metrics")
        return parse_metrics(body)

    def rss_mb(self) -> float:
        """Resident memory now, in MiB; psutil.Error once the process is gone."""
        return float(self._ps.memory_info().rss) / 2**20

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far."""
        return cpu_seconds(self._ps)

    def log_problems(self) -> tuple[str, ...]:
        """Error lines and tracebacks in its log (the first MAX_PROBLEM_LINES)."""
        try:
            lines = self.log().splitlines()
        except OSError:
            return ()
        return tuple(line for line in lines if any(marker in line for marker in _PROBLEM_MARKERS))[:MAX_PROBLEM_LINES]

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM the service (it drains, then exits); its exit code (negative when it had to be killed)."""
        return stop_process(self.process, timeout_s)


def start_service(
    directory: Path,
    *settings: str,
    config: Path | None = None,
    flags: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    wait_ready: bool = True,
    healthy: Sequence[str] = (),
    timeout_s: float = SERVICE_START_TIMEOUT_S,
) -> Service:
    """Start `edge-asr serve` on free loopback ports (HTTP and Wyoming) with `config`, the command line `flags`, then
    its ports, then the `--set` `settings` (the later win) and extra `environ` variables; when asked, wait until
    /health is 200 and says the `healthy` components are. BenchError when it does not get there (it is stopped)."""
    port, wyoming_port = free_port(), free_port()
    command = [sys.executable, "-m", "edge_asr", "serve", *(["--config", str(config)] if config else []), *flags]
    for setting in (
        "http.host=127.0.0.1",
        f"http.port={port}",
        f"wyoming.uri=tcp://127.0.0.1:{wyoming_port}",
        *settings,
    ):
        command += ["--set", setting]
    log_path = directory / f"service-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **(environ or {})}, stdout=log, stderr=subprocess.STDOUT
        )
    service = Service(process, port, wyoming_port, log_path)
    if not wait_ready:
        return service

    def ready() -> bool:
        if process.poll() is not None:
            raise BenchError(f"the service exited with {process.returncode}:\n{tail(log_path)}")
        try:
            status, health = service.health()
        except OSError:
            return False
        return status == 200 and all(_healthy(health, name) for name in healthy)

    try:
        until(ready, timeout_s, "the service ready", HEALTH_POLL_S)
    except NotReached as err:
        service.stop()
        raise BenchError(f"{err}:\n{tail(log_path)}") from None
    except BaseException:
        service.stop()
        raise
    return service
