"""Prometheus metrics of one engine, in a registry of its own so several engines never collide."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .events import Event, Final, Partial, SessionError

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0)


class Metrics:
    """The `edge_asr_*` histograms, counters and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decode_seconds = self._latency("edge_asr_decode_seconds", "Model time per decode", "kind")
        self.e2e_seconds = self._latency(
            "edge_asr_e2e_seconds", "Newest audio of a decode arriving to its event leaving", "type"
        )
        self.ttct_seconds = self._latency("edge_asr_ttct_seconds", "Silence start or end-of-audio to the final leaving")
        self.events_total = Counter("edge_asr_events_total", "Events emitted", ["type"], registry=self.registry)
        self.sessions_total = Counter("edge_asr_sessions_total", "Sessions opened", ["source"], registry=self.registry)
        self.rejected_total = Counter(
            "edge_asr_sessions_rejected_total", "Sessions refused", ["reason"], registry=self.registry
        )
        self.audio_seconds_total = Counter("edge_asr_audio_seconds_total", "Audio received", registry=self.registry)
        self.decode_failures_total = Counter(
            "edge_asr_decode_failures_total", "Decodes the model failed", registry=self.registry
        )
        self.events_dropped_total = Counter(
            "edge_asr_events_dropped_total",
            "Partials and errors dropped for a client that did not keep up (finals are never dropped)",
            registry=self.registry,
        )
        self.mqtt_finals_dropped_total = Counter(
            "edge_asr_mqtt_finals_dropped_total",
            "Finals dropped because the MQTT queue was full while the broker was unreachable",
            registry=self.registry,
        )
        self.sessions_active = Gauge("edge_asr_sessions_active", "Open sessions", registry=self.registry)
        self.decode_queue = Gauge(
            "edge_asr_decode_queue_depth", "Sessions waiting for a decode", registry=self.registry
        )
        self.event_loop_tasks = Gauge(
            "edge_asr_event_loop_tasks", "Tasks on the service's event loop (a leak shows here)", registry=self.registry
        )
        self.event_loop_tasks.set_function(_running_tasks)

    def _latency(self, name: str, documentation: str, *labels: str) -> Histogram:
        return Histogram(name, documentation, labels, registry=self.registry, buckets=_LATENCY_BUCKETS)

    def observe_event(self, event: Event) -> None:
        """Count an event and record its timings."""
        if isinstance(event, Partial):
            self.events_total.labels("partial").inc()
            self.e2e_seconds.labels("partial").observe(event.e2e_ms / 1000)
        elif isinstance(event, Final):
            self.events_total.labels("final").inc()
            self.e2e_seconds.labels("final").observe(event.e2e_ms / 1000)
            self.ttct_seconds.observe(event.ttct_ms / 1000)
        elif isinstance(event, SessionError):
            self.events_total.labels("error").inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


def _running_tasks() -> float:
    """Tasks on the running event loop (0 when read outside one)."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return 0.0
