"""A real HAProxy for the tests: the shipped deploy/haproxy/haproxy.cfg, pointed at nodes on loopback ports and
run in the foreground."""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_asr.bench.processes import free_port, stop_process

from .speech import REPO
from .waiting import until

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
# The ports the shipped frontends bind: Wyoming, HTTP (the WebSocket), HAProxy's own stats page.
WYOMING_PORT, HTTP_PORT, STATS_PORT = 10300, 8787, 8404
START_TIMEOUT_S = 20.0


def haproxy_binary() -> str:
    """The haproxy executable; the test fails (it does not skip) when there is none."""
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    assert found, "haproxy is missing: script/test installs Debian's haproxy"
    return found


@dataclass(frozen=True)
class NodePorts:
    """Where a node listens: its HTTP port (the WebSocket and the health checks) and its Wyoming port."""

    http: int
    wyoming: int


def loopback_config(shipped: str, nodes: Mapping[str, NodePorts], binds: Mapping[int, int], run_dir: Path) -> str:
    """The shipped config with only what a test cannot use changed: each frontend binds 127.0.0.1 on the port
    `binds` gives for its shipped one; each `server` line names its node's loopback ports (the rest of the line,
    send-proxy-v2 and the check options, stays); the global lines that need root or Debian's layout (chroot, user,
    group) go; syslog becomes stderr; the admin socket moves into `run_dir`. Every change must find its line, so
    a reworked haproxy.cfg fails here instead of being tested by halves."""
    lines: list[str] = []
    counts = {"drop": 0, "log": 0, "socket": 0, "bind": 0, "server": 0}
    for line in shipped.splitlines():
        words = line.split()
        if words[:1] in (["chroot"], ["user"], ["group"]):
            counts["drop"] += 1
            continue
        if words[:2] == ["log", "/dev/log"]:
            line = line.replace("/dev/log", "stderr format raw")
            counts["log"] += 1
        elif words[:2] == ["stats", "socket"]:
            line = line.replace(words[2], str(run_dir / "admin.sock"))
            counts["socket"] += 1
        elif words[:1] == ["bind"]:
            line = f"    bind 127.0.0.1:{binds[int(words[1].lstrip(':'))]}"
            counts["bind"] += 1
        elif words[:1] == ["server"]:
            ports = nodes[words[1]]
            shipped_port = int(words[2].rpartition(":")[2])
            assert shipped_port in (WYOMING_PORT, HTTP_PORT), line
            words[2] = f"127.0.0.1:{ports.wyoming if shipped_port == WYOMING_PORT else ports.http}"
            if "port" in words:  # the Wyoming backend's health check goes to the node's HTTP port
                words[words.index("port") + 1] = str(ports.http)
            line = "    " + " ".join(words)
            counts["server"] += 1
        lines.append(line)
    assert counts == {"drop": 3, "log": 2, "socket": 1, "bind": len(binds), "server": 2 * len(nodes)}, counts
    return "\n".join(lines) + "\n"


@dataclass
class Balancer:
    """A running `haproxy -db` in front of the nodes."""

    process: subprocess.Popen[bytes]
    http_port: int
    wyoming_port: int
    stats_port: int
    log_path: Path

    @property
    def ws_url(self) -> str:
        """The WebSocket stream through the balancer."""
        return f"ws://127.0.0.1:{self.http_port}/ws/stream"

    def log(self) -> str:
        """What HAProxy logged so far (one line per connection, with the node it went to)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> UP, DOWN, or a transition such as `UP 1/3` (going down), from the stats CSV."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5) as response:
            text = response.read().decode()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            (row["pxname"], row["svname"]): row["status"]
            for row in rows
            if row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def server_states(self, name: str) -> set[str]:
        """A node's state in every backend (both: WebSocket and Wyoming)."""
        return {state for (_backend, server), state in self.states().items() if server == name}

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll `condition` until it holds; the seconds it took. The timeout only catches a hang."""
        try:
            return until(condition, timeout_s, what)
        except AssertionError as err:
            raise AssertionError(f"{err}; states {self.states()}\n{self.log()[-3000:]}") from None


@contextlib.contextmanager
def balancer(run_dir: Path, nodes: Mapping[str, NodePorts]) -> Iterator[Balancer]:
    """HAProxy with the shipped config in front of `nodes` (named as in haproxy.cfg), on free loopback ports;
    stopped on the way out."""
    shipped = HAPROXY_CFG.read_text()
    binds = {port: free_port() for port in (WYOMING_PORT, HTTP_PORT, STATS_PORT)}
    config = run_dir / "haproxy.cfg"
    config.write_text(loopback_config(shipped, nodes, binds, run_dir))
    log_path = run_dir / "haproxy.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([haproxy_binary(), "-db", "-f", str(config)], stdout=log, stderr=log)
    running = Balancer(process, binds[HTTP_PORT], binds[WYOMING_PORT], binds[STATS_PORT], log_path)
    try:

        def answers() -> bool:
            assert process.poll() is None, f"haproxy exited with {process.returncode}:\n{running.log()}"
            with contextlib.suppress(OSError):
                return bool(running.states())
            return False

        running.wait_until(answers, START_TIMEOUT_S, "haproxy's stats page")
        yield running
    finally:
        stop_process(process, timeout_s=5)


def shipped_servers() -> list[str]:
    """The node names of the shipped config's WebSocket backend, in order."""
    return re.findall(rf"^\s+server (\S+) \S+:{HTTP_PORT}\b", HAPROXY_CFG.read_text(), re.MULTILINE)
