"""The MQTT adapter on the real service and model against a real mosquitto broker: finals from both
adapters, availability and its last will, Home Assistant discovery, a broker restart and bad credentials."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from wyoming.asr import Transcribe, TranscriptStop
from wyoming.client import AsyncTcpClient

from .broker import WAIT_S, Broker, Message, make_broker, mqtt_service, subscribed
from .server import Service
from .speech import normalise, read_pcm, reference
from .wsclient import finals, transcribe
from .wyoming_client import read_until, send_clip

MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
FINAL_FIELDS = {
    "type",
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
    "revised",
    "timestamp",
}
PARTIAL_FIELDS = {
    "type",
    "text",
    "stable",
    "utterance",
    "session",
    "site",
    "adapter",
    "language",
    "asr_ms",
    "e2e_ms",
    "timestamp",
}


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
    assert final["text"] == sent["text"]
    assert normalise(final["text"]) == normalise(reference(clip))
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
            reader = asyncio.create_task(read_until(client, TranscriptStop().event().type))
            await send_clip(client, read_pcm(clip))
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
    assert "event_type" in event_config["value_template"]
    assert "255" in sensor_config["value_template"]
    assert event_config["unique_id"] != sensor_config["unique_id"]
    device = event_config["device"]
    assert device == sensor_config["device"]
    assert device["identifiers"] == ["edge_asr_edge-asr"]
    assert device["name"] == "edge-asr"
    assert device["model"] == "tiny.en"
    assert device["sw_version"]


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
    assert "refused the connection" in refused.log()
    assert "mqtt.username" in refused.log()
    assert accepted_component["state"] == "connected"
