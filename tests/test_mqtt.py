"""The MQTT adapter on the real service and model against a real mosquitto broker: finals from both
adapters, availability and its last will, Home Assistant discovery, a broker restart and bad credentials."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from wyoming.asr import Transcribe, TranscriptStop
from wyoming.client import AsyncTcpClient

from .conftest import Service, free_port, read_pcm, reference, start_service, stop_process
from .test_wyoming import _read_until, _send_clip
from .wsclient import finals, normalise, transcribe

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
WAIT_S = 30.0
FINAL_FIELDS = {
    "text",
    "utterance",
    "session",
    "site",
    "adapter",
    "language",
    "start",
    "end",
    "asr_ms",
    "e2e_ms",
    "ttct_ms",
    "timestamp",
}
PARTIAL_FIELDS = {"text", "stable", "utterance", "session", "site", "adapter", "asr_ms", "e2e_ms", "timestamp"}


@dataclass
class Broker:
    """A mosquitto process on a loopback port, stoppable and restartable on the same port."""

    conf: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert MOSQUITTO.exists(), "the MQTT tests need Debian's mosquitto: script/test installs it"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([str(MOSQUITTO), "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text(errors="replace")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=10)


def make_broker(directory: Path, *lines: str, anonymous: bool = True) -> Broker:
    """Write a mosquitto config for a free port and start the broker."""
    port = free_port()
    conf = directory / f"mosquitto-{port}.conf"
    settings = [f"listener {port} 127.0.0.1", f"allow_anonymous {'true' if anonymous else 'false'}", *lines]
    if os.geteuid() == 0:  # mosquitto would otherwise switch to its own user, who cannot read the test files
        settings.append("user root")
    if not any(line.startswith("persistence ") for line in lines):
        settings.append("persistence false")
    conf.write_text("\n".join(settings) + "\n")
    broker = Broker(conf, port, directory / f"mosquitto-{port}.log")
    broker.start()
    return broker


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
        self._client.connect("127.0.0.1", self.port)
        self._client.loop_start()
        assert self._subscribed.wait(10), "test subscriber could not subscribe"

    def _record(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Message(message.topic, message.payload.decode(), bool(message.retain)))

    def wait_for(self, found: Callable[[list[Message]], bool], timeout_s: float = WAIT_S) -> list[Message]:
        """The messages so far, once `found` accepts them; fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                messages = list(self.messages)
            if found(messages):
                return messages
            if time.monotonic() > deadline:
                raise AssertionError(f"not found in {len(messages)} messages: {[m.topic for m in messages]}")
            time.sleep(0.05)

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


def mqtt_component(service: Service) -> dict[str, Any]:
    """The `mqtt` entry of /health's components."""
    _status, health = service.health()
    assert isinstance(health, dict), health
    components = health["components"]
    assert isinstance(components, list)
    return next(c for c in components if c["name"] == "mqtt")


def wait_component(service: Service, accept: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll /health until the mqtt component is accepted; fails after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        component = mqtt_component(service)
        if accept(component):
            return component
        assert time.monotonic() < deadline, f"mqtt component stayed {component}"
        time.sleep(0.1)


def mqtt_service(tmp_path: Path, broker: Broker, *settings: str) -> Service:
    """The real service publishing to `broker`."""
    return start_service(tmp_path, "mqtt.enabled=true", f"mqtt.port={broker.port}", "mqtt.host=127.0.0.1", *settings)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """An anonymous broker for the module."""
    running = make_broker(tmp_path_factory.mktemp("broker"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Service]:
    """One service publishing to the module's broker, connected."""
    running = mqtt_service(tmp_path_factory.mktemp("service"), broker)
    with subscribed(broker.port) as subscriber:
        assert subscriber.on("edge_asr/status").payload == "online"
    yield running
    running.stop()


def test_a_websocket_final_arrives_on_its_site_topic_with_partials_before_it(service: Service, broker: Broker) -> None:
    clip = "asterisk_conf-getconfno"
    with subscribed(broker.port) as subscriber:
        messages = transcribe(f"{service.ws_url}?site=kitchen", read_pcm(clip))
        [sent] = finals(messages)
        final = subscriber.on("edge_asr/kitchen/final").json()
        received = subscriber.wait_for(lambda got: True)
        event_config = subscriber.on("homeassistant/event/edge-asr_kitchen/config").json()

    assert set(final) == FINAL_FIELDS
    assert final["text"] == sent["text"] and normalise(final["text"]) == normalise(reference(clip))
    assert (final["site"], final["adapter"], final["language"]) == ("kitchen", "websocket", "en")
    for key in ("utterance", "start", "end", "asr_ms", "e2e_ms", "ttct_ms"):
        assert final[key] == sent[key], key
    assert final["timestamp"].endswith("Z")
    partials = [m.json() for m in received if m.topic == "edge_asr/kitchen/partial"]
    assert partials, "no partial on edge_asr/kitchen/partial"
    assert all(set(p) == PARTIAL_FIELDS and p["session"] == final["session"] for p in partials)
    assert not any(m.retain for m in received if m.topic.startswith("edge_asr/kitchen/"))
    assert event_config["state_topic"] == "edge_asr/kitchen/final"


def test_a_wyoming_final_arrives_on_the_site_from_its_context(service: Service, broker: Broker) -> None:
    clip = "asterisk_conf-onlyone"

    async def speak() -> None:
        async with AsyncTcpClient("127.0.0.1", service.wyoming_port) as client:
            await client.write_event(Transcribe(language="en", context={"site": "living room"}).event())
            reader = asyncio.create_task(_read_until(client, TranscriptStop().event().type))
            await _send_clip(client, read_pcm(clip))
            await reader

    with subscribed(broker.port) as subscriber:
        asyncio.run(speak())
        final = subscriber.on("edge_asr/living_room/final").json()

    assert set(final) == FINAL_FIELDS
    assert (final["site"], final["adapter"], final["language"]) == ("living_room", "wyoming", "en")
    assert normalise(final["text"]) == normalise(reference(clip))
    assert 0 <= final["start"] < final["end"]


def test_availability_is_retained_and_discovery_describes_the_site(service: Service, broker: Broker) -> None:
    with subscribed(broker.port) as subscriber:
        status = subscriber.on("edge_asr/status")
        event = subscriber.on("homeassistant/event/edge-asr_default/config")
        sensor = subscriber.on("homeassistant/sensor/edge-asr_default/config")
        assert (status.payload, status.retain, event.retain, sensor.retain) == ("online", True, True, True)
        subscriber.publish("homeassistant/status", "online")  # Home Assistant restarted: announce again
        again = subscriber.wait_for(
            lambda got: any(m.topic == event.topic and not m.retain for m in got), timeout_s=WAIT_S
        )

    assert any(m.topic == sensor.topic and not m.retain for m in again)
    event_config, sensor_config = event.json(), sensor.json()
    assert event_config["event_types"] == ["final"]
    assert event_config["state_topic"] == sensor_config["json_attributes_topic"] == "edge_asr/default/final"
    assert event_config["availability_topic"] == sensor_config["availability_topic"] == "edge_asr/status"
    assert "event_type" in event_config["value_template"] and "255" in sensor_config["value_template"]
    assert event_config["unique_id"] != sensor_config["unique_id"]
    device = event_config["device"]
    assert device == sensor_config["device"]
    assert device["identifiers"] == ["edge_asr_edge-asr"] and device["name"] == "edge-asr"
    assert device["model"] == "tiny.en" and device["sw_version"]


def test_the_last_will_says_offline_when_the_service_is_killed(tmp_path: Path, broker: Broker) -> None:
    killed = mqtt_service(
        tmp_path, broker, "mqtt.topic_prefix=edge_asr_kill", "mqtt.client_id=kill", "mqtt.protocol=3.1.1"
    )
    try:
        with subscribed(broker.port, topics=("edge_asr_kill/status",)) as subscriber:
            assert subscriber.on("edge_asr_kill/status").payload == "online"
            killed.process.send_signal(signal.SIGKILL)
            killed.process.wait(10)
            subscriber.wait_for(lambda got: got[-1].payload == "offline")
        with subscribed(broker.port, topics=("edge_asr_kill/status",)) as late:
            assert late.on("edge_asr_kill/status") == Message("edge_asr_kill/status", "offline", True)
    finally:
        killed.stop()


def test_finals_made_while_the_broker_is_down_arrive_in_order_after_it_restarts(tmp_path: Path) -> None:
    # Persistence keeps the test subscriber's session across the restart, so it gets every final the
    # service re-sends whether it reconnects before or after the service does.
    restarting = make_broker(tmp_path, "persistence true", f"persistence_location {tmp_path}/")
    clips = ("asterisk_conf-hasjoin", "asterisk_conf-leaderhasleft", "asterisk_conf-onlyone")
    pause = bytes(32000)  # 1 s of silence ends each utterance
    final_topic = "edge_asr/default/final"
    try:
        restarted = mqtt_service(tmp_path, restarting, "mqtt.client_id=restart")
        try:
            with subscribed(restarting.port, client_id="restart-test", persistent=True) as subscriber:
                subscriber.on("edge_asr/status")
                restarting.stop()
                wait_component(restarted, lambda c: not c["healthy"] and c["state"].startswith("disconnected"))
                sent = finals(transcribe(restarted.ws_url, pause.join(read_pcm(c) for c in clips)))
                assert len(sent) == len(clips)
                restarting.start()
                wait_component(restarted, lambda c: c["healthy"])
                received = subscriber.wait_for(
                    lambda got: len({m.json()["utterance"] for m in got if m.topic == final_topic}) >= len(sent)
                )
                restarted.stop()  # a clean stop leaves `offline` too
                subscriber.wait_for(lambda got: Message("edge_asr/status", "offline", False) in got[len(received) :])
        finally:
            restarted.stop()
    finally:
        restarting.stop()

    first_seen: dict[int, dict[str, Any]] = {}
    for final in (m.json() for m in received if m.topic == final_topic):
        first_seen.setdefault(final["utterance"], final)  # QoS 1 allows duplicates: keep the first delivery
    assert [f["utterance"] for f in first_seen.values()] == [s["utterance"] for s in sent]
    assert [f["text"] for f in first_seen.values()] == [s["text"] for s in sent]
    assert "re-sending 3 queued final(s)" in restarted.log()


def test_wrong_credentials_leave_the_service_serving_and_health_says_why(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    subprocess.run([str(MOSQUITTO_PASSWD), "-b", "-c", str(passwords), "edge", "right"], check=True)
    secured = make_broker(tmp_path, f"password_file {passwords}", anonymous=False)
    try:
        refused = mqtt_service(tmp_path, secured, "mqtt.username=edge", "mqtt.password=wrong")
        try:
            component = wait_component(refused, lambda c: c["state"].startswith("refused"))
            clip = "asterisk_conf-hasjoin"
            messages = transcribe(refused.ws_url, read_pcm(clip))
            assert normalise(finals(messages)[-1]["text"]) == normalise(reference(clip))
            assert refused.process.poll() is None
        finally:
            refused.stop()
        password_file = tmp_path / "mqtt-password"
        password_file.write_text("right\n")
        accepted = mqtt_service(tmp_path, secured, "mqtt.username=edge", f"mqtt.password_file={password_file}")
        try:
            accepted_component = wait_component(accepted, lambda c: c["healthy"])
        finally:
            accepted.stop()
    finally:
        secured.stop()

    assert component["healthy"] is False
    assert component["state"] in ("refused: not authorized", "refused: bad user name or password")
    assert "refused the connection" in refused.log() and "mqtt.username" in refused.log()
    assert accepted_component["state"] == "connected"
