"""The deployment artifacts under deploy/ (README.md, "More than one box"): the HAProxy configuration, checked by
HAProxy itself and run in front of fake nodes; the Prometheus rules and scrape config; the Grafana dashboard; the
Kubernetes manifests; the Avahi announcement. They are checked against the service's real defaults and metrics, so
a renamed metric or a changed default shows up here rather than on someone's balancer."""

from __future__ import annotations

import contextlib
import csv
import http.client
import importlib.metadata
import io
import ipaddress
import json
import re
import shlex
import shutil
import socket
import socketserver
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit
from xml.etree import ElementTree

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edge_asr import __version__
from edge_asr.config import Settings, build_settings, load_settings
from edge_asr.events import Final, Partial, SessionError
from edge_asr.metrics import Metrics

from .image import dockerfile_stages, final_stage
from .speech import REPO
from .waiting import until

DEPLOY = REPO / "deploy"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
SCRAPE = DEPLOY / "prometheus" / "scrape.yml"
DASHBOARD = DEPLOY / "grafana" / "edge-asr.json"
KUBERNETES = DEPLOY / "kubernetes"
AVAHI = DEPLOY / "avahi" / "edge-asr.service"
UNIT = REPO / "systemd" / "edge-asr.service"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# Metrics the alerts may use besides the service's own, and who exports them (scrape.yml has a job for each).
OTHER_EXPORTERS = {
    "up": "Prometheus, for every scrape target",
    "probe_success": "the blackbox exporter (job edge-asr-ready)",
    "haproxy_backend_active_servers": "HAProxy's prometheus-exporter (job haproxy)",
}
# Words of PromQL that look like metric names but are not.
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_PROMQL_KEYWORDS |= {"offset", "inf", "nan"}


def defaults() -> Settings:
    """The service's defaults, as a node without a config file has them."""
    return build_settings({}, environ={})


def wyoming_port(settings: Settings) -> int:
    """The TCP port of the Wyoming listener."""
    port = urlsplit(settings.wyoming.uri).port
    assert port is not None, settings.wyoming.uri
    return port


def service_metric_names() -> set[str]:
    """Every sample name the service's /metrics can carry, read from a real exposition. Each labelled metric gets a
    sample, and each family's type adds its suffixes too, so a metric no test touches is still known."""
    metrics = Metrics()
    metrics.observe_event(Partial(text="set the", stable="set", utterance=1, asr_ms=90, e2e_ms=120))
    metrics.observe_event(
        Final(text="Set the thermostat.", utterance=1, asr_ms=100, e2e_ms=110, ttct_ms=380, start=0.0, end=1.5)
    )
    metrics.observe_event(SessionError(code="busy", message="too many sessions"))
    metrics.decode_seconds.labels("final").observe(0.1)
    metrics.sessions_total.labels("websocket").inc()
    metrics.rejected_total.labels("busy").inc()
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
    return names


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers, ranges, label lists
    (`by (...)`), functions, keywords and numbers are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.:$])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("("):  # a function or aggregation
            continue
        if match.group().lower() not in _PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def duration_s(text: str) -> float:
    """An HAProxy or Prometheus duration (`500ms`, `2s`, `5m`; HAProxy takes a bare number as milliseconds)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", text)
    assert match, f"not a duration: {text!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 0.001}[match.group(2)]
    return float(match.group(1)) * scale


def memory_bytes(text: str, *, systemd: bool = False) -> int:
    """A memory size in bytes: systemd's `768M` is in powers of 1024, as Kubernetes's `768Mi`; Kubernetes's `768M`
    is in powers of 1000."""
    match = re.fullmatch(r"(\d+)(?:([KMGT])(i?))?", text)
    assert match, f"not a memory size: {text!r}"
    number, unit, binary = int(match.group(1)), match.group(2), match.group(3) == "i" or systemd
    if unit is None:
        return number
    base = 1024 if binary else 1000
    return number * int(base ** ("KMGT".index(unit) + 1))


# --- HAProxy ----------------------------------------------------------------------------------------------------


@dataclass
class HaproxyConfig:
    """haproxy.cfg as sections (`"backend edge_asr_ws"`) of directives, each a list of words, comments removed."""

    sections: dict[str, list[list[str]]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> HaproxyConfig:
        config = cls()
        current: list[list[str]] | None = None
        for line in path.read_text().splitlines():
            words = re.sub(r"(^|\s)#.*", "", line).split()
            if not words:
                continue
            if not line[0].isspace():
                current = config.sections.setdefault(" ".join(words), [])
            else:
                assert current is not None, f"a directive outside any section: {line!r}"
                current.append(words)
        return config

    def section(self, name: str) -> list[list[str]]:
        assert name in self.sections, f"haproxy.cfg has no `{name}` (it has {sorted(self.sections)})"
        return self.sections[name]

    def has(self, name: str, *words: str) -> bool:
        """Whether the section has a directive starting with these words."""
        return any(line[: len(words)] == list(words) for line in self.section(name))

    def value(self, name: str, *words: str) -> str:
        """The word after a directive's words, e.g. value("backend x", "timeout", "tunnel")."""
        found = [line[len(words)] for line in self.section(name) if line[: len(words)] == list(words)]
        assert len(found) == 1, f"`{name}` should have exactly one `{' '.join(words)}`: {found}"
        return found[0]

    def backend_of(self, frontend: str) -> str:
        return "backend " + self.value(f"frontend {frontend}", "default_backend")

    def servers(self, backend: str) -> dict[str, list[str]]:
        """The backend's servers by name: the address, then the options."""
        return {line[1]: line[2:] for line in self.section(backend) if line[0] == "server"}

    def option_after(self, words: list[str], option: str) -> str:
        assert option in words, f"{option} missing from {words}"
        return words[words.index(option) + 1]


def frontend_bound_to(config: HaproxyConfig, port: int) -> str:
    """The frontend whose `bind` is this port on every address."""
    names = [
        name.split()[1]
        for name, lines in config.sections.items()
        if name.startswith("frontend ") and ["bind", f":{port}"] in lines
    ]
    assert len(names) == 1, f"one frontend should bind :{port}: {names}"
    return names[0]


@pytest.mark.fast
def test_wyoming_passes_through_as_tcp_with_the_client_address_and_readiness_checks() -> None:
    config, settings = HaproxyConfig.read(HAPROXY_CFG), defaults()
    frontend = frontend_bound_to(config, wyoming_port(settings))
    backend = config.backend_of(frontend)

    assert config.value(f"frontend {frontend}", "mode") == "tcp"
    assert config.value(backend, "mode") == "tcp"
    assert config.value(backend, "balance") == "leastconn"
    assert config.has(backend, "option", "httpchk")
    assert config.has(backend, "http-check", "send", "meth", "GET", "uri", "/health/ready")
    servers = config.servers(backend)
    assert len(servers) >= 2
    for name, (address, *options) in servers.items():
        assert address.endswith(f":{wyoming_port(settings)}"), name
        # The real client address travels in the PROXY header; the check goes to the HTTP port, where /health is.
        assert "send-proxy-v2" in options, name
        assert "check" in options, name
        assert config.option_after(options, "port") == str(settings.http.port), name


@pytest.mark.fast
def test_the_websocket_is_balanced_as_http_with_forwarded_for_and_readiness_checks() -> None:
    config, settings = HaproxyConfig.read(HAPROXY_CFG), defaults()
    frontend = frontend_bound_to(config, settings.http.port)
    backend = config.backend_of(frontend)

    assert config.value(f"frontend {frontend}", "mode") == "http"
    assert config.value(backend, "mode") == "http"
    assert config.value(backend, "balance") == "leastconn"
    assert config.has(backend, "option", "forwardfor")
    # A client's own X-Forwarded-For or Forwarded would reach the node next to the balancer's: both are dropped.
    assert config.has(f"frontend {frontend}", "http-request", "del-header", "X-Forwarded-For")
    assert config.has(f"frontend {frontend}", "http-request", "del-header", "Forwarded")
    assert config.has(backend, "option", "httpchk")
    assert config.has(backend, "http-check", "send", "meth", "GET", "uri", "/health/ready")
    for name, (address, *options) in config.servers(backend).items():
        assert address.endswith(f":{settings.http.port}"), name
        assert "check" in options, name
        assert "send-proxy-v2" not in options, f"{name}: the HTTP listener takes X-Forwarded-For, not PROXY"
    # Past the upgrade the tunnel timeout rules: longer than the node's own idle timeout, which tells the client why.
    assert duration_s(config.value(backend, "timeout", "tunnel")) > settings.limits.idle_timeout_s
    assert config.has(f"frontend {frontend}", "timeout", "client-fin")
    assert config.has(backend, "timeout", "server-fin")


@pytest.mark.fast
def test_a_draining_node_leaves_the_rotation_before_it_stops_accepting() -> None:
    config, settings = HaproxyConfig.read(HAPROXY_CFG), defaults()
    for port in (wyoming_port(settings), settings.http.port):
        frontend = frontend_bound_to(config, port)
        backend = config.backend_of(frontend)
        server_defaults = next(line[1:] for line in config.section(backend) if line[0] == "default-server")
        inter = duration_s(config.option_after(server_defaults, "inter"))
        fall = int(config.option_after(server_defaults, "fall"))
        # After SIGTERM the node answers not-ready at once and still takes sessions for drain_accept_s.
        assert inter * fall < settings.service.drain_accept_s, f"{backend}: {inter} s x {fall}"
        # A half-closed connection must outlast the answer to audio that has stopped (at worst, a drain's end).
        assert duration_s(config.value(f"frontend {frontend}", "timeout", "client-fin")) > (
            settings.service.drain_timeout_s
        )
        assert duration_s(config.value(backend, "timeout", "server-fin")) > settings.service.drain_timeout_s


@pytest.mark.fast
def test_no_backend_cuts_the_sessions_of_a_node_that_is_full_or_draining() -> None:
    config = HaproxyConfig.read(HAPROXY_CFG)
    for name, lines in config.sections.items():
        for line in lines:
            assert "shutdown-sessions" not in line, f"{name}: {' '.join(line)}"


@pytest.mark.fast
def test_both_backends_list_the_same_nodes_and_the_stats_frontend_exports_metrics() -> None:
    config, settings = HaproxyConfig.read(HAPROXY_CFG), defaults()
    wyoming = config.servers(config.backend_of(frontend_bound_to(config, wyoming_port(settings))))
    websocket = config.servers(config.backend_of(frontend_bound_to(config, settings.http.port)))

    assert sorted(wyoming) == sorted(websocket) == ["node1", "node2", "node3"]
    for name in wyoming:
        assert wyoming[name][0].rpartition(":")[0] == websocket[name][0].rpartition(":")[0], name
    stats = config.section("frontend stats")
    assert ["http-request", "use-service", "prometheus-exporter", "if", "{", "path", "/metrics", "}"] in stats
    assert ["stats", "enable"] in stats


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    assert found, "haproxy is missing: script/test installs Debian's haproxy (apt-get install haproxy)"
    return found


@pytest.mark.system
def test_haproxy_accepts_the_configuration_without_a_warning() -> None:
    result = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout + result.stderr, result.stdout + result.stderr


# --- HAProxy in front of fake nodes -------------------------------------------------------------------------------


@dataclass
class FakeNode:
    """A node's two listeners: HTTP answers /health/ready as told and echoes the forwarding headers of any other
    request; Wyoming reads the PROXY v2 header and answers with the client address it names."""

    name: str
    ready: bool = True
    requests: list[str] = field(default_factory=list)
    http_port: int = 0
    wyoming_port: int = 0

    @contextlib.contextmanager
    def serving(self) -> Iterator[FakeNode]:
        node = self

        class Http(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/health/ready":
                    self._answer(200 if node.ready else 503, {"ready": node.ready})
                    return
                node.requests.append(self.path)
                self._answer(
                    200,
                    {
                        "node": node.name,
                        "x_forwarded_for": self.headers.get_all("X-Forwarded-For", []),
                        "forwarded": self.headers.get_all("Forwarded", []),
                    },
                )

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Wyoming(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn = cast(socket.socket, self.request)
                conn.settimeout(2)  # below the client's 5 s, so a missing header is reported, not waited out
                try:
                    source = read_proxy_v2_source(conn)
                except (TimeoutError, ConnectionError) as err:
                    source = f"no PROXY v2 header ({err!r})"
                answer = {"node": node.name, "client": source}
                conn.sendall(json.dumps(answer).encode())

        http_server = ThreadingHTTPServer(("127.0.0.1", 0), Http)
        wyoming_server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Wyoming)
        http_server.daemon_threads = wyoming_server.daemon_threads = True
        self.http_port, self.wyoming_port = http_server.server_port, wyoming_server.server_address[1]
        threads = [
            threading.Thread(target=server.serve_forever, daemon=True) for server in (http_server, wyoming_server)
        ]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            for server in (http_server, wyoming_server):
                server.shutdown()
                server.server_close()


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def read_proxy_v2_source(conn: socket.socket) -> str:
    """The source address of a PROXY protocol v2 header (TCP over IPv4), or why there is none."""
    header = read_exactly(conn, 16)
    if header[:12] != b"\r\n\r\n\x00\r\nQUIT\n":
        return f"no PROXY v2 header: {header!r}"
    version_command, family, length = header[12], header[13], struct.unpack("!H", header[14:16])[0]
    body = read_exactly(conn, length)
    if version_command != 0x21 or family != 0x11:
        return f"not PROXY over TCP/IPv4: {version_command:#x} {family:#x}"
    return str(ipaddress.IPv4Address(body[:4]))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def balancer_config(nodes: dict[str, FakeNode], ports: dict[int, int]) -> str:
    """haproxy.cfg for loopback: the frontends on `ports` (a configured port to a free one), the nodes at their fake
    listeners, and the global lines that need root or Debian's layout (chroot, user, syslog, admin socket) left out.
    Every line it changes must be found, so a changed haproxy.cfg cannot slip past with this test checking less."""
    settings = defaults()
    lines, section, changed = [], "", {"bind": 0, "server": 0}
    for line in HAPROXY_CFG.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            section = line.split()[0]
        words = line.split()
        if section == "global" and words and words[0] in ("log", "chroot", "stats", "user", "group", "daemon"):
            continue
        if words[:1] == ["bind"]:
            port = int(words[1].lstrip(":"))
            line = f"    bind 127.0.0.1:{ports[port]}"
            changed["bind"] += 1
        elif words[:1] == ["server"]:
            node = nodes[words[1]]
            port = int(words[2].rpartition(":")[2])
            assert port in (wyoming_port(settings), settings.http.port), line
            words[2] = f"127.0.0.1:{node.wyoming_port if port == wyoming_port(settings) else node.http_port}"
            if "port" in words:
                words[words.index("port") + 1] = str(node.http_port)
            line = "    " + " ".join(words)
            changed["server"] += 1
        lines.append(line)
    assert changed == {"bind": len(ports), "server": 2 * len(nodes)}, changed
    return "\n".join(lines) + "\n"


def server_states(stats_port: int) -> dict[tuple[str, str], str]:
    """(backend, server) → UP, DOWN, ..., from the stats page's CSV."""
    connection = http.client.HTTPConnection("127.0.0.1", stats_port, timeout=5)
    try:
        connection.request("GET", "/stats;csv")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {
        (row["pxname"], row["svname"]): row["status"] for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")
    }


def get_json(port: int, path: str, headers: dict[str, str], source: str) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body) if response.getheader("Content-Type") == "application/json" else {}
    finally:
        connection.close()


def wyoming_answer(port: int, source: str) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as conn:
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return cast(dict[str, Any], json.loads(data))


@pytest.mark.system
def test_haproxy_in_front_of_nodes_passes_the_client_address_and_drops_a_draining_node_in_time(
    tmp_path: Path,
) -> None:
    settings = defaults()
    client = "127.0.0.2"  # not the balancer's own address (127.0.0.1), so the nodes can tell the two apart
    stats_bind = int(HaproxyConfig.read(HAPROXY_CFG).value("frontend stats", "bind").lstrip(":"))
    ports = {wyoming_port(settings): free_port(), settings.http.port: free_port(), stats_bind: free_port()}
    wyoming_in, http_in, stats = ports[wyoming_port(settings)], ports[settings.http.port], ports[stats_bind]
    with contextlib.ExitStack() as stack:
        nodes = {name: stack.enter_context(FakeNode(name).serving()) for name in ("node1", "node2", "node3")}
        config = tmp_path / "haproxy.cfg"
        config.write_text(balancer_config(nodes, ports))
        log = (tmp_path / "haproxy.log").open("w")
        stack.callback(log.close)
        balancer = subprocess.Popen([haproxy_binary(), "-db", "-f", str(config)], stdout=log, stderr=log)
        stack.callback(balancer.wait, 10)
        stack.callback(balancer.terminate)

        def everything_up() -> bool:
            with contextlib.suppress(OSError):
                states = server_states(stats)
                return len(states) == 6 and set(states.values()) == {"UP"}
            return False

        until(everything_up, 20, "every node UP in both backends")

        # The node sees one X-Forwarded-For, the client's, whatever the client sent itself.
        status, seen = get_json(
            http_in, "/echo", {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=198.51.100.7"}, client
        )
        assert status == 200, seen
        assert seen["x_forwarded_for"] == [client]
        assert seen["forwarded"] == []
        # Wyoming carries it in the PROXY v2 header.
        assert wyoming_answer(wyoming_in, client)["client"] == client
        # /metrics through the balancer is refused before reaching any node.
        assert get_json(http_in, "/metrics", {}, client)[0] == 404
        assert all("/metrics" not in node.requests for node in nodes.values())

        # SIGTERM on node1: it turns not-ready at once and still accepts for drain_accept_s.
        nodes["node1"].ready = False
        took = until(
            lambda: (
                server_states(stats)[("edge_asr_wyoming", "node1")] == "DOWN"
                and server_states(stats)[("edge_asr_ws", "node1")] == "DOWN"
            ),
            10,
            "node1 DOWN",
        )
        assert took < settings.service.drain_accept_s, f"node1 left after {took:.2f} s"
        for _ in range(6):
            assert get_json(http_in, "/echo", {}, client)[1]["node"] != "node1"
            assert wyoming_answer(wyoming_in, client)["node"] != "node1"

        # The alerts' HAProxy metrics are ones this HAProxy exports, for these backends.
        connection = http.client.HTTPConnection("127.0.0.1", stats, timeout=5)
        connection.request("GET", "/metrics")
        exported = connection.getresponse().read().decode()
        connection.close()
        wanted = {name for rule in alert_rules() for name in promql_metric_names(rule["expr"])}
        for name in sorted(name for name in wanted if name.startswith("haproxy_")):
            assert re.search(rf'^{name}\{{proxy="edge_asr_ws"', exported, re.MULTILINE), name
    assert balancer.returncode is not None


# --- Prometheus ---------------------------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.mark.fast
def test_the_metric_name_reader_finds_every_metric_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (instance, le) (rate(edge_asr_decode_seconds_bucket{kind="final", '
        'instance=~"$instance"}[5m]))) > 1e3 and on (instance) up{job="x"} == 0 or edge_asr_decode_failurs_total'
    )

    assert promql_metric_names(expr) == {"edge_asr_decode_seconds_bucket", "up", "edge_asr_decode_failurs_total"}
    assert "edge_asr_decode_failurs_total" not in service_metric_names()  # a misspelt name would be caught
    assert {"edge_asr_decode_seconds_bucket", "edge_asr_sessions_active"} <= service_metric_names()


@pytest.mark.fast
def test_every_alert_rule_is_complete_and_names_real_metrics() -> None:
    known = service_metric_names() | set(OTHER_EXPORTERS)
    rules = alert_rules()
    names = [rule.get("alert") for rule in rules]

    assert len(names) == len(set(names)), names
    for rule in rules:
        assert rule.get("alert"), rule
        assert isinstance(rule.get("expr"), str), rule["alert"]
        duration_s(rule["for"])
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        used = promql_metric_names(rule["expr"])
        assert used, f"{rule['alert']}: no metric in {rule['expr']!r}"
        assert used <= known, (
            f"{rule['alert']}: {used - known} are not metrics of edge-asr or {sorted(OTHER_EXPORTERS)}"
        )
    exprs = " ".join(rule["expr"] for rule in rules)
    for needed in (
        "probe_success",
        "edge_asr_decode_seconds_bucket",
        "edge_asr_mqtt_finals_dropped_total",
        "edge_asr_decode_failures_total",
    ):
        assert needed in exprs


@pytest.mark.fast
def test_the_scrape_config_reads_every_node_directly_and_probes_its_readiness() -> None:
    config, settings = HaproxyConfig.read(HAPROXY_CFG), defaults()
    websocket = config.servers(config.backend_of(frontend_bound_to(config, settings.http.port)))
    nodes = sorted(address for address, *_ in websocket.values())
    jobs = {job["job_name"]: job for job in yaml.safe_load(SCRAPE.read_text())["scrape_configs"]}

    def targets(job: str) -> list[str]:
        return sorted(target for static in jobs[job]["static_configs"] for target in static["targets"])

    # The alerts select these jobs by name.
    assert {"edge-asr", "edge-asr-ready", "haproxy"} <= set(jobs)
    for rule in alert_rules():
        for job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job in jobs, f"{rule['alert']}: no scrape job {job}"
    assert targets("edge-asr") == nodes
    assert targets("edge-asr-ready") == sorted(f"http://{node}/health/ready" for node in nodes)
    stats_port = next(line[1] for line in config.section("frontend stats") if line[0] == "bind")
    assert all(target.endswith(stats_port) for target in targets("haproxy"))


@pytest.mark.system
def test_promtool_checks_the_rules_their_unit_tests_and_the_scrape_config() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: script/test installs Debian's prometheus package"
    for command in (
        ["check", "rules", ALERTS.name],
        ["test", "rules", ALERTS_TEST.name],
        ["check", "config", SCRAPE.name],
    ):
        result = subprocess.run([promtool, *command], cwd=ALERTS.parent, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"


# --- Grafana ------------------------------------------------------------------------------------------------------


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


@pytest.mark.fast
def test_the_dashboard_shows_every_node_and_only_real_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = service_metric_names()
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    panels = list(dashboard_panels(dashboard["panels"]))
    targets = [(panel["title"], target) for panel in panels for target in panel.get("targets", [])]

    assert dashboard["schemaVersion"] >= 36
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["includeAll"]
    assert variables["instance"]["multi"]
    node_query = re.fullmatch(r"label_values\((\w+), instance\)", variables["instance"]["definition"])
    assert node_query, variables["instance"]["definition"]
    assert node_query.group(1) in known
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    assert len(targets) >= 10
    used: set[str] = set()
    for title, target in targets:
        assert target["datasource"]["uid"] == "${datasource}", title
        names = promql_metric_names(target["expr"])
        assert names, f"{title}: no metric in {target['expr']!r}"
        assert names <= known, f"{title}: {names - known} are not metrics of edge-asr"
        assert 'instance=~"$instance"' in target["expr"], f"{title}: not filtered by the node variable"
        used |= names
    for needed in (
        "edge_asr_sessions_active",
        "edge_asr_sessions_total",
        "edge_asr_sessions_rejected_total",
        "edge_asr_decode_seconds_bucket",
        "edge_asr_e2e_seconds_bucket",
        "edge_asr_ttct_seconds_bucket",
        "edge_asr_decode_queue_depth",
        "edge_asr_decode_failures_total",
        "edge_asr_mqtt_finals_dropped_total",
        "edge_asr_events_dropped_total",
        "edge_asr_audio_seconds_total",
    ):
        assert needed in used, f"no panel shows {needed}"
    decode = " ".join(target["expr"] for _, target in targets if "edge_asr_decode_seconds_bucket" in target["expr"])
    for quantile in ("histogram_quantile(0.5,", "histogram_quantile(0.9,"):
        assert quantile in decode
    assert "kind" in decode
    assert any(panel.get("repeat") == "instance" for panel in panels), "no panels repeated per node"


# --- Kubernetes ---------------------------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every document under deploy/kubernetes, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), path
            assert "kind" in document, path
            assert document["kind"] not in found, f"two {document['kind']}s"
            found[document["kind"]] = document
    return found


def container() -> dict[str, Any]:
    containers = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return cast(dict[str, Any], containers[0])


def cluster_settings() -> Settings:
    """The settings a pod runs with: the ConfigMap's config.yaml, validated as the service validates it."""
    return build_settings(yaml.safe_load(manifests()["ConfigMap"]["data"]["config.yaml"]), environ={})


@pytest.mark.fast
def test_the_manifests_parse_and_are_what_a_cluster_needs() -> None:
    assert set(manifests()) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}


@pytest.mark.fast
def test_the_probes_and_ports_match_the_service_defaults() -> None:
    spec = container()
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}

    for settings in (defaults(), cluster_settings()):
        assert sorted(ports.values()) == sorted([settings.http.port, wyoming_port(settings)])
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")):
        get = spec[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == defaults().http.port, probe
    # A node that is full or draining is not-ready; it must never be killed for it.
    assert spec["livenessProbe"]["httpGet"]["path"] != spec["readinessProbe"]["httpGet"]["path"]
    assert "lifecycle" not in spec, "the service drains on SIGTERM by itself: no preStop"


@pytest.mark.fast
def test_a_pod_gets_time_to_drain_and_the_units_memory_limit() -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    unit_memory = re.search(r"^MemoryMax=(\S+)$", UNIT.read_text(), re.MULTILINE)
    assert unit_memory, "the unit has no MemoryMax"
    resources = container()["resources"]

    for settings in (defaults(), cluster_settings()):
        drain = settings.service.drain_accept_s + settings.service.drain_timeout_s
        assert pod["terminationGracePeriodSeconds"] >= drain
    assert memory_bytes(resources["limits"]["memory"]) == memory_bytes(unit_memory.group(1), systemd=True)
    assert memory_bytes(resources["requests"]["memory"]) < memory_bytes(resources["limits"]["memory"])
    assert str(resources["requests"]["cpu"]) == "1"
    assert "cpu" not in resources["limits"], "a CPU limit throttles decodes mid-utterance"
    config_mount = next(mount for mount in container()["volumeMounts"] if mount["name"] == "config")
    assert config_mount["mountPath"] == "/etc/edge-asr/config.yaml"
    assert container()["args"][-2:] == ["--config", config_mount["mountPath"]]


@pytest.mark.fast
def test_the_configmap_is_a_valid_config_that_trusts_no_proxy_and_announces_nothing() -> None:
    settings = cluster_settings()

    assert settings.http.trusted_proxies == ()
    assert settings.wyoming.trusted_proxies == ()
    assert settings.wyoming.zeroconf == ""


@pytest.mark.fast
def test_the_service_and_the_budget_select_the_pods() -> None:
    found = manifests()
    pod_labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = found["Service"]["spec"]
    budget = found["PodDisruptionBudget"]["spec"]
    container_ports = {port["name"]: port["containerPort"] for port in container()["ports"]}

    assert service["sessionAffinity"] == "None"
    assert service["selector"].items() <= pod_labels.items()
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["maxUnavailable"] == 1
    assert {port["port"]: container_ports[port["targetPort"]] for port in service["ports"]} == {
        defaults().http.port: defaults().http.port,
        wyoming_port(defaults()): wyoming_port(defaults()),
    }


# The image the pods run: the root Dockerfile (built and run by test_image.py). The manifests must run it as what it
# is: its user, its ports, its entrypoint, its writable directories.


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's last stage (values as written, unexpanded)."""
    env: dict[str, str] = {}
    for arguments in final_stage(DOCKERFILE).get("ENV", []):
        for item in shlex.split(arguments):
            name, _, value = item.partition("=")
            env[name] = value
    return env


def image_user() -> tuple[str, int, int]:
    """The Dockerfile's USER with the uid and gid its useradd gives it."""
    final = final_stage(DOCKERFILE)
    [user] = final["USER"]
    for run in final["RUN"]:
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words and words[0] == "useradd" and words[-1] == user:
                return user, int(words[words.index("--uid") + 1]), int(words[words.index("--gid") + 1])
    raise AssertionError(f"the Dockerfile creates no user {user!r} with useradd --uid --gid")


@pytest.mark.fast
def test_the_deployment_runs_the_dockerfiles_image_as_its_user_on_its_ports_with_its_entrypoint() -> None:
    final = final_stage(DOCKERFILE)
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    spec = container()
    _user, uid, gid = image_user()
    [entrypoint], [cmd], [exposed] = final["ENTRYPOINT"], final["CMD"], final["EXPOSE"]

    assert uid != 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert sorted(port["containerPort"] for port in spec["ports"]) == sorted(int(port) for port in exposed.split())
    # The pod keeps the image's entrypoint, the console script, and runs its command.
    assert "command" not in spec
    assert json.loads(entrypoint) == ["edge-asr"]
    assert importlib.metadata.entry_points(group="console_scripts", name="edge-asr")
    assert spec["args"][0] == json.loads(cmd)[0] == "serve"
    # Built and tagged as deployment.yaml says, with no registry of ours in the name.
    assert spec["image"] == f"edge-asr:{__version__}"


@pytest.mark.fast
def test_the_image_is_labelled_with_the_package_version_and_stops_and_checks_health_as_the_pods_do() -> None:
    final = final_stage(DOCKERFILE)
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    versions = [
        arguments.partition("=")[2]
        for stage in dockerfile_stages(DOCKERFILE)
        for instruction, arguments in stage
        if instruction == "ARG" and arguments.startswith("EDGE_ASR_VERSION=")
    ]
    [healthcheck] = final["HEALTHCHECK"]
    stop_timeout = re.search(r"--stop-timeout (\d+)", DOCKERFILE.read_text())

    assert versions, "no ARG EDGE_ASR_VERSION"
    assert set(versions) == {__version__}, "the image's version label is not the package's"
    assert 'org.opencontainers.image.version="${EDGE_ASR_VERSION}"' in " ".join(final["LABEL"])
    assert final["STOPSIGNAL"] == ["SIGTERM"]
    # Docker's default of 10 s would cut the drain short: the Dockerfile tells the pods' grace period.
    assert stop_timeout, "the Dockerfile does not say what stop timeout to give"
    assert int(stop_timeout.group(1)) == pod["terminationGracePeriodSeconds"]
    assert container()["readinessProbe"]["httpGet"]["path"] in healthcheck
    assert f"'EDGE_ASR_HTTP_PORT', '{defaults().http.port}'" in healthcheck
    assert "CMD [" in healthcheck, "not in exec form: the health check would need a shell"
    assert final["FROM"] == ["${BUILD_FROM}"]
    assert "ARG BUILD_FROM=debian:bookworm-slim" in DOCKERFILE.read_text()


@pytest.mark.fast
def test_every_directory_the_image_writes_is_a_volume_of_the_read_only_pod() -> None:
    spec = container()
    env = {**image_env(), **{item["name"]: item["value"] for item in spec.get("env", [])}}
    [workdir] = final_stage(DOCKERFILE)["WORKDIR"]
    mounts = {mount["mountPath"] for mount in spec["volumeMounts"] if not mount.get("readOnly")}

    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    for path in (workdir, env["HOME"], env["HF_HOME"], env["EDGE_ASR_MODEL_DOWNLOAD_DIR"], "/tmp"):
        assert any(path == mount or path.startswith(f"{mount}/") for mount in mounts), f"{path} is read-only"
    # The variable is the setting's real name: the service takes it (an unknown one would stop it).
    assert load_settings(None, environ=env).model.download_dir == env["EDGE_ASR_MODEL_DOWNLOAD_DIR"]


@pytest.mark.fast
def test_the_build_context_leaves_out_the_venv_and_the_tests_but_not_what_the_image_copies() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()}
    copied = [
        source
        for stage in dockerfile_stages(DOCKERFILE)
        for instruction, arguments in stage
        if instruction == "COPY" and not arguments.startswith("--from=")
        for source in arguments.split()[:-1]
    ]

    assert {".venv", ".git", "tests"} <= ignored
    assert {"pyproject.toml", "README.md", "edge_asr", "adapters"} <= set(copied)
    assert not ignored & set(copied)


# --- Avahi --------------------------------------------------------------------------------------------------------


@pytest.mark.fast
def test_the_balancer_announces_its_own_wyoming_port() -> None:
    root = ElementTree.parse(AVAHI).getroot()
    config = HaproxyConfig.read(HAPROXY_CFG)
    frontend = frontend_bound_to(config, wyoming_port(defaults()))
    bind = config.value(f"frontend {frontend}", "bind")

    assert root.findtext("service/type") == "_wyoming._tcp"
    assert f":{root.findtext('service/port')}" == bind
