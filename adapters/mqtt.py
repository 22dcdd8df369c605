"""MQTT adapter: every session's partials and finals, availability and Home Assistant discovery.

paho-mqtt runs its own network thread; its callbacks only hand their news to the event loop, where all
of this adapter's state lives. Finals wait in a bounded queue until the broker acknowledges them, so a
broker that is down or restarts loses none (a duplicate is possible, as QoS 1 allows).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_asr import __version__
from edge_asr.api import SpeechEngine
from edge_asr.config import MqttSettings, Settings
from edge_asr.events import Event, Final, Partial, SessionInfo

_LOGGER = logging.getLogger(__name__)

COMPONENT = "mqtt"
# How long stop() waits for the broker to acknowledge queued finals and `offline`.
FLUSH_TIMEOUT_S = 2.0
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
SENSOR_MAX_CHARS = 255
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_AUTH_REASONS = ("Not authorized", "Bad user name or password")
# Home Assistant's event entity needs `event_type` in the JSON it reads; the rest become attributes.
_EVENT_TEMPLATE = (
    "{{ {'event_type': 'final', 'text': value_json.text, 'site': value_json.site, "
    "'session': value_json.session, 'utterance': value_json.utterance, 'adapter': value_json.adapter, "
    "'language': value_json.language, 'timestamp': value_json.timestamp} | to_json }}"
)


def topic_safe(name: str, default: str) -> str:
    """`name` with anything outside [A-Za-z0-9_-] replaced by `_`; `default` when it is empty."""
    return _UNSAFE.sub("_", name) or default


def utc_timestamp() -> str:
    """Now as ISO 8601 UTC with milliseconds, e.g. `2026-01-31T12:00:00.123Z`."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_payload(info: SessionInfo, site: str, event: Partial | Final) -> str:
    """The JSON of `<prefix>/<site>/partial` or `/final`: the event's wire form, whose session it is, and
    when it was published (for a final queued while the broker was away, when it was made)."""
    return json.dumps({**event.to_dict(), **info.to_dict(), "site": site, "timestamp": utc_timestamp()})


@dataclass(frozen=True, eq=False)
class QueuedFinal:
    """A final waiting for its PUBACK; compared by identity, so equal payloads stay two messages."""

    topic: str
    payload: str


class MqttAdapter:
    """Publishes every session's events, availability and Home Assistant discovery to an MQTT broker."""

    name = "mqtt"

    def __init__(self, engine: SpeechEngine, settings: Settings) -> None:
        self._engine = engine
        self._settings: MqttSettings = settings.mqtt
        self._model = settings.model.name
        mqtt_settings = settings.mqtt
        self._prefix = mqtt_settings.topic_prefix
        self._discovery_prefix = mqtt_settings.discovery_prefix
        self._status_topic = f"{self._prefix}/status"
        self._ha_status_topic = f"{self._discovery_prefix}/status"
        self._node = topic_safe(mqtt_settings.client_id, "edge-asr")
        self._default_site = topic_safe(mqtt_settings.default_site, "default")
        self._sites: dict[str, None] = {self._default_site: None}  # an ordered set
        self._queue: deque[QueuedFinal] = deque(maxlen=mqtt_settings.queue_size)
        self._in_flight: dict[int, QueuedFinal] = {}
        self.dropped_finals = 0
        self._connected = False
        self._refused = False
        self._stopping = False
        self._state = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set on the event loop whenever the broker acknowledges something or the connection drops.
        self._broker_news = asyncio.Event()
        protocol = mqtt.MQTTv5 if mqtt_settings.protocol == "5" else mqtt.MQTTv311
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=mqtt_settings.client_id, protocol=protocol
        )
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message

    @property
    def _where(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    async def start(self) -> None:
        """Listen to the engine and connect in the background (never waits for the broker).

        The settings were checked when they were loaded: the password is read from its file, TLS files exist.
        """
        settings = self._settings
        if settings.username or settings.password:
            self._client.username_pw_set(settings.username or None, settings.password or None)
        if settings.tls:
            self._client.tls_set(
                ca_certs=settings.ca_file or None,
                certfile=settings.cert_file or None,
                keyfile=settings.key_file or None,
            )
        self._client.will_set(self._status_topic, "offline", qos=1, retain=True)
        self._client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._loop = asyncio.get_running_loop()
        self._engine.add_listener(self._on_event)
        self._set_state("connecting", logging.INFO, f"MQTT connecting to {self._where}")
        self._client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s)
        self._client.loop_start()

    async def stop(self) -> None:
        """Publish `offline`, give queued finals a moment to be acknowledged, then disconnect."""
        self._stopping = True
        if self._connected:
            offline = self._client.publish(self._status_topic, "offline", qos=1, retain=True)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + FLUSH_TIMEOUT_S
            while self._connected and (self._queue or not offline.is_published()) and loop.time() < deadline:
                self._broker_news.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._broker_news.wait(), deadline - loop.time())
        if self._queue:
            _LOGGER.warning("MQTT: %d final(s) not delivered before shutdown", len(self._queue))
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self._connected = False
        self._engine.set_component(COMPONENT, "stopped", False)

    # paho's network thread: hand everything to the event loop.

    def _soon(self, callback: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed while paho was still delivering
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: ConnectFlags, reason: ReasonCode, props: Properties | None
    ) -> None:
        self._soon(self._connect_answered, reason.is_failure, str(reason))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._soon(self._unreachable)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        # Without a DISCONNECT from the broker, paho reports a lost connection as "Unspecified error".
        self._soon(self._disconnected, str(reason) if flags.is_disconnect_packet_from_server else "connection lost")

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties | None
    ) -> None:
        self._soon(self._acknowledged, mid, reason.is_failure, str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: MQTTMessage) -> None:
        self._soon(self._message, message.topic, bytes(message.payload))

    # The event loop.

    def _set_state(self, state: str, level: int, message: str) -> None:
        """Record the connection state for /health and log it once per change."""
        if state == self._state:
            return
        self._state = state
        self._engine.set_component(COMPONENT, state, state == "connected")
        _LOGGER.log(level, "%s", message)

    def _connect_answered(self, failed: bool, reason: str) -> None:
        if failed:
            self._refused = True
            hint = " (check mqtt.username and mqtt.password or mqtt.password_file)" if reason in _AUTH_REASONS else ""
            self._set_state(
                f"refused: {reason.lower()}",
                logging.ERROR,
                f"MQTT broker {self._where} refused the connection: {reason}{hint}; retrying",
            )
            return
        self._refused = False
        self._connected = True
        self._client.publish(self._status_topic, "online", qos=1, retain=True)
        self._client.subscribe(self._ha_status_topic, qos=1)
        for site in self._sites:
            self._publish_discovery(site)
        self._in_flight.clear()
        for queued in self._queue:
            self._send(queued)
        backlog = f", re-sending {len(self._queue)} queued final(s)" if self._queue else ""
        self._set_state("connected", logging.INFO, f"MQTT connected to {self._where}{backlog}")

    def _unreachable(self) -> None:
        self._connected = False
        self._refused = False
        self._set_state(
            f"disconnected: cannot reach {self._where}",
            logging.WARNING,
            f"MQTT cannot reach the broker at {self._where}; retrying",
        )

    def _disconnected(self, reason: str) -> None:
        self._broker_news.set()
        self._connected = False
        if self._refused or self._stopping:  # the refusal says more than the disconnect that follows it
            return
        self._set_state(
            f"disconnected: {reason.lower()}",
            logging.WARNING,
            f"MQTT disconnected from {self._where}: {reason}; finals queue until it is back",
        )

    def _acknowledged(self, mid: int, failed: bool, reason: str) -> None:
        self._broker_news.set()
        queued = self._in_flight.pop(mid, None)
        if queued is None:
            return
        if failed:  # the broker will never take it (e.g. no permission for the topic): retrying cannot help
            _LOGGER.warning("MQTT broker rejected a final on %s: %s", queued.topic, reason)
        if self._queue and self._queue[0] is queued:
            self._queue.popleft()
        else:
            with contextlib.suppress(ValueError):  # dropped from a full queue meanwhile
                self._queue.remove(queued)

    def _message(self, topic: str, payload: bytes) -> None:
        if topic == self._ha_status_topic and payload.strip() == b"online" and self._connected:
            _LOGGER.info("Home Assistant is online: publishing MQTT discovery again")
            for site in self._sites:
                self._publish_discovery(site)

    def _on_event(self, info: SessionInfo, event: Event) -> None:
        """Engine listener: partials go out only while connected; finals queue until acknowledged."""
        if not isinstance(event, (Partial, Final)):
            return
        site = topic_safe(info.site, self._default_site)
        if site not in self._sites:
            self._sites[site] = None
            if self._connected:
                self._publish_discovery(site)
        if isinstance(event, Partial):
            if self._connected:
                self._client.publish(self._topic(site, "partial"), event_payload(info, site, event), qos=0)
            return
        if len(self._queue) == self._queue.maxlen:
            self._queue.popleft()
            self.dropped_finals += 1
            self._engine.metrics.mqtt_finals_dropped_total.inc()
            _LOGGER.warning(
                "MQTT final queue full (%d): dropped the oldest final (%d dropped so far)",
                len(self._queue) + 1,
                self.dropped_finals,
            )
        queued = QueuedFinal(self._topic(site, "final"), event_payload(info, site, event))
        self._queue.append(queued)
        if self._connected:
            self._send(queued)

    def _send(self, queued: QueuedFinal) -> None:
        self._in_flight[self._client.publish(queued.topic, queued.payload, qos=1).mid] = queued

    def _topic(self, site: str, kind: str) -> str:
        return f"{self._prefix}/{site}/{kind}"

    def _publish_discovery(self, site: str) -> None:
        """Retained Home Assistant discovery for one site: an event entity and a last-transcript sensor."""
        final_topic = self._topic(site, "final")
        object_id = f"{self._node}_{site}"
        common = {
            "state_topic": final_topic,
            "availability_topic": self._status_topic,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": {
                "identifiers": [f"edge_asr_{self._settings.client_id}"],
                "name": "edge-asr",
                "manufacturer": "edge-asr",
                "model": self._model,
                "sw_version": __version__,
            },
        }
        event = {
            **common,
            "name": f"{site} transcript",
            "unique_id": f"{object_id}_final",
            "event_types": ["final"],
            "value_template": _EVENT_TEMPLATE,
        }
        sensor = {
            **common,
            "name": f"{site} last transcript",
            "unique_id": f"{object_id}_transcript",
            "value_template": f"{{{{ value_json.text[:{SENSOR_MAX_CHARS}] }}}}",
            "json_attributes_topic": final_topic,
            "icon": "mdi:microphone-message",
        }
        for component, config in (("event", event), ("sensor", sensor)):
            topic = f"{self._discovery_prefix}/{component}/{object_id}/config"
            self._client.publish(topic, json.dumps(config), qos=1, retain=True)
