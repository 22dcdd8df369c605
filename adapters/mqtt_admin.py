"""`edge-asr mqtt forget-site NAME`: remove a site's Home Assistant entities by clearing its retained discovery."""

from __future__ import annotations

import argparse
import math
import secrets
import sys
import threading
import time

from edge_asr.config import SITE_PATTERN, MqttSettings, Settings
from edge_asr.events import quoted

from .mqtt import BrokerCallbacks, new_client
from .mqtt_failure import ConnectionFailure, refusal_hint
from .mqtt_topics import client_id, discovery_topics

# How long the broker has to accept the connection, and then to acknowledge the messages.
TIMEOUT_S = 5.0
EXIT_FAILED = 1
# As for any other command-line mistake (argparse's status).
EXIT_USAGE = 2


class MqttAdminError(Exception):
    """The broker could not be reached, refused the connection, or did not take the messages."""


class InvalidSiteName(MqttAdminError):
    """A name that cannot be a site (the engine refuses it), so it has nothing to forget."""


class _Connection(BrokerCallbacks):
    """paho's callbacks for one short connection: the broker's answer to CONNECT, and publishes it refused."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.answered = threading.Event()
        self.failure = ""
        self.rejected: dict[int, str] = {}
        self._where = where

    def _broker_answered(self, failed: bool, reason: str) -> None:
        if failed and not self.answered.is_set():
            self.failure = f"the broker at {self._where} refused the connection: {reason}{refusal_hint(reason)}"
        self.answered.set()

    def _connection_ended(self, reason: str, from_server: bool, logged: ConnectionFailure | None) -> None:
        if not self.answered.is_set():  # closed before it answered CONNECT: e.g. it wants a client certificate
            failure = logged or ConnectionFailure(reason)
            self.failure = (failure.as_tls_closed() if failure.tls else failure).describe(self._where)
            self.answered.set()

    def _broker_acknowledged(self, mid: int, failed: bool, reason: str) -> None:
        if failed:
            self.rejected[mid] = reason


def forget_site(settings: MqttSettings, site: str, timeout_s: float = TIMEOUT_S) -> list[str]:
    """Publish an empty retained message (which deletes the retained one, and Home Assistant the entity) on each
    discovery topic of `site`; the topics. Raises InvalidSiteName before connecting, or MqttAdminError."""
    if not SITE_PATTERN.fullmatch(site):
        raise InvalidSiteName(f"site {quoted(site)} is not valid: 1 to 64 letters, digits, '_' or '-'")
    where = f"{settings.host}:{settings.port}"
    # A client id of its own: the service's would take over, and end, the service's connection.
    client = new_client(settings, f"{client_id(settings)}-forget-{secrets.token_hex(4)}")
    client.connect_timeout = timeout_s
    connection = _Connection(where)
    connection.attach(client)
    try:
        client.connect(settings.host, settings.port, keepalive=settings.keepalive_s)
    except OSError as err:  # refused, unreachable, timed out, or the TLS handshake failed
        raise MqttAdminError(ConnectionFailure.from_error(err).describe(where)) from None
    client.loop_start()
    try:
        if not connection.answered.wait(timeout_s):
            raise MqttAdminError(f"the broker at {where} did not answer within {timeout_s:g} s")
        if connection.failure:
            raise MqttAdminError(connection.failure)
        topics = list(discovery_topics(settings, site).values())
        sent = [client.publish(topic, b"", qos=1, retain=True) for topic in topics]
        deadline = time.monotonic() + timeout_s
        try:
            for info in sent:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (ValueError, RuntimeError) as err:  # paho could not send it: the connection dropped
            raise MqttAdminError(f"the connection to the broker at {where} failed: {err}") from None
        if not all(info.is_published() for info in sent):
            raise MqttAdminError(f"the broker at {where} did not acknowledge within {timeout_s:g} s")
        rejected = [
            f"{topic}: {connection.rejected[info.mid]}"
            for topic, info in zip(topics, sent, strict=True)
            if info.mid in connection.rejected
        ]
        if rejected:
            raise MqttAdminError(f"the broker at {where} refused to clear {', '.join(rejected)}")
        return topics
    finally:
        client.disconnect()
        client.loop_stop()


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= 3600:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds above 0 and up to 3600")
    return value


def add_forget_site_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `edge-asr mqtt forget-site` (the configuration flags come from the command line's own)."""
    parser.add_argument("site", metavar="NAME", help="the site, as in the topic <topic_prefix>/NAME/final")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=TIMEOUT_S,
        help=f"seconds the broker has to accept the connection and to acknowledge (default {TIMEOUT_S:g})",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """`edge-asr mqtt forget-site NAME`; its exit status (1: the broker failed, 2: not a valid site)."""
    site: str = args.site
    try:
        topics = forget_site(settings.mqtt, site, args.timeout)
    except InvalidSiteName as err:
        print(f"edge-asr: {err}", file=sys.stderr)
        return EXIT_USAGE
    except MqttAdminError as err:
        print(f"edge-asr: cannot forget site {site}: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Site {site}: cleared its Home Assistant discovery on {settings.mqtt.host}:{settings.mqtt.port}:")
    for topic in topics:
        print(f"  {topic}")
    return 0
