"""The MQTT adapter on the real service and model against a real mosquitto broker: finals from both
adapters, availability and its last will, Home Assistant discovery, a broker restart, bad credentials, sites
the service refuses and sites past mqtt.max_sites."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from wyoming.asr import Transcribe, Transcript, TranscriptStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event

from edge_asr.bench.processes import Broker, Service, make_broker
from edge_asr.bench.wyoming_client import read_until, send_clip

from .broker import Message, mqtt_component, mqtt_service, retained, subscribed, wait_component
from .speech import normalise, read_pcm, reference
from .wsclient import finals, open_stream, transcribe

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
    "vocabulary_names",
    "vocabulary_digest",
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
    "vocabulary_names",
    "vocabulary_digest",
    "timestamp",
}


# Sites the engine must refuse: far too long for a topic level, and MQTT's separator and wildcards.
LONG_SITE = "x" * 65_000
WILDCARD_SITE = "porch/+/#"


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

    with subscribed(broker.port) as subscriber:
        _speak_wyoming(service.wyoming_port, clip, "living_room")
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
        # Both configs come again, not retained (a retained copy is the broker's, not a new announcement).
        subscriber.wait_for(lambda got: {event.topic, sensor.topic} <= {m.topic for m in got if not m.retain})

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


def refused_at_connect(url: str) -> dict[str, Any]:
    """The one message of a WebSocket the service refuses at connect (no `ready`): it closes right after."""
    with open_stream(url) as (ws, first), pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    return first


async def wyoming_requests(port: int, requests: list[tuple[str, bytes]]) -> list[list[Event]]:
    """Satellite requests on one connection, each `transcribe` naming its site: the events of each."""
    answers = []
    async with AsyncTcpClient("127.0.0.1", port) as client:
        for site, pcm in requests:
            await client.write_event(Transcribe(language="en", context={"site": site}).event())
            reader = asyncio.create_task(read_until(client, TranscriptStop().event().type))
            await send_clip(client, pcm)
            answers.append([received.event for received in await reader])
    return answers


def test_invalid_sites_are_refused_and_finals_still_reach_the_broker(service: Service, broker: Broker) -> None:
    ws_clip, wyoming_clip = "asterisk_conf-full", "asterisk_conf-muted"
    with subscribed(broker.port, topics=("#",)) as subscriber:
        wildcard_refusal = refused_at_connect(f"{service.ws_url}?site={quote(WILDCARD_SITE, safe='')}")
        with open_stream(service.ws_url) as (ws, ready):
            ws.send(json.dumps({"type": "config", "site": LONG_SITE}))
            long_refusal = json.loads(ws.recv(timeout=10))
        refused_long, refused_wildcard, accepted = asyncio.run(
            wyoming_requests(
                service.wyoming_port,
                [(LONG_SITE, bytes(3200)), (WILDCARD_SITE, bytes(3200)), ("wyoming_after", read_pcm(wyoming_clip))],
            )
        )
        [sent] = finals(transcribe(f"{service.ws_url}?site=ws_after", read_pcm(ws_clip)))
        ws_final = subscriber.on("edge_asr/ws_after/final").json()
        wyoming_final = subscriber.on("edge_asr/wyoming_after/final").json()
        received = subscriber.wait_for(lambda got: True)
    component = mqtt_component(service)

    assert (wildcard_refusal["type"], wildcard_refusal["code"]) == ("error", "bad_config")
    assert ready["type"] == "ready"
    assert (long_refusal["type"], long_refusal["code"]) == ("error", "bad_config")
    assert len(long_refusal["message"]) < 200  # the site is quoted cut short
    for answer in (refused_long, refused_wildcard):
        assert Error.from_event(answer[0]).code == "bad_config", answer
        assert [Transcript.from_event(e).text for e in answer if Transcript.is_type(e.type)] == [""]
    assert normalise(Transcript.from_event(accepted[-2]).text) == normalise(reference(wyoming_clip))
    assert normalise(wyoming_final["text"]) == normalise(reference(wyoming_clip))
    assert ws_final["text"] == sent["text"]
    assert normalise(sent["text"]) == normalise(reference(ws_clip))
    assert not [m.topic for m in received if "porch" in m.topic or "xxxx" in m.topic]
    assert component == {"name": "mqtt", "state": "connected", "healthy": True}
    assert service.health()[0] == 200


def test_a_site_too_long_for_the_websocket_query_is_refused_at_once(service: Service, broker: Broker) -> None:
    try:
        refusal = refused_at_connect(f"{service.ws_url}?site={LONG_SITE}")
    except InvalidStatus as err:  # refused before the upgrade, as the request line is too long
        refusal = {"status": err.response.status_code}
    with subscribed(broker.port) as subscriber:
        transcribe(f"{service.ws_url}?site=after_long_query", read_pcm("asterisk_conf-muted"))
        subscriber.on("edge_asr/after_long_query/final")

    assert refusal.get("code") == "bad_config" or refusal.get("status") == 414, refusal
    assert mqtt_component(service)["state"] == "connected"


def test_sites_past_max_sites_are_published_without_entities_and_logged_once(tmp_path: Path) -> None:
    capped_broker = make_broker(tmp_path)
    pause = bytes(32000)  # 1 s of silence ends an utterance
    speech = {
        "cap_one": read_pcm("asterisk_conf-muted"),
        "cap_two": read_pcm("asterisk_conf-full"),
        "cap_three": pause.join([read_pcm("asterisk_conf-thereare"), read_pcm("asterisk_conf-errormenu")]),
    }
    try:
        # The default site has its entities from the start, so it is one of the two.
        capped = mqtt_service(tmp_path, capped_broker, "mqtt.max_sites=2", "mqtt.default_site=cap_one")
        try:
            with subscribed(capped_broker.port) as subscriber:
                sent = {site: finals(transcribe(f"{capped.ws_url}?site={site}", pcm)) for site, pcm in speech.items()}
                received = subscriber.wait_for(
                    lambda got: all(
                        len([m for m in got if m.topic == f"edge_asr/{site}/final"]) >= len(sent[site]) for site in sent
                    )
                )
            configs = retained(capped_broker.port, "homeassistant/#")
            component = mqtt_component(capped)
        finally:
            capped.stop()
    finally:
        capped_broker.stop()

    assert len(sent["cap_three"]) == 2
    for site, site_finals in sent.items():
        published = [m.json()["text"] for m in received if m.topic == f"edge_asr/{site}/final"]
        assert published[: len(site_finals)] == [f["text"] for f in site_finals], site
    assert sorted(configs) == [
        "homeassistant/event/edge-asr_cap_one/config",
        "homeassistant/event/edge-asr_cap_two/config",
        "homeassistant/sensor/edge-asr_cap_one/config",
        "homeassistant/sensor/edge-asr_cap_two/config",
    ]
    log = capped.log()
    assert log.count("gets no Home Assistant entities") == 1
    assert "site cap_three gets no Home Assistant entities" in log
    assert component["state"] == "connected"


def _speak_wyoming(port: int, clip: str, site: str) -> str:
    """One Wyoming request of `clip` from `site`; its transcript."""

    async def speak() -> str:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Transcribe(language="en", context={"site": site}).event())
            reader = asyncio.create_task(read_until(client, TranscriptStop().event().type))
            await send_clip(client, read_pcm(clip))
            events = await reader
        return next(Transcript.from_event(got.event).text for got in events if Transcript.is_type(got.event.type))

    return asyncio.run(speak())


def test_partials_for_automations_are_decoded_for_a_wyoming_request_that_reads_none(
    service: Service, broker: Broker
) -> None:
    clip = "asterisk_conf-getconfno"
    with subscribed(broker.port) as subscriber:
        text = _speak_wyoming(service.wyoming_port, clip, "porch")
        final = subscriber.on("edge_asr/porch/final").json()
        received = subscriber.wait_for(lambda got: True)

    assert final["text"] == text
    assert [m for m in received if m.topic == "edge_asr/porch/partial"], "mqtt.partials is on: automations read them"


def test_with_mqtt_partials_off_a_wyoming_request_decodes_no_partial(tmp_path: Path, broker: Broker) -> None:
    clip = "asterisk_conf-getconfno"
    service = mqtt_service(tmp_path, broker, "mqtt.partials=false")
    try:
        with subscribed(broker.port) as subscriber:
            assert subscriber.on("edge_asr/status").payload == "online"
            text = _speak_wyoming(service.wyoming_port, clip, "attic")
            final = subscriber.on("edge_asr/attic/final").json()
            received = subscriber.wait_for(lambda got: True)
        metrics = service.metrics()
    finally:
        service.stop()

    assert final["text"] == text
    assert normalise(text) == normalise(reference(clip))
    assert not [m for m in received if m.topic.endswith("/partial")]
    assert metrics.partial_decodes == 0, "nothing read partials: none was decoded"
    assert metrics.finals == 1
