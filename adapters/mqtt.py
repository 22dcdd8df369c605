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
import logging
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import ConnectFlags, DisconnectFlags, MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_asr.api import SpeechEngine
from edge_asr.config import MqttSettings, Settings
from edge_asr.events import Event, Final, Partial, SessionInfo

from .mqtt_failure import ConnectionFailure, refusal_hint, socket_failure
from .mqtt_topics import (
    checked_node,
    client_id,
    discovery_payloads,
    discovery_topics,
    event_payload,
    site_topic,
    status_topic,
    topic_safe,
)

_LOGGER = logging.getLogger(__name__)

COMPONENT = "mqtt"
# How long stop() waits for the broker to acknowledge queued finals and `offline`.
FLUSH_TIMEOUT_S = 2.0
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
# Each kind of publish failure is logged at most this often, with a count of the ones left out.
FAILURE_LOG_INTERVAL_S = 60.0
# Sites past mqtt.max_sites whose log line was written. Bounded, so that clients naming ever new sites cannot
# grow it; a site that falls out is logged again the next time it speaks.
CAPPED_SITES_REMEMBERED = 4096
# publish() results paho keeps the message for: without a connection a QoS 1 message waits in paho.
_TAKEN = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)


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


class BrokerCallbacks(ABC):
    """paho's callbacks, on its network thread, passed on in plain values: the broker's answer to CONNECT, the
    end of a connection with the socket error paho logged before it, and the broker's answer to a publish."""

    def __init__(self) -> None:
        # Only paho's network thread reads and writes it: the last socket error paho logged.
        self._socket_failure: ConnectionFailure | None = None

    def attach(self, client: mqtt.Client) -> None:
        """Receive `client`'s news."""
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log

    @abstractmethod
    def _broker_answered(self, failed: bool, reason: str) -> None:
        """The broker answered CONNECT: accepted it, or refused it (`failed`) for `reason`."""

    @abstractmethod
    def _connection_ended(self, reason: str, from_server: bool, logged: ConnectionFailure | None) -> None:
        """The connection ended: paho's `reason`, whether the broker sent DISCONNECT, the socket error paho logged."""

    @abstractmethod
    def _broker_acknowledged(self, mid: int, failed: bool, reason: str) -> None:
        """The broker answered publish `mid`: took it, or refused it (`failed`) for `reason`."""

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: ConnectFlags, reason: ReasonCode, props: Properties | None
    ) -> None:
        self._socket_failure = None
        self._broker_answered(reason.is_failure, str(reason))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        logged, self._socket_failure = self._socket_failure, None
        self._connection_ended(str(reason), flags.is_disconnect_packet_from_server, logged)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties | None
    ) -> None:
        self._broker_acknowledged(mid, reason.is_failure, str(reason))

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
        failure = socket_failure(message) if level == mqtt.MQTT_LOG_ERR else None
        if failure is not None:
            self._socket_failure = failure


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


class FinalQueue:
    """The finals the broker has not acknowledged, oldest first and at most `size` (a full queue drops its oldest,
    and calls `on_overflow`): each handed to paho in order, and kept until acknowledged or refused for good."""

    def __init__(self, client: mqtt.Client, size: int, failures: FailureLog, on_overflow: Callable[[], None]) -> None:
        self._client = client
        self._queue: deque[QueuedFinal] = deque(maxlen=size)
        self._in_flight: dict[int, QueuedFinal] = {}
        # Some queued final is neither in flight nor acknowledged: paho could not take it when it was sent.
        self._unsent = False
        self._failures = failures
        self._on_overflow = on_overflow
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, queued: QueuedFinal, connected: bool) -> None:
        """Queue a final and, while connected, send it (after any older ones paho could not take yet)."""
        if len(self._queue) == self._queue.maxlen:
            self._queue.popleft()
            self.dropped += 1
            self._on_overflow()
            _LOGGER.warning(
                "MQTT final queue full (%d): dropped the oldest final (%d dropped so far)",
                len(self._queue) + 1,
                self.dropped,
            )
        self._queue.append(queued)
        if not connected:
            return
        if self._unsent:  # older finals wait for paho: this one goes after them
            self._send_unsent()
        else:
            self._send(queued)

    def resend(self) -> None:
        """On a new connection: hand every queued final to paho again, in order."""
        self._in_flight.clear()
        self._send_unsent()

    def acknowledged(self, mid: int, failed: bool, reason: str, connected: bool) -> None:
        """The broker answered publish `mid`: a final it took or refused leaves the queue; while connected, the
        finals paho could not take yet go now."""
        queued = self._in_flight.pop(mid, None)
        if queued is not None:
            if failed:  # the broker will never take it (e.g. no permission for the topic): retrying cannot help
                _LOGGER.warning("MQTT broker rejected a final on %s: %s", queued.topic, reason)
            self._forget(queued)
        if self._unsent and connected:  # whatever paho held is done: it has room again
            self._send_unsent()

    def _send(self, queued: QueuedFinal) -> bool:
        """Hand a queued final to paho. One paho refuses for good is dropped; one it cannot take now stays queued
        for the next acknowledgement or reconnect, and the answer is False."""
        try:
            info = self._client.publish(queued.topic, queued.payload, qos=1)
        except ValueError as err:  # the topic or payload itself: retrying cannot help
            self._forget(queued)
            self.dropped += 1
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


class MqttAdapter(BrokerCallbacks):
    """Publishes every session's events, availability and Home Assistant discovery to an MQTT broker."""

    name = "mqtt"

    def __init__(self, engine: SpeechEngine, settings: Settings) -> None:
        super().__init__()
        self._engine = engine
        self._settings: MqttSettings = settings.mqtt
        self._model = settings.model.name
        mqtt_settings = settings.mqtt
        self._broker = f"{mqtt_settings.host}:{mqtt_settings.port}"
        # Refused here, before connecting: a node that is not listed would be available in no discovery.
        self._node = checked_node(mqtt_settings)
        self._status_topic = status_topic(mqtt_settings, self._node)
        self._ha_status_topic = f"{mqtt_settings.discovery_prefix}/status"
        self._default_site = topic_safe(settings.sites.default, "default")
        # The sites with Home Assistant entities, at most mqtt.max_sites (an ordered set), and those past it.
        self._sites: dict[str, None] = {self._default_site: None}
        self._capped_sites: dict[str, None] = {}
        self._failures = FailureLog()
        self._connected = False
        self._refused = False
        self._stopping = False
        self._state = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set on the event loop whenever the broker acknowledges something or the connection drops.
        self._broker_news = asyncio.Event()
        self._client = new_client(mqtt_settings, client_id(mqtt_settings))
        self._queue = FinalQueue(
            self._client, mqtt_settings.queue_size, self._failures, engine.metrics.mqtt_finals_dropped_total.inc
        )
        self.attach(self._client)
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message

    @property
    def dropped_finals(self) -> int:
        """How many finals were dropped: the oldest of a full queue, or one paho refused for good."""
        return self._queue.dropped

    async def start(self) -> None:
        """Listen to the engine and connect in the background (never waits for the broker)."""
        settings = self._settings
        self._client.will_set(self._status_topic, "offline", qos=1, retain=True)
        self._client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._loop = asyncio.get_running_loop()
        self._engine.add_listener(self._on_event, reads_partials=settings.partials)
        self._set_state("connecting", logging.INFO, f"MQTT connecting to {self._broker}")
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

    def _broker_answered(self, failed: bool, reason: str) -> None:
        self._soon(self._connect_answered, failed, reason)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError` around the connection attempt: the one place the reason is.
        error = sys.exc_info()[1]
        self._soon(self._unreachable, ConnectionFailure.from_error(error) if error else ConnectionFailure("no answer"))

    def _connection_ended(self, reason: str, from_server: bool, logged: ConnectionFailure | None) -> None:
        # Without a DISCONNECT from the broker, paho reports a lost connection as "Unspecified error"; the socket
        # error it logged says more.
        failure = ConnectionFailure(reason) if from_server else (logged or ConnectionFailure("connection lost"))
        self._soon(self._disconnected, failure)

    def _broker_acknowledged(self, mid: int, failed: bool, reason: str) -> None:
        self._soon(self._acknowledged, mid, failed, reason)

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
            self._set_state(
                f"refused: {reason.lower()}",
                logging.ERROR,
                f"MQTT broker {self._broker} refused the connection: {reason}{refusal_hint(reason)}; retrying",
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
        backlog = f", re-sending {len(self._queue)} queued final(s)" if self._queue else ""
        self._queue.resend()
        self._set_state("connected", logging.INFO, f"MQTT connected to {self._broker}{backlog}")

    def _unreachable(self, failure: ConnectionFailure) -> None:
        self._connected = False
        if failure.tls:
            self._tls_failed(failure)
            return
        self._refused = False
        self._set_state(
            f"disconnected: cannot reach {self._broker}: {failure.reason.lower()}",
            logging.WARNING,
            f"MQTT {failure.describe(self._broker)}; retrying",
        )

    def _tls_failed(self, failure: ConnectionFailure) -> None:
        self._refused = True  # the disconnect that may follow says less
        self._set_state(
            f"tls failed: {failure.reason.lower()}",
            logging.ERROR,
            f"MQTT {failure.describe(self._broker)}; retrying",
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
            f"MQTT disconnected from {self._broker}: {failure.reason}; finals queue until it is back",
        )

    def _acknowledged(self, mid: int, failed: bool, reason: str) -> None:
        self._broker_news.set()
        self._queue.acknowledged(mid, failed, reason, self._connected)

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
            if self._connected and self._settings.partials:
                self._publish(
                    "partial", site_topic(self._settings, site, "partial"), event_payload(info, site, event), qos=0
                )
            return
        queued = QueuedFinal(site_topic(self._settings, site, "final"), event_payload(info, site, event))
        self._queue.add(queued, self._connected)

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
            site_topic(self._settings, site, "#"),
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

    def _publish_discovery(self, site: str) -> None:
        """Retained Home Assistant discovery for one site: an event entity and a last-transcript sensor."""
        payloads = discovery_payloads(self._settings, self._node, self._model, site)
        for component, topic in discovery_topics(self._settings, site).items():
            self._publish("discovery", topic, payloads[component], qos=1, retain=True)
