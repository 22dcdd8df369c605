"""The tests' side of a real mosquitto broker (edge_asr.bench.processes): TLS listeners and clients, a paho
subscriber that records what it sees, and the service publishing to it."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_asr.bench.processes import Broker, Service
from edge_asr.bench.waiting import NotReached, until

from .certificates import KeyPair, Pki
from .server import start_service
from .speech import REPO

WAIT_S = 30.0


def tls_listener(pki: Pki, require_certificate: bool = False) -> tuple[str, ...]:
    """make_broker lines that make its listener TLS, with the PKI's server certificate and, when
    `require_certificate`, only clients with a certificate its CA signed."""
    lines = (f"cafile {pki.ca.cert}", f"certfile {pki.server.cert}", f"keyfile {pki.server.key}")
    return (*lines, "require_certificate true") if require_certificate else lines


def client_tls(ca: Path, certificate: KeyPair | None = None) -> ssl.SSLContext:
    """A test client's TLS: trust `ca` (and check the broker's name), present `certificate` if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if certificate is not None:
        context.load_cert_chain(str(certificate.cert), str(certificate.key))
    return context


@dataclass(frozen=True)
class Message:
    """A message the test subscriber received."""

    topic: str
    payload: str
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A paho client that records everything on its topics; it subscribes again after each reconnect."""

    port: int
    topics: tuple[str, ...] = ("edge_asr/#", "homeassistant/#")
    client_id: str = ""
    persistent: bool = False
    tls: ssl.SSLContext | None = None
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=not self.persistent,
        )
        self._client.on_connect = lambda client, *_: client.subscribe([(t, 1) for t in self.topics])
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._record
        self._client.reconnect_delay_set(1, 1)
        if self.tls is not None:
            self._client.tls_set_context(self.tls)
        self._client.connect("127.0.0.1", self.port)
        self._client.loop_start()
        assert self._subscribed.wait(10), "test subscriber could not subscribe"

    def _record(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Message(message.topic, message.payload.decode(), bool(message.retain)))

    def wait_for(self, found: Callable[[list[Message]], bool], timeout_s: float = WAIT_S) -> list[Message]:
        """The messages so far, once `found` accepts them; fails after `timeout_s`."""
        seen: list[Message] = []

        def accepted() -> bool:
            seen[:] = self.received()
            return found(seen)

        try:
            until(accepted, timeout_s, "the messages wanted")
        except NotReached as err:
            raise NotReached(f"{err}: {len(seen)} messages, on {[m.topic for m in seen]}") from None
        return seen

    def received(self) -> list[Message]:
        """The messages so far."""
        with self._lock:
            return list(self.messages)

    def on(self, topic: str, timeout_s: float = WAIT_S) -> Message:
        """The first message on `topic`, waiting for it."""
        messages = self.wait_for(lambda got: any(m.topic == topic for m in got), timeout_s)
        return next(m for m in messages if m.topic == topic)

    def publish(self, topic: str, payload: str) -> None:
        self._client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@contextmanager
def subscribed(port: int, **options: Any) -> Iterator[Subscriber]:
    """A test subscriber, closed at the end."""
    subscriber = Subscriber(port, **options)
    try:
        yield subscriber
    finally:
        subscriber.close()


def retained(port: int, topic_filter: str, tls: ssl.SSLContext | None = None) -> dict[str, str]:
    """The retained messages on `topic_filter` now, topic → payload, as a new subscriber gets them: the broker
    sends them when it subscribes, before a message the subscriber publishes afterwards, which marks their end."""
    marker = f"edge_asr_test/marker/{os.getpid()}-{time.monotonic_ns()}"
    with subscribed(port, topics=(topic_filter, marker), tls=tls) as subscriber:
        subscriber.publish(marker, "end")
        messages = subscriber.wait_for(lambda got: any(m.topic == marker for m in got))
    return {m.topic: m.payload for m in messages if m.retain}


def mqtt_service(tmp_path: Path, broker: Broker, *settings: str) -> Service:
    """The real service publishing to `broker`."""
    return start_service(tmp_path, "mqtt.enabled=true", f"mqtt.port={broker.port}", "mqtt.host=127.0.0.1", *settings)


def mqtt_component(service: Service) -> dict[str, Any]:
    """The `mqtt` entry of /health's components."""
    _status, health = service.health()
    assert isinstance(health, dict), health
    components = health["components"]
    assert isinstance(components, list)
    return next(c for c in components if c["name"] == "mqtt")


def wait_component(service: Service, accept: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll /health until the mqtt component is accepted; fails after WAIT_S."""
    seen: list[dict[str, Any]] = []

    def accepted() -> bool:
        seen[:] = [mqtt_component(service)]
        return accept(seen[0])

    try:
        until(accepted, WAIT_S, "the mqtt component accepted", poll_s=0.1)
    except NotReached as err:
        raise NotReached(f"{err}: it stayed {seen}") from None
    return seen[0]


def forget_site(port: int, site: str, *settings: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """`edge-asr mqtt forget-site SITE` with the test service's configuration and `--set` items, for the broker on
    `port`."""
    args = [
        sys.executable,
        "-m",
        "edge_asr",
        "mqtt",
        "forget-site",
        site,
        "--config",
        str(REPO / "config" / "edge-asr.yaml"),
    ]
    for item in ("mqtt.host=127.0.0.1", f"mqtt.port={port}", *settings):
        args += ["--set", item]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
