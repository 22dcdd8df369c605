"""MQTT adapter: every session's partials and finals, availability and Home Assistant discovery.

With `mqtt.nodes`, several nodes publish to one broker: each under a client id of its own, with its own
availability topic, and all with the same discovery, so that a site's entities stay available while any node is up.

paho-mqtt runs its own network thread; its callbacks only hand their news to the event loop, where all
of this adapter's state lives. Finals wait in a bounded queue until the broker acknowledges them, so a
broker that is down or restarts loses none (a duplicate is possible, as QoS 1 allows). A message paho will
not take is logged (rate-limited) and skipped: one site's trouble never holds up another's, or the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import ConnectFlags, DisconnectFlags, MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_asr import __version__
from edge_asr.api import SpeechEngine
from edge_asr.config import ConfigError, MqttSettings, Settings
from edge_asr.events import Event, Final, Partial, SessionInfo

_LOGGER = logging.getLogger(__name__)

COMPONENT = "mqtt"
# How long stop() waits for the broker to acknowledge queued finals and `offline`.
FLUSH_TIMEOUT_S = 2.0
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
SENSOR_MAX_CHARS = 255
# Each kind of publish failure is logged at most this often, with a count of the ones left out.
FAILURE_LOG_INTERVAL_S = 60.0
# Sites past mqtt.max_sites whose log line was written. Bounded, so that clients naming ever new sites cannot
# grow it; a site that falls out is logged again the next time it speaks.
CAPPED_SITES_REMEMBERED = 4096
# The Home Assistant entities of a site, by discovery component.
DISCOVERY_COMPONENTS = ("event", "sensor")
# The client id every node had before ids came from the host name: entities are still named after it, so that
# they keep their ids and are the same from every node.
ENTITY_BASE = "edge-asr"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_AUTH_REASONS = ("Not authorized", "Bad user name or password")
# paho says why a socket failed only in its log (e.g. the TLS alert of a broker that wants a client certificate).
_PAHO_SOCKET_ERROR = re.compile(r"(?:failed to receive on|timeout on) socket: (.+)")
# The codes around the words of an OSError or OpenSSL error: "[Errno 111] ", "[SSL: X] ", " (_ssl.c:1006)".
_ERROR_NOISE = re.compile(r"^\[(?:SSL(?:: \w+)?|Errno -?\d+)\]\s*|\s*\(_ssl\.c:\d+\)$")
# publish() results paho keeps the message for: without a connection a QoS 1 message waits in paho.
_TAKEN = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)
# Why a broker closes a TLS session before it answers CONNECT, as a rule: our certificate, or its absence.
TLS_CLOSED = "the broker closed the connection during TLS set-up (does it want a client certificate?)"
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


def node_name(settings: MqttSettings) -> str:
    """This node's name: `mqtt.node`, else the host name (made topic-safe)."""
    return settings.node or topic_safe(socket.gethostname(), "localhost")


def client_id(settings: MqttSettings) -> str:
    """The client id this node connects under: `mqtt.client_id`, else `edge-asr-<node name>`, so that nodes sharing
    a broker (which disconnects the older of two connections with one id) never share one."""
    return settings.client_id or f"edge-asr-{topic_safe(node_name(settings), 'localhost')}"


def checked_node(settings: MqttSettings) -> str:
    """This node's name; a ConfigError naming `mqtt.node` when `mqtt.nodes` is set and does not list it."""
    node = node_name(settings)
    if settings.nodes and node not in settings.nodes:
        which = f"{node!r}" if settings.node else f"unset, and this host's name {node!r}"
        raise ConfigError(
            f"mqtt.node: {which} is not one of mqtt.nodes ({', '.join(settings.nodes)}): set it to this node's name"
        )
    return node


def status_topic(settings: MqttSettings, node: str) -> str:
    """The retained `online`/`offline` of `node`: `<prefix>/status` for a single node, else
    `<prefix>/node/<node>/status`."""
    prefix = settings.topic_prefix
    return f"{prefix}/node/{node}/status" if settings.nodes else f"{prefix}/status"


def discovery_availability(settings: MqttSettings, node: str) -> dict[str, Any]:
    """The availability part of every discovery config: this node's status topic, or with `mqtt.nodes` every
    node's, any of which `online` makes the entities available (identical from every node)."""
    if not settings.nodes:
        return {
            "availability_topic": status_topic(settings, node),
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    return {
        "availability": [
            {"topic": status_topic(settings, name), "payload_available": "online", "payload_not_available": "offline"}
            for name in settings.nodes
        ],
        "availability_mode": "any",
    }


def object_id(settings: MqttSettings, site: str) -> str:
    """The Home Assistant object id of a site's entities, the same from every node: `mqtt.client_id` when set
    (as always), else `edge-asr`, and the site."""
    return f"{topic_safe(settings.client_id, ENTITY_BASE)}_{site}"


def discovery_topics(settings: MqttSettings, site: str) -> dict[str, str]:
    """The retained Home Assistant discovery topic of each of a site's entities, by component: where the
    adapter announces the site and `edge-asr mqtt forget-site` clears it."""
    return {
        component: f"{settings.discovery_prefix}/{component}/{object_id(settings, site)}/config"
        for component in DISCOVERY_COMPONENTS
    }


def new_client(settings: MqttSettings, client_id: str) -> mqtt.Client:
    """A paho client with the settings' protocol, credentials and TLS (checked when the settings were loaded)."""
    protocol = mqtt.MQTTv5 if settings.protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    if settings.username or settings.password:
        client.username_pw_set(settings.username or None, settings.password or None)
    if settings.tls:
        client.tls_set(
            ca_certs=settings.ca_file or None,
            certfile=settings.cert_file or None,
            keyfile=settings.key_file or None,
        )
    return client


@dataclass(frozen=True)
class ConnectionFailure:
    """Why a connection to the broker failed, in the words of the OS or OpenSSL (`detail` when `reason` sums
    them up), and whether TLS failed."""

    reason: str
    tls: bool = False
    detail: str = ""

    @classmethod
    def from_error(cls, error: BaseException) -> ConnectionFailure:
        """The failure an exception of a connection attempt describes."""
        return cls(_ERROR_NOISE.sub("", str(error)) or type(error).__name__, isinstance(error, ssl.SSLError))

    def as_tls_closed(self) -> ConnectionFailure:
        """This failure, seen as the broker ending a TLS session before it answered CONNECT. Whether OpenSSL reports
        the broker's alert or a bare EOF is a race within the broker: one reason for both, theirs as the detail."""
        return ConnectionFailure(TLS_CLOSED, tls=True, detail=self.reason)

    def describe(self, where: str) -> str:
        """What failed, for a log line or an error message: e.g. `cannot reach the broker at host:1883: ...`."""
        if not self.tls:
            return f"cannot reach the broker at {where}: {self.reason}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"TLS with the broker at {where} failed: {self.reason}{detail}; {self.hint}"

    @property
    def hint(self) -> str:
        """The settings to check, for a TLS failure ("" for others)."""
        if not self.tls:
            return ""
        if "verify failed" in self.reason:
            return "check mqtt.ca_file, the CA that signed the broker's certificate, and mqtt.host, a name it is for"
        if self.reason == TLS_CLOSED or "certificate" in self.reason or "unknown ca" in self.reason:
            return "check mqtt.cert_file and mqtt.key_file: a client certificate signed by a CA the broker trusts"
        return "check mqtt.tls and the TLS settings of the broker's listener"


def refusal_hint(reason: str) -> str:
    """The settings to check when the broker refuses CONNECT with `reason`, as " (check ...)", or ""."""
    return " (check mqtt.username and mqtt.password or mqtt.password_file)" if reason in _AUTH_REASONS else ""


def socket_failure(level: int, message: str) -> ConnectionFailure | None:
    """The socket error a paho log line reports, or None for any other line."""
    found = _PAHO_SOCKET_ERROR.fullmatch(message) if level == mqtt.MQTT_LOG_ERR else None
    if found is None:
        return None
    text = found.group(1)
    return ConnectionFailure(_ERROR_NOISE.sub("", text) or text, text.startswith("[SSL") or "(_ssl.c:" in text)


@dataclass(frozen=True, eq=False)
class QueuedFinal:
    """A final waiting for its PUBACK; compared by identity, so equal payloads stay two messages."""

    topic: str
    payload: str


class FailureLog:
    """Logs each kind of failure at most once per `interval_s`, then how many of that kind were left out."""

    def __init__(self, interval_s: float = FAILURE_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._logged_at: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def report(self, kind: str, message: str) -> None:
        """Log `message` unless a failure of this `kind` was logged within the interval."""
        now = time.monotonic()
        logged_at = self._logged_at.get(kind)
        if logged_at is not None and now - logged_at < self._interval_s:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return
        self._logged_at[kind] = now
        left_out = self._left_out.pop(kind, 0)
        more = f" ({left_out} more {kind} failure(s) not logged since the last)" if left_out else ""
        _LOGGER.warning("%s%s", message, more)


class MqttAdapter:
    """Publishes every session's events, availability and Home Assistant discovery to an MQTT broker."""

    name = "mqtt"

    def __init__(self, engine: SpeechEngine, settings: Settings) -> None:
        self._engine = engine
        self._settings: MqttSettings = settings.mqtt
        self._model = settings.model.name
        mqtt_settings = settings.mqtt
        self._prefix = mqtt_settings.topic_prefix
        # Refused here, before connecting: a node that is not listed would be available in no discovery.
        self._node = checked_node(mqtt_settings)
        self._status_topic = status_topic(mqtt_settings, self._node)
        self._ha_status_topic = f"{mqtt_settings.discovery_prefix}/status"
        self._default_site = topic_safe(settings.sites.default, "default")
        # The sites with Home Assistant entities, at most mqtt.max_sites (an ordered set), and those past it.
        self._sites: dict[str, None] = {self._default_site: None}
        self._capped_sites: dict[str, None] = {}
        self._queue: deque[QueuedFinal] = deque(maxlen=mqtt_settings.queue_size)
        self._in_flight: dict[int, QueuedFinal] = {}
        # Some queued final is neither in flight nor acknowledged: paho could not take it when it was sent.
        self._unsent = False
        self.dropped_finals = 0
        self._failures = FailureLog()
        self._connected = False
        self._refused = False
        self._stopping = False
        self._state = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set on the event loop whenever the broker acknowledges something or the connection drops.
        self._broker_news = asyncio.Event()
        # Only paho's network thread reads and writes it: the last socket error paho logged.
        self._socket_failure: ConnectionFailure | None = None
        self._client = new_client(mqtt_settings, client_id(mqtt_settings))
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_log = self._on_log

    @property
    def _where(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    async def start(self) -> None:
        """Listen to the engine and connect in the background (never waits for the broker)."""
        settings = self._settings
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
            offline = self._publish("status", self._status_topic, "offline", qos=1, retain=True)
            # is_published() raises for a message paho could not send (the connection just dropped).
            waiting = offline if offline is not None and offline.rc == mqtt.MQTT_ERR_SUCCESS else None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + FLUSH_TIMEOUT_S
            while (
                self._connected
                and (self._queue or (waiting is not None and not waiting.is_published()))
                and loop.time() < deadline
            ):
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
        self._socket_failure = None
        self._soon(self._connect_answered, reason.is_failure, str(reason))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError` around the connection attempt: the one place the reason is.
        error = sys.exc_info()[1]
        self._soon(self._unreachable, ConnectionFailure.from_error(error) if error else ConnectionFailure("no answer"))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        # Without a DISCONNECT from the broker, paho reports a lost connection as "Unspecified error"; the socket
        # error it logged says more.
        if flags.is_disconnect_packet_from_server:
            failure = ConnectionFailure(str(reason))
        else:
            failure = self._socket_failure or ConnectionFailure("connection lost")
        self._socket_failure = None
        self._soon(self._disconnected, failure)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties | None
    ) -> None:
        self._soon(self._acknowledged, mid, reason.is_failure, str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: MQTTMessage) -> None:
        self._soon(self._message, message.topic, bytes(message.payload))

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
        failure = socket_failure(level, message)
        if failure is not None:
            self._socket_failure = failure

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
            self._set_state(
                f"refused: {reason.lower()}",
                logging.ERROR,
                f"MQTT broker {self._where} refused the connection: {reason}{refusal_hint(reason)}; retrying",
            )
            return
        self._refused = False
        self._connected = True
        self._publish("status", self._status_topic, "online", qos=1, retain=True)
        try:
            self._client.subscribe(self._ha_status_topic, qos=1)
        except (ValueError, OSError) as err:
            self._failures.report("subscribe", f"MQTT could not subscribe to {self._ha_status_topic}: {err}")
        for site in self._sites:
            self._publish_discovery(site)
        self._in_flight.clear()
        backlog = f", re-sending {len(self._queue)} queued final(s)" if self._queue else ""
        self._send_unsent()
        self._set_state("connected", logging.INFO, f"MQTT connected to {self._where}{backlog}")

    def _unreachable(self, failure: ConnectionFailure) -> None:
        self._connected = False
        if failure.tls:
            self._tls_failed(failure)
            return
        self._refused = False
        self._set_state(
            f"disconnected: cannot reach {self._where}: {failure.reason.lower()}",
            logging.WARNING,
            f"MQTT {failure.describe(self._where)}; retrying",
        )

    def _tls_failed(self, failure: ConnectionFailure) -> None:
        self._refused = True  # the disconnect that may follow says less
        self._set_state(
            f"tls failed: {failure.reason.lower()}",
            logging.ERROR,
            f"MQTT {failure.describe(self._where)}; retrying",
        )

    def _disconnected(self, failure: ConnectionFailure) -> None:
        self._broker_news.set()
        was_connected, self._connected = self._connected, False
        if self._stopping:
            return
        if failure.tls and not was_connected:
            self._tls_failed(failure.as_tls_closed())
            return
        if self._refused:  # the refusal says more than the disconnect that follows it
            return
        self._set_state(
            f"disconnected: {failure.reason.lower()}",
            logging.WARNING,
            f"MQTT disconnected from {self._where}: {failure.reason}; finals queue until it is back",
        )

    def _acknowledged(self, mid: int, failed: bool, reason: str) -> None:
        self._broker_news.set()
        queued = self._in_flight.pop(mid, None)
        if queued is not None:
            if failed:  # the broker will never take it (e.g. no permission for the topic): retrying cannot help
                _LOGGER.warning("MQTT broker rejected a final on %s: %s", queued.topic, reason)
            self._forget(queued)
        if self._unsent and self._connected:  # whatever paho held is done: it has room again
            self._send_unsent()

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
            self._new_site(site)
        if isinstance(event, Partial):
            if self._connected:
                self._publish("partial", self._topic(site, "partial"), event_payload(info, site, event), qos=0)
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
        if not self._connected:
            return
        if self._unsent:  # older finals wait for paho: this one goes after them
            self._send_unsent()
        else:
            self._send(queued)

    def _new_site(self, site: str) -> None:
        """Give a site Home Assistant entities while fewer than mqtt.max_sites have them; past that, say once that
        it gets none (its events are published all the same)."""
        if len(self._sites) < self._settings.max_sites:
            self._sites[site] = None
            if self._connected:
                self._publish_discovery(site)
            return
        if site in self._capped_sites:
            return
        self._capped_sites[site] = None
        if len(self._capped_sites) > CAPPED_SITES_REMEMBERED:
            del self._capped_sites[next(iter(self._capped_sites))]
        _LOGGER.warning(
            "MQTT: site %s gets no Home Assistant entities: %d site(s) have them, mqtt.max_sites; "
            "its events are still published on %s",
            site,
            len(self._sites),
            self._topic(site, "#"),
        )

    def _publish(self, kind: str, topic: str, payload: str, qos: int, retain: bool = False) -> MQTTMessageInfo | None:
        """paho's publish; None, and a log line (rate-limited per kind), when paho will not take the message."""
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, OSError) as err:  # a topic or payload paho refuses; paho's wake-up socket failing
            self._failures.report(kind, f"MQTT could not publish a {kind} message on {topic}: {err}")
            return None
        if info.rc not in _TAKEN:
            reason = mqtt.error_string(info.rc).rstrip(".")
            self._failures.report(kind, f"MQTT could not publish a {kind} message on {topic}: {reason}")
            return None
        return info

    def _send(self, queued: QueuedFinal) -> bool:
        """Hand a queued final to paho. One paho refuses for good is dropped; one it cannot take now stays queued
        for the next acknowledgement or reconnect, and the answer is False."""
        try:
            info = self._client.publish(queued.topic, queued.payload, qos=1)
        except ValueError as err:  # the topic or payload itself: retrying cannot help
            self._forget(queued)
            self.dropped_finals += 1
            self._failures.report("final", f"MQTT dropped a final for {queued.topic} that paho refused: {err}")
            return True
        except OSError as err:
            return self._not_taken(queued, str(err))
        if info.rc not in _TAKEN:
            return self._not_taken(queued, mqtt.error_string(info.rc).rstrip("."))
        self._in_flight[info.mid] = queued
        return True

    def _not_taken(self, queued: QueuedFinal, reason: str) -> bool:
        self._unsent = True
        self._failures.report(
            "final", f"MQTT could not publish a final on {queued.topic} yet: {reason}; it stays queued"
        )
        return False

    def _send_unsent(self) -> None:
        """Send the queued finals not in flight, in order; stop at the first paho cannot take now (the rest
        would fail alike)."""
        self._unsent = False
        in_flight = {id(queued) for queued in self._in_flight.values()}
        for queued in list(self._queue):
            if id(queued) not in in_flight and not self._send(queued):
                return

    def _forget(self, queued: QueuedFinal) -> None:
        """Take a final off the queue (acknowledged, or dropped for good)."""
        if self._queue and self._queue[0] is queued:
            self._queue.popleft()
        else:
            with contextlib.suppress(ValueError):  # dropped from a full queue meanwhile
                self._queue.remove(queued)

    def _topic(self, site: str, kind: str) -> str:
        return f"{self._prefix}/{site}/{kind}"

    def _publish_discovery(self, site: str) -> None:
        """Retained Home Assistant discovery for one site: an event entity and a last-transcript sensor."""
        final_topic = self._topic(site, "final")
        entity_id = object_id(self._settings, site)
        common = {
            "state_topic": final_topic,
            **discovery_availability(self._settings, self._node),
            "device": {
                "identifiers": [f"edge_asr_{self._settings.client_id or ENTITY_BASE}"],
                "name": "edge-asr",
                "manufacturer": "edge-asr",
                "model": self._model,
                "sw_version": __version__,
            },
        }
        configs = {
            "event": {
                **common,
                "name": f"{site} transcript",
                "unique_id": f"{entity_id}_final",
                "event_types": ["final"],
                "value_template": _EVENT_TEMPLATE,
            },
            "sensor": {
                **common,
                "name": f"{site} last transcript",
                "unique_id": f"{entity_id}_transcript",
                "value_template": f"{{{{ value_json.text[:{SENSOR_MAX_CHARS}] }}}}",
                "json_attributes_topic": final_topic,
                "icon": "mdi:microphone-message",
            },
        }
        for component, topic in discovery_topics(self._settings, site).items():
            self._publish("discovery", topic, json.dumps(configs[component]), qos=1, retain=True)
