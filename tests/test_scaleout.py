"""Real edge-asr nodes behind a real HAProxy configured from deploy/haproxy/haproxy.cfg (README.md, "More than one
box"): sessions spread over the nodes, Wyoming requests get their transcripts through the balancer, and a full, a
draining and a killed node leave the rotation while clients go on being served.

The nodes and the balancer are shared by the module's tests, each of which starts from a settled balancer (every
running node UP, every stopped one DOWN, no session open). The two tests that stop a node come last and stop
different ones."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from edge_asr.bench.nodes import read_counters
from edge_asr.bench.processes import Service
from edge_asr.bench.wyoming_client import ReceivedEvent as Received
from edge_asr.bench.wyoming_client import transcribe, transcript_text

from .haproxy import Balancer, NodePorts, balancer, shipped_servers
from .server import START_TIMEOUT_S, start_service
from .speech import normalise, read_pcm, reference, silence
from .wsclient import finals, open_stream, read_until_done, send_audio

pytestmark = pytest.mark.system

MAX_SESSIONS = 3
# The service's default, which the shipped checks are timed against: a draining node leaves the rotation within
# inter x fall = 1.5 s, while it still takes sessions.
DRAIN_ACCEPT_S = 2.0
NODE_SETTINGS = (
    "model.threads=1",
    "model.workers=1",
    f"limits.max_sessions={MAX_SESSIONS}",
    f"service.drain_accept_s={DRAIN_ACCEPT_S}",
    # HAProxy connects from 127.0.0.1: the nodes take the client's address from its headers.
    "http.trusted_proxies=127.0.0.1/32",
    "wyoming.trusted_proxies=127.0.0.1/32",
)
WYOMING_CLIP = "asterisk_conf-onlyone"  # as in test_wyoming
DRAIN_CLIP = "asterisk_confbridge-pin"  # 5 s without a pause: mid-sentence at the signal
# Waits for the balancer or a node; they only catch a hang.
HANG_S = 30.0
END = json.dumps({"type": "end"})


@dataclass
class Cluster:
    """The nodes, by their names in haproxy.cfg, and the balancer in front of them."""

    nodes: dict[str, Service]
    balancer: Balancer

    def running(self) -> dict[str, Service]:
        """The nodes whose process has not exited."""
        return {name: node for name, node in self.nodes.items() if node.process.poll() is None}

    def sessions(self, source: str) -> dict[str, int]:
        """Sessions each running node has opened so far from `source`, read from its /metrics."""
        return {name: read_counters(node.base_url).sessions.get(source, 0) for name, node in self.running().items()}

    def settle(self) -> None:
        """Wait until no running node holds a session and the balancer has every running node UP and every other
        one DOWN, in both backends."""
        for name, node in self.running().items():
            assert node.sessions_drop_to(0, timeout_s=HANG_S), f"{name} still holds sessions: {node.health()}"

        def settled() -> bool:
            running = self.running()
            return all(
                state == ("UP" if name in running else "DOWN")
                for (_backend, name), state in self.balancer.states().items()
            )

        self.balancer.wait_until(settled, HANG_S, "running nodes UP, stopped ones DOWN")


def _wait_ready(node: Service) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while node.process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if node.health()[0] == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"node not ready (exit code {node.process.poll()}):\n{node.log()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The shipped config's nodes (node1..node3) as real services, and HAProxy in front of them."""
    run_dir = tmp_path_factory.mktemp("scaleout")
    # Started together, so the models load side by side.
    nodes = {name: start_service(run_dir, *NODE_SETTINGS, wait_ready=False) for name in shipped_servers()}
    try:
        for node in nodes.values():
            _wait_ready(node)
        ports = {name: NodePorts(node.port, node.wyoming_port) for name, node in nodes.items()}
        with balancer(run_dir, ports) as running:
            yield Cluster(nodes, running)
    finally:
        # Signalled together, so their drains overlap.
        for node in nodes.values():
            if node.process.poll() is None:
                node.process.terminate()
        for node in nodes.values():
            node.stop()


def _sessions_one_by_one(url: str, count: int) -> None:
    """`count` WebSocket sessions, one after the other, each ended at once; each must be taken."""
    for _ in range(count):
        with open_stream(url) as (ws, ready):
            assert ready["type"] == "ready", ready
            ws.send(END)
            read_until_done(ws)


def _opened(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after}


def test_websocket_sessions_through_the_balancer_spread_evenly_over_the_nodes(cluster: Cluster) -> None:
    cluster.settle()
    before = cluster.sessions("websocket")

    # Held open together: leastconn gives each new one to the node with the fewest.
    with contextlib.ExitStack() as stack:
        streams = [stack.enter_context(open_stream(cluster.balancer.ws_url)) for _ in range(2 * len(before))]
        for ws, ready in streams:
            assert ready["type"] == "ready", ready
            ws.send(END)
            read_until_done(ws)

    opened = _opened(before, cluster.sessions("websocket"))
    assert sum(opened.values()) == len(streams)
    assert min(opened.values()) >= 1, opened
    assert max(opened.values()) - min(opened.values()) <= 1, opened


def test_wyoming_requests_through_the_balancer_get_their_transcripts_from_every_node(cluster: Cluster) -> None:
    cluster.settle()
    before = cluster.sessions("wyoming")
    pcm = read_pcm(WYOMING_CLIP)

    async def requests() -> list[tuple[list[Received], float]]:
        return await asyncio.gather(*(transcribe(cluster.balancer.wyoming_port, pcm) for _ in before))

    results = asyncio.run(requests())

    for received, _stop_at in results:
        assert normalise(transcript_text(received)) == normalise(reference(WYOMING_CLIP))
    # One each: every node read the balancer's PROXY v2 header (one that did not would take it for a broken event).
    assert _opened(before, cluster.sessions("wyoming")) == dict.fromkeys(before, 1)


def test_a_full_node_is_skipped_and_new_sessions_land_on_the_others(cluster: Cluster) -> None:
    cluster.settle()
    name, full = next(iter(cluster.running().items()))
    others = len(cluster.running()) - 1

    # Its sessions come straight to it, so HAProxy counts no connection on it: leastconn alone would pick it.
    with contextlib.ExitStack() as stack:
        for _ in range(MAX_SESSIONS):
            _ws, ready = stack.enter_context(open_stream(full.ws_url))
            assert ready["type"] == "ready", ready
        cluster.balancer.wait_until(lambda: cluster.balancer.server_states(name) == {"DOWN"}, HANG_S, f"{name} DOWN")
        before = cluster.sessions("websocket")
        _sessions_one_by_one(cluster.balancer.ws_url, 2 * others)
        opened = _opened(before, cluster.sessions("websocket"))

    assert opened.pop(name) == 0
    assert sum(opened.values()) == 2 * others, opened


def _open_sessions(node: Service) -> object:
    _status, health = node.health()
    return health["sessions"] if isinstance(health, dict) else None


def _finish_speaking(ws: ClientConnection, pcm: bytes) -> list[dict[str, Any]]:
    """Send the rest of the utterance and a pause, then everything the node sends until it closes the connection
    at the end of its drain (which may come before the client's `end`)."""
    messages: list[dict[str, Any]] = []
    with contextlib.suppress(ConnectionClosed):
        send_audio(ws, pcm + silence(1.0))
        ws.send(END)
    with contextlib.suppress(ConnectionClosed):
        while True:
            messages.append(json.loads(ws.recv(timeout=HANG_S)))
    return messages


def test_a_node_sent_sigterm_mid_utterance_delivers_its_final_and_takes_no_new_sessions(cluster: Cluster) -> None:
    cluster.settle()
    pcm = silence(0.3) + read_pcm(DRAIN_CLIP)
    first = 32000  # 1 s of audio before the signal

    with open_stream(cluster.balancer.ws_url) as (ws, ready), ThreadPoolExecutor(1) as speaker:
        assert ready["type"] == "ready", ready
        [name] = [name for name, node in cluster.running().items() if _open_sessions(node) == 1]
        draining = cluster.nodes[name]
        send_audio(ws, pcm[:first])
        draining.process.send_signal(signal.SIGTERM)
        spoken = speaker.submit(_finish_speaking, ws, pcm[first:])

        cluster.balancer.wait_until(lambda: cluster.balancer.server_states(name) == {"DOWN"}, HANG_S, f"{name} DOWN")
        others = {other for other in cluster.running() if other != name}
        before = {other: count for other, count in cluster.sessions("websocket").items() if other in others}
        _sessions_one_by_one(cluster.balancer.ws_url, 2 * len(others))
        after = {other: count for other, count in cluster.sessions("websocket").items() if other in others}
        messages = spoken.result(timeout=HANG_S)

    assert sum(_opened(before, after).values()) == 2 * len(others), "every later session went to another node"
    [final] = finals(messages)
    assert normalise(final["text"]) == normalise(reference(DRAIN_CLIP)), "the whole sentence, not cut at the signal"
    assert draining.process.wait(timeout=HANG_S) == 0


def test_a_node_killed_with_sigkill_is_taken_out_and_the_next_requests_succeed_on_the_others(cluster: Cluster) -> None:
    cluster.settle()
    running = cluster.running()
    assert len(running) >= 2, "a node to kill and one to take over"
    name, killed = next(iter(running.items()))
    before = {source: cluster.sessions(source) for source in ("websocket", "wyoming")}

    killed.process.kill()
    killed.process.wait()

    # Until the checks notice, HAProxy still picks it: the refused connection is retried on another node
    # (`retries`, `option redispatch`). Wyoming requests at once, so that one of them is given to the dead node.
    async def requests() -> list[tuple[list[Received], float]]:
        return await asyncio.gather(*(transcribe(cluster.balancer.wyoming_port, silence(0.5)) for _ in running))

    for received, _stop_at in asyncio.run(requests()):
        assert transcript_text(received) == ""
    _sessions_one_by_one(cluster.balancer.ws_url, len(running))
    cluster.balancer.wait_until(lambda: cluster.balancer.server_states(name) == {"DOWN"}, HANG_S, f"{name} DOWN")
    _sessions_one_by_one(cluster.balancer.ws_url, len(running))

    websocket = _opened(before["websocket"], cluster.sessions("websocket"))
    wyoming = _opened(before["wyoming"], cluster.sessions("wyoming"))
    assert sum(websocket.values()) == 2 * len(running), websocket
    assert sum(wyoming.values()) == len(running), wyoming
