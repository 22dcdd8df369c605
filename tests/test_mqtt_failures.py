"""The MQTT adapter in-process (a scripted engine) against a real mosquitto broker: a message paho will not take,
for one site or for want of room, is logged once and skipped, and holds up neither other sites nor the reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.client import MQTTMessageInfo

from adapters.mqtt import FailureLog, MqttAdapter
from adapters.mqtt_topics import discovery_topics
from edge_asr.bench.processes import Broker, make_broker
from edge_asr.config import MqttSettings, Settings
from edge_asr.events import Final, Partial, SessionInfo

from .broker import Message, subscribed
from .fakes import FakeEngine
from .waiting import eventually, state

LOGGER = "adapters.mqtt"


def final(text: str, utterance: int) -> Final:
    """A final as a session would emit it."""
    return Final(text=text, utterance=utterance, asr_ms=1, e2e_ms=1, ttct_ms=1, start=0.0, end=1.0)


def speaker(site: str) -> SessionInfo:
    """A WebSocket session at `site`."""
    return SessionInfo(1, "websocket", site, "en")


def texts(messages: list[Message], topic: str) -> list[str]:
    """The `text` of each message on `topic`, in order."""
    return [m.json()["text"] for m in messages if m.topic == topic]


class FaultyPublish:
    """Stands in for a paho client's publish: raises the error set for a topic, else publishes."""

    def __init__(self, client: mqtt.Client, failing: dict[str, Exception]) -> None:
        self._publish = client.publish
        self._failing = failing

    def __call__(
        self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, properties: Any = None
    ) -> MQTTMessageInfo:
        """Raise or publish."""
        error = self._failing.get(topic)
        if error is not None:
            raise error
        return self._publish(topic, payload, qos=qos, retain=retain, properties=properties)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """An anonymous broker for the module."""
    running = make_broker(tmp_path_factory.mktemp("broker"))
    yield running
    running.stop()


@contextlib.asynccontextmanager
async def connected_adapter(port: int, name: str, paho_queue: int = 0) -> AsyncIterator[tuple[MqttAdapter, FakeEngine]]:
    """An adapter publishing under the topic prefix and client id `name`, connected; stopped at the end.
    `paho_queue`: how many unacknowledged messages paho may hold (0: any number)."""
    engine = FakeEngine()
    mqtt_settings = MqttSettings(enabled=True, host="127.0.0.1", port=port, client_id=name, topic_prefix=name)
    adapter = MqttAdapter(engine, Settings(mqtt=mqtt_settings))
    adapter._client.max_queued_messages_set(paho_queue)  # past it, paho answers MQTT_ERR_QUEUE_SIZE
    await adapter.start()
    try:
        await eventually(lambda: state(engine) == "connected")
        yield adapter, engine
    finally:
        await adapter.stop()


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Callable[[str], list[str]]:
    """The adapter's warnings that contain a text."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    return lambda text: [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and text in r.getMessage()
    ]


async def test_finals_paho_refuses_for_one_site_are_logged_once_and_the_other_sites_go_out(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, warnings: Callable[[str], list[str]]
) -> None:
    async with connected_adapter(broker.port, "refuse") as (adapter, engine):
        refused = ValueError("Invalid topic.")
        failing: dict[str, Exception] = {"refuse/bad/final": refused, "refuse/bad/partial": refused}
        monkeypatch.setattr(adapter._client, "publish", FaultyPublish(adapter._client, failing))
        with subscribed(broker.port, topics=("refuse/#", "homeassistant/#")) as subscriber:
            emit = engine.listeners[0]
            emit(speaker("good_a"), final("one", 1))
            emit(speaker("bad"), Partial(text="two", stable="", utterance=1, asr_ms=1, e2e_ms=1))
            emit(speaker("bad"), final("two", 1))
            emit(speaker("bad"), final("three", 2))
            emit(speaker("good_b"), final("four", 1))
            received = await asyncio.to_thread(
                subscriber.wait_for,
                lambda got: bool(texts(got, "refuse/good_a/final") and texts(got, "refuse/good_b/final")),
            )
            await eventually(lambda: adapter.dropped_finals == 2)
        connected = state(engine)

    assert texts(received, "refuse/good_a/final") == ["one"]
    assert texts(received, "refuse/good_b/final") == ["four"]
    assert not [m for m in received if m.topic.startswith("refuse/bad/")]
    # Only its finals failed: the site got its Home Assistant entities.
    assert set(discovery_topics(MqttSettings(client_id="refuse"), "bad").values()) <= {m.topic for m in received}
    [dropped] = warnings("refuse/bad/final")
    assert "Invalid topic." in dropped
    assert len(warnings("refuse/bad/partial")) == 1
    assert connected == "connected"


async def test_finals_paho_has_no_room_for_wait_and_go_out_in_order_once_it_has(
    broker: Broker, warnings: Callable[[str], list[str]]
) -> None:
    async with connected_adapter(broker.port, "room", paho_queue=1) as (adapter, engine):
        with subscribed(broker.port, topics=("room/#",)) as subscriber:
            for utterance in range(1, 6):
                engine.listeners[0](speaker("default"), final(f"final {utterance}", utterance))
            received = await asyncio.to_thread(
                subscriber.wait_for, lambda got: len(texts(got, "room/default/final")) >= 5
            )
            await eventually(lambda: not adapter._queue)  # each acknowledged, none dropped
        dropped = adapter.dropped_finals

    assert texts(received, "room/default/final") == [f"final {n}" for n in range(1, 6)]
    assert dropped == 0
    [waiting] = warnings("stays queued")
    assert "queue" in waiting.lower()


async def test_discovery_paho_refuses_for_one_site_holds_up_neither_the_reconnect_nor_the_queued_finals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings: Callable[[str], list[str]]
) -> None:
    # Persistence keeps the test subscriber's session across the restart: it gets what was published before it
    # reconnected.
    restarting = make_broker(tmp_path, "persistence true", f"persistence_location {tmp_path}/")
    sites = ("site_a", "site_b", "site_c")
    try:
        async with connected_adapter(restarting.port, "recon") as (adapter, engine):
            with subscribed(
                restarting.port, topics=("recon/#", "homeassistant/#"), client_id="recon-test", persistent=True
            ) as subscriber:
                emit = engine.listeners[0]
                for site in sites:
                    emit(speaker(site), final(f"{site} before", 1))
                await asyncio.to_thread(
                    subscriber.wait_for, lambda got: all(texts(got, f"recon/{site}/final") for site in sites)
                )
                await asyncio.to_thread(restarting.stop)
                await eventually(lambda: state(engine).startswith("disconnected"))
                seen_before = len(subscriber.messages)
                topics = {site: discovery_topics(MqttSettings(client_id="recon"), site) for site in sites}
                failing: dict[str, Exception] = {
                    topics["site_b"]["event"]: ValueError("Invalid topic."),
                    topics["site_c"]["sensor"]: OSError("Broken pipe"),
                }
                monkeypatch.setattr(adapter._client, "publish", FaultyPublish(adapter._client, failing))
                for site in sites:
                    emit(speaker(site), final(f"{site} while down", 2))
                await asyncio.to_thread(restarting.start)
                await eventually(lambda: state(engine) == "connected")
                received = await asyncio.to_thread(
                    subscriber.wait_for,
                    lambda got: all(f"{site} while down" in texts(got, f"recon/{site}/final") for site in sites),
                )
                await eventually(lambda: not adapter._queue)  # each acknowledged, none dropped
            dropped = adapter.dropped_finals
    finally:
        restarting.stop()

    after_restart = {m.topic for m in received[seen_before:]}
    assert {topics["site_a"]["event"], topics["site_a"]["sensor"]} <= after_restart
    assert topics["site_b"]["sensor"] in after_restart
    assert topics["site_c"]["event"] in after_restart
    assert "recon/status" in after_restart
    assert dropped == 0
    # Two kinds of failure of one kind of message: one line within the minute.
    [logged] = warnings("discovery message")
    assert topics["site_b"]["event"] in logged


async def test_stop_goes_on_when_paho_cannot_send_offline(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine()
    mqtt_settings = MqttSettings(
        enabled=True, host="127.0.0.1", port=broker.port, client_id="stop", topic_prefix="stop"
    )
    adapter = MqttAdapter(engine, Settings(mqtt=mqtt_settings))
    await adapter.start()
    await eventually(lambda: state(engine) == "connected")
    publish = adapter._client.publish

    def connection_gone(topic: str, payload: Any = None, qos: int = 0, retain: bool = False) -> MQTTMessageInfo:
        if topic != "stop/status":
            return publish(topic, payload, qos=qos, retain=retain)
        info = MQTTMessageInfo(0)  # what paho answers when the connection dropped just before
        info.rc = mqtt.MQTT_ERR_NO_CONN
        return info

    monkeypatch.setattr(adapter._client, "publish", connection_gone)
    started = time.monotonic()
    await adapter.stop()

    assert state(engine) == "stopped"
    assert time.monotonic() - started < 5


@pytest.mark.fast
def test_the_failure_log_writes_each_kind_once_per_interval_then_counts_what_it_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    failures = FailureLog(interval_s=0.2)
    for _ in range(3):
        failures.report("final", "final failed")
    failures.report("partial", "partial failed")
    time.sleep(0.25)
    failures.report("final", "final failed again")

    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        "final failed",
        "partial failed",
        "final failed again (2 more final failure(s) not logged since the last)",
    ]
