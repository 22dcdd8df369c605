"""Where a bench through a balancer went: the sessions each node opened and the audio it took, from its /metrics
before and after. `leastconn` evens out the sessions open at once, so nodes that got longer speech open fewer:
the audio seconds show the load."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from .errors import BenchError

SESSIONS_SAMPLE = "edge_asr_sessions_total"
AUDIO_SAMPLE = "edge_asr_audio_seconds_total"
READ_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NodeSessions:
    """The sessions of the bench's protocol one node opened during the run and the seconds of audio it received
    (of any protocol); None, with the reason in `problem`, when that cannot be told."""

    node: str
    sessions: int | None
    problem: str | None = None
    audio_s: float | None = None


@dataclass(frozen=True)
class NodeCounters:
    """A node's counters since it started: sessions by source (`websocket`, `wyoming`) and audio seconds."""

    sessions: dict[str, int]
    audio_s: float


def read_counters(node: str) -> NodeCounters:
    """A node's session and audio counters, from its /metrics; BenchError when they cannot be read."""
    try:
        with urllib.request.urlopen(f"{node}/metrics", timeout=READ_TIMEOUT_S) as response:
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        # The token, when a node has one, guards /metrics too; the bench has none to send.
        hint = " (a node with http.token wants it for /metrics)" if err.code == 401 else ""
        raise BenchError(f"cannot read {node}/metrics: HTTP {err.code}{hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BenchError(f"cannot read {node}/metrics: {getattr(err, 'reason', None) or err}") from None
    counts: dict[str, int] = {}
    audio_s = 0.0
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == SESSIONS_SAMPLE:
                    source = sample.labels.get("source", "")
                    counts[source] = counts.get(source, 0) + int(sample.value)
                elif sample.name == AUDIO_SAMPLE:
                    audio_s += sample.value
    except ValueError as err:
        raise BenchError(f"{node}/metrics is not Prometheus text: {err}") from None
    return NodeCounters(counts, audio_s)


def read_all(nodes: Sequence[str]) -> dict[str, NodeCounters]:
    """`read_counters` of every node; BenchError when one cannot be read."""
    return {node: read_counters(node) for node in nodes}


def sessions_during(nodes: Sequence[str], before: Mapping[str, NodeCounters], source: str) -> tuple[NodeSessions, ...]:
    """Each node's sessions from `source` since `before`, read now. A node that cannot be read now, or whose
    counter went back (it restarted), gets None and why: the run's own figures still stand."""
    counted: list[NodeSessions] = []
    for node in nodes:
        try:
            after = read_counters(node)
        except BenchError as err:
            counted.append(NodeSessions(node, None, f"unreadable after the run: {err}"))
            continue
        opened = after.sessions.get(source, 0) - before[node].sessions.get(source, 0)
        audio_s = after.audio_s - before[node].audio_s
        if opened < 0 or audio_s < 0:
            counted.append(NodeSessions(node, None, "restarted during the run"))
        else:
            counted.append(NodeSessions(node, opened, audio_s=audio_s))
    return tuple(counted)


def format_nodes(counted: Sequence[NodeSessions], source: str, attempted: int) -> str:
    """The line under the bench's table: `websocket sessions per node (9 of the bench's 12): http://a:8787 5
    (31 s of audio), http://b:8787 4 (30 s of audio)`."""
    cells = [
        f"{item.node} {item.sessions} ({item.audio_s or 0:.0f} s of audio)"
        if item.sessions is not None
        else f"{item.node} n/a ({item.problem})"
        for item in counted
    ]
    total = sum(item.sessions for item in counted if item.sessions is not None)
    return f"{source} sessions per node ({total} of the bench's {attempted}): " + ", ".join(cells)
