"""MQTT from several nodes against a real mosquitto broker: a client id per node, so that nodes do not knock each
other off; with mqtt.nodes a status topic and last will per node and one discovery from all; without it, a single
node's topics and discovery as they always were."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from adapters.mqtt import MqttAdapter
from edge_asr import __version__
from edge_asr.bench.processes import Broker, make_broker
from edge_asr.config import ConfigError, MqttSettings, Settings

from .broker import WAIT_S, Message, forget_site, mqtt_component, mqtt_service, retained, subscribed
from .fakes import FakeEngine
from .server import start_service
from .speech import read_pcm
from .waiting import eventually, state
from .wsclient import finals, transcribe

NODES = ("mqtt.nodes=node_a,node_b",)
EVENT_CONFIG = "homeassistant/event/edge-asr_default/config"
SENSOR_CONFIG = "homeassistant/sensor/edge-asr_default/config"
# mosquitto's notice when a client connects with the id of one already connected, which it then disconnects.
TAKEN_OVER = "already connected, closing old connection"
DEVICE = {
    "identifiers": ["edge_asr_edge-asr"],
    "name": "edge-asr",
    "manufacturer": "edge-asr",
    "model": "tiny.en",
    "sw_version": __version__,
}


@dataclass
class RecordingEngine(FakeEngine):
    """A scripted engine that also keeps every state the adapter reported, in order."""

    states: list[str] = field(default_factory=list)

    def set_component(self, name: str, state: str, healthy: bool) -> None:
        """Record the state, and keep it as the current one."""
        self.states.append(state)
        super().set_component(name, state, healthy)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """An anonymous broker of the test's own: no retained discovery of another test's."""
    running = make_broker(tmp_path)
    yield running
    running.stop()


def connected_as(broker: Broker) -> list[str]:
    """The client ids mosquitto logged a connection of, in order, but the test subscribers' (`auto-` ids the broker
    gave them)."""
    found = re.findall(r"New client connected from \S+ as (\S+) ", broker.log_path.read_text(errors="replace"))
    return [client_id for client_id in found if not client_id.startswith("auto-")]


@contextlib.asynccontextmanager
async def started(adapters: list[MqttAdapter]) -> AsyncIterator[None]:
    """The adapters, started; stopped at the end."""
    try:
        for adapter in adapters:
            await adapter.start()
        yield
    finally:
        for adapter in adapters:
            await adapter.stop()


async def two_adapters_for_a_while(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, client_ids: tuple[str, str]
) -> tuple[RecordingEngine, RecordingEngine]:
    """Two adapters, on the hosts `box-one.lan` and `box-two.lan`, with the given mqtt.client_id each, connected one
    after the other and then left to the broker for a few reconnect delays; their engines."""
    engines = (RecordingEngine(), RecordingEngine())
    adapters = []
    for host, engine, client_id in zip(("box-one.lan", "box-two.lan"), engines, client_ids, strict=True):
        monkeypatch.setattr("socket.gethostname", lambda host=host: host)
        mqtt_settings = MqttSettings(
            enabled=True, host="127.0.0.1", port=broker.port, client_id=client_id, topic_prefix="hosts"
        )
        adapters.append(MqttAdapter(engine, Settings(mqtt=mqtt_settings)))
    async with started(adapters[:1]):
        await eventually(lambda: state(engines[0]) == "connected")
        async with started(adapters[1:]):
            await eventually(lambda: "connected" in engines[1].states)
            await asyncio.sleep(3)  # a node knocked off reconnects after 1 s, and knocks the other off in turn
    return engines


async def test_nodes_on_two_hosts_connect_under_their_own_client_ids_and_both_stay_connected(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines = await two_adapters_for_a_while(broker, monkeypatch, ("", ""))

    assert connected_as(broker) == ["edge-asr-box-one_lan", "edge-asr-box-two_lan"]
    assert TAKEN_OVER not in broker.log_path.read_text()
    assert [engine.states for engine in engines] == [["connecting", "connected", "stopped"]] * 2


async def test_two_nodes_with_one_client_id_knock_each_other_off(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the nodes did when every one connected as `edge-asr`, and what a client id set alike on two does.
    engines = await two_adapters_for_a_while(broker, monkeypatch, ("edge-asr", "edge-asr"))

    assert f"Client edge-asr {TAKEN_OVER}" in broker.log_path.read_text()
    assert any(reported.startswith("disconnected") for reported in engines[0].states), engines[0].states


@pytest.mark.fast
def test_a_node_that_mqtt_nodes_does_not_list_is_refused_naming_mqtt_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "box-three.lan")
    nodes = ("node_a", "box-three_lan")

    with pytest.raises(ConfigError, match=r"^mqtt\.node: 'node_c' is not one of mqtt\.nodes \(node_a, box-three_lan\)"):
        MqttAdapter(FakeEngine(), Settings(mqtt=MqttSettings(nodes=nodes, node="node_c")))
    with pytest.raises(ConfigError, match=r"^mqtt\.node: unset, and this host's name 'box-three_lan' is not one of"):
        MqttAdapter(FakeEngine(), Settings(mqtt=MqttSettings(nodes=("node_a",))))
    MqttAdapter(FakeEngine(), Settings(mqtt=MqttSettings(nodes=nodes)))  # the host name, made safe, is listed


def test_the_service_refuses_to_start_as_a_node_mqtt_nodes_does_not_list(tmp_path: Path, broker: Broker) -> None:
    service = start_service(
        tmp_path, "mqtt.enabled=true", f"mqtt.port={broker.port}", *NODES, "mqtt.node=node_c", wait_ready=False
    )

    assert service.process.wait(WAIT_S) == 2
    assert "cannot start: mqtt.node: 'node_c' is not one of mqtt.nodes (node_a, node_b)" in service.log()
    assert connected_as(broker) == []


def messages_on(messages: list[Message], topic: str) -> list[Message]:
    """The messages on `topic`, in order."""
    return [m for m in messages if m.topic == topic]


def test_two_nodes_announce_one_set_of_entities_available_while_either_is_up(tmp_path: Path, broker: Broker) -> None:
    node_status = {node: f"edge_asr/node/{node}/status" for node in ("node_a", "node_b")}
    with subscribed(broker.port) as subscriber:
        first = mqtt_service(tmp_path, broker, *NODES, "mqtt.node=node_a")
        subscriber.wait_for(lambda got: bool(messages_on(got, SENSOR_CONFIG)))
        second = mqtt_service(tmp_path, broker, *NODES, "mqtt.node=node_b")
        # The second node's discovery arrives after the first's: the first announces again only when it reconnects.
        announced = subscriber.wait_for(lambda got: len(messages_on(got, SENSOR_CONFIG)) == 2)
        [sent] = finals(transcribe(f"{second.ws_url}?site=hall", read_pcm("asterisk_conf-muted")))
        final = subscriber.on("edge_asr/hall/final").json()
        hall_config = subscriber.on("homeassistant/event/edge-asr_hall/config").json()
        both_up = retained(broker.port, "edge_asr/#")
        components = [mqtt_component(first), mqtt_component(second)]
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        subscriber.wait_for(lambda got: Message(node_status["node_a"], "offline", False) in got)
        one_up = retained(broker.port, "edge_asr/#")
        second_after = mqtt_component(second)

    event_configs = [m.payload for m in messages_on(announced, EVENT_CONFIG)]
    sensor_configs = [m.payload for m in messages_on(announced, SENSOR_CONFIG)]
    assert len(event_configs) == len(sensor_configs) == 2
    # Byte for byte the same from both nodes: one device, one entity per site and component.
    assert event_configs[0] == event_configs[1]
    assert sensor_configs[0] == sensor_configs[1]
    event_config, sensor_config = json.loads(event_configs[0]), json.loads(sensor_configs[0])
    availability = [
        {"topic": node_status["node_a"], "payload_available": "online", "payload_not_available": "offline"},
        {"topic": node_status["node_b"], "payload_available": "online", "payload_not_available": "offline"},
    ]
    for config in (event_config, sensor_config, hall_config):
        assert config["availability"] == availability
        assert config["availability_mode"] == "any"
        assert "availability_topic" not in config  # Home Assistant refuses it together with `availability`
        assert config["device"] == DEVICE
    assert (event_config["unique_id"], sensor_config["unique_id"]) == (
        "edge-asr_default_final",
        "edge-asr_default_transcript",
    )
    assert hall_config["unique_id"] == "edge-asr_hall_final"
    assert (final["text"], final["site"]) == (sent["text"], "hall")

    # Both connected under their own ids, and neither was knocked off.
    assert connected_as(broker) == ["edge-asr-node_a", "edge-asr-node_b"]
    assert TAKEN_OVER not in broker.log_path.read_text()
    assert [c["state"] for c in components] == ["connected", "connected"]
    assert "MQTT disconnected" not in first.log() + second.log()
    assert both_up == {node_status["node_a"]: "online", node_status["node_b"]: "online"}
    # The killed node's last will; the other node and its status are untouched.
    assert one_up == {node_status["node_a"]: "offline", node_status["node_b"]: "online"}
    assert second_after["state"] == "connected"


async def test_a_single_node_keeps_its_status_topic_and_discovery_payload(broker: Broker) -> None:
    engine = RecordingEngine()
    mqtt_settings = MqttSettings(enabled=True, host="127.0.0.1", port=broker.port)
    adapter = MqttAdapter(engine, Settings(mqtt=mqtt_settings))
    async with started([adapter]):
        await eventually(lambda: state(engine) == "connected")
        up = retained(broker.port, "#")
    down = retained(broker.port, "edge_asr/#")

    availability = {
        "availability_topic": "edge_asr/status",
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    assert json.loads(up.pop(EVENT_CONFIG)) == {
        "state_topic": "edge_asr/default/final",
        **availability,
        "device": DEVICE,
        "name": "default transcript",
        "unique_id": "edge-asr_default_final",
        "event_types": ["final"],
        "value_template": (
            "{{ {'event_type': 'final', 'text': value_json.text, 'site': value_json.site, "
            "'session': value_json.session, 'utterance': value_json.utterance, 'adapter': value_json.adapter, "
            "'language': value_json.language, 'timestamp': value_json.timestamp} | to_json }}"
        ),
    }
    assert json.loads(up.pop(SENSOR_CONFIG)) == {
        "state_topic": "edge_asr/default/final",
        **availability,
        "device": DEVICE,
        "name": "default last transcript",
        "unique_id": "edge-asr_default_transcript",
        "value_template": "{{ value_json.text[:255] }}",
        "json_attributes_topic": "edge_asr/default/final",
        "icon": "mdi:microphone-message",
    }
    assert up == {"edge_asr/status": "online"}
    assert down == {"edge_asr/status": "offline"}


def test_forget_site_runs_on_a_host_mqtt_nodes_does_not_list_and_clears_what_all_nodes_share(broker: Broker) -> None:
    # The nodes' configuration on a machine that is none of them (this host's name is not in mqtt.nodes).
    with subscribed(broker.port) as subscriber:
        result = forget_site(broker.port, "default", *NODES)
        cleared = subscriber.wait_for(lambda got: Message(EVENT_CONFIG, "", False) in got)

    assert result.returncode == 0, result.stderr
    assert f"  {EVENT_CONFIG}\n  {SENSOR_CONFIG}\n" in result.stdout
    assert Message(SENSOR_CONFIG, "", False) in cleared
    assert re.fullmatch(r"edge-asr-\S+-forget-[0-9a-f]{8}", connected_as(broker)[-1])
