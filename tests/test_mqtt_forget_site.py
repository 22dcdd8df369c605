"""`edge-asr mqtt forget-site NAME` against a real mosquitto broker: it clears exactly the retained discovery the
service published for that site, with the service's settings and credentials, and fails clearly and quickly."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.mqtt_topics import discovery_topics
from edge_asr.bench.processes import Broker, Service, free_port, make_broker
from edge_asr.config import MqttSettings

from .broker import forget_site, mqtt_component, mqtt_service, retained, subscribed
from .speech import read_pcm
from .wsclient import finals, transcribe

MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
DISCOVERY = "homeassistant/#"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """An anonymous broker for the module."""
    running = make_broker(tmp_path_factory.mktemp("broker"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Service]:
    """A service publishing to the module's broker that served the sites `porch` and `garage` (and `default`)."""
    running = mqtt_service(tmp_path_factory.mktemp("service"), broker)
    with subscribed(broker.port) as subscriber:
        for site in ("porch", "garage"):
            assert finals(transcribe(f"{running.ws_url}?site={site}", read_pcm("asterisk_conf-muted")))
            subscriber.on(f"edge_asr/{site}/final")
    yield running
    running.stop()


def test_forget_site_clears_the_sites_retained_discovery_and_no_other(service: Service, broker: Broker) -> None:
    before = retained(broker.port, DISCOVERY)
    result = forget_site(broker.port, "porch")
    after = retained(broker.port, DISCOVERY)
    component = mqtt_component(service)

    porch = set(discovery_topics(MqttSettings(), "porch").values())
    assert porch <= set(before)
    assert result.returncode == 0, result.stderr
    assert all(topic in result.stdout for topic in porch)
    assert set(after) == set(before) - porch
    assert {"homeassistant/event/edge-asr_garage/config", "homeassistant/event/edge-asr_default/config"} <= set(after)
    # forget-site connected with a client id of its own: the service's connection was not taken over.
    assert component["state"] == "connected"
    assert "disconnected" not in service.log()


def test_forgetting_a_site_the_broker_has_nothing_for_succeeds(broker: Broker) -> None:
    before = retained(broker.port, DISCOVERY)
    result = forget_site(broker.port, "never_seen")

    assert result.returncode == 0, result.stderr
    assert retained(broker.port, DISCOVERY) == before


@pytest.mark.parametrize("site", ["x" * 65, "porch/+/#", "living room", ""])
def test_an_invalid_site_is_refused_before_connecting(site: str) -> None:
    result = forget_site(free_port(), site)  # nobody listens there: only the name is checked

    assert result.returncode == 2
    assert "is not valid: 1 to 64 letters, digits, '_' or '-'" in result.stderr
    assert "cannot reach" not in result.stderr


def test_a_broker_nobody_runs_fails_at_once_saying_so() -> None:
    port = free_port()
    started = time.monotonic()
    result = forget_site(port, "porch")

    assert result.returncode == 1
    assert f"cannot reach the broker at 127.0.0.1:{port}: Connection refused" in result.stderr
    assert time.monotonic() - started < 10


def test_a_broker_that_never_answers_fails_after_the_timeout() -> None:
    with socket.socket() as silent:  # the kernel accepts connections; nothing ever answers CONNECT
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        started = time.monotonic()
        result = forget_site(silent.getsockname()[1], "porch", timeout_s=30)
        elapsed = time.monotonic() - started

    assert result.returncode == 1
    assert "did not answer within 5 s" in result.stderr  # the default wait
    assert 5 <= elapsed < 20  # loose: the command's own start takes a while on a loaded machine


def test_forget_site_uses_the_services_credentials(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    subprocess.run([str(MOSQUITTO_PASSWD), "-b", "-c", str(passwords), "edge", "right-secret"], check=True)
    secured = make_broker(tmp_path, f"password_file {passwords}", anonymous=False)
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("right-secret\n")
    try:
        wrong = forget_site(secured.port, "porch", "mqtt.username=edge", "mqtt.password=wrong-secret")
        right = forget_site(secured.port, "porch", "mqtt.username=edge", f"mqtt.password_file={password_file}")
    finally:
        secured.stop()

    assert wrong.returncode == 1
    assert "refused the connection" in wrong.stderr
    assert "mqtt.username" in wrong.stderr
    assert right.returncode == 0, right.stderr
    for output in (wrong.stdout, wrong.stderr, right.stdout, right.stderr):
        assert "secret" not in output
