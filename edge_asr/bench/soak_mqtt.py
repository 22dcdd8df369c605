"""The soak's MQTT subscriber: every final the service publishes, across broker restarts, in a persistent session."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

import paho.mqtt.client as mqtt
from paho.mqtt.client import ConnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .errors import BenchError

_LOGGER = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 10.0
# paho retries this often while the broker is down, so the subscriber is back a second after the broker.
RECONNECT_S = 1


@dataclass(frozen=True)
class BrokerFinal:
    """A final as the broker delivered it: whose it is (site, the service's session number), what it says, and when
    the service made it (its `timestamp`, as seconds since the epoch; None when unreadable)."""

    site: str
    session: int
    utterance: int
    text: str
    made_at: float | None


def read_final(payload: bytes) -> BrokerFinal | None:
    """A final's MQTT payload (see README "MQTT"); None when it is not one."""
    try:
        data: Any = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    site, session, utterance, text = (data.get(key) for key in ("site", "session", "utterance", "text"))
    if isinstance(site, str) and isinstance(text, str) and _is_int(session) and _is_int(utterance):
        return BrokerFinal(site, session, utterance, text, _epoch_s(data.get("timestamp")))
    return None


def _epoch_s(timestamp: object) -> float | None:
    """An ISO 8601 UTC time such as `2026-01-31T12:00:00.123Z` as seconds since the epoch."""
    if not isinstance(timestamp, str):
        return None
    try:
        # Python 3.10's fromisoformat does not read the "Z" suffix.
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _is_int(value: object) -> TypeGuard[int]:
    """A JSON integer (JSON's true and false are bools in Python, and bools are ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


class FinalSubscriber:
    """A paho client with a fixed client id and clean_session False, subscribed at QoS 1 to every site's finals:
    while it reconnects after a broker restart, the broker keeps what is published for it and delivers it then.

    paho calls back on its own thread; the records are guarded by a lock and read as copies.
    """

    def __init__(self, port: int, topic_prefix: str, client_id: str) -> None:
        self._port = port
        self._topic = f"{topic_prefix}/+/final"
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._finals: list[BrokerFinal] = []
        self._unreadable = 0
        self._connects = 0
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(RECONNECT_S, RECONNECT_S)

    async def connect(self) -> None:
        """Connect and wait for the first subscription to be granted."""
        try:
            await asyncio.to_thread(self._client.connect, "127.0.0.1", self._port)
        except OSError as err:
            raise BenchError(f"the soak's MQTT subscriber cannot connect to port {self._port}: {err}") from None
        self._client.loop_start()
        if not await asyncio.to_thread(self._subscribed.wait, SUBSCRIBE_TIMEOUT_S):
            raise BenchError(f"the soak's MQTT subscriber was not subscribed within {SUBSCRIBE_TIMEOUT_S:g} s")

    def close(self) -> None:
        """Disconnect and stop paho's thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: ConnectFlags, reason: ReasonCode, props: Properties | None
    ) -> None:
        if reason.is_failure:
            _LOGGER.warning("Soak subscriber: the broker refused the connection: %s", reason)
            return
        with self._lock:
            self._connects += 1
        # The persistent session keeps the subscription; subscribing again costs nothing and survives a lost store.
        client.subscribe(self._topic, qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: MQTTMessage) -> None:
        final = read_final(bytes(message.payload))
        with self._lock:
            if final is None:
                self._unreadable += 1
            else:
                self._finals.append(final)

    def finals(self) -> list[BrokerFinal]:
        """Every final received so far, in order of arrival, duplicates included (QoS 1 may deliver twice)."""
        with self._lock:
            return list(self._finals)

    @property
    def unreadable(self) -> int:
        """Messages on the finals' topics that were not finals."""
        with self._lock:
            return self._unreadable

    @property
    def connects(self) -> int:
        """Successful connections so far (1 + the reconnects)."""
        with self._lock:
            return self._connects
