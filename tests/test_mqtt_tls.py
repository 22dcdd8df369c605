"""MQTT over TLS for real: mosquitto with TLS listeners and certificates made by `openssl` for the test; the
service checks the broker against `mqtt.ca_file`, shows a client certificate when it has one, and says in
/health why TLS failed while it keeps serving speech; `forget-site` uses the same TLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_asr.bench.processes import Broker, Service, make_broker

from .broker import (
    client_tls,
    forget_site,
    mqtt_component,
    mqtt_service,
    retained,
    subscribed,
    tls_listener,
    wait_component,
)
from .certificates import Pki, make_pki
from .speech import normalise, read_pcm, reference
from .wsclient import finals, transcribe

CLIP = "asterisk_conf-muted"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server certificate for 127.0.0.1 and a client certificate, and a CA that signed neither."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Broker]:
    """A broker whose one listener is TLS: clients check it, it does not ask them for a certificate."""
    running = make_broker(tmp_path_factory.mktemp("tls-broker"), *tls_listener(pki))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mutual_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Broker]:
    """A broker whose one listener is TLS and takes only clients with a certificate its CA signed."""
    running = make_broker(tmp_path_factory.mktemp("mutual-broker"), *tls_listener(pki, require_certificate=True))
    yield running
    running.stop()


def tls_settings(ca: Path, client: Pki | None = None) -> tuple[str, ...]:
    """The service's --set items for TLS trusting `ca`, with the PKI's client certificate when `client` is given."""
    settings = ("mqtt.tls=true", f"mqtt.ca_file={ca}")
    if client is None:
        return settings
    return (*settings, f"mqtt.cert_file={client.client.cert}", f"mqtt.key_file={client.client.key}")


def test_the_service_checks_the_broker_against_its_ca_and_publishes_finals_over_tls(
    tmp_path: Path, pki: Pki, tls_broker: Broker
) -> None:
    service = mqtt_service(tmp_path, tls_broker, *tls_settings(pki.ca.cert))
    try:
        component = wait_component(service, lambda c: c["state"] != "connecting")
        with subscribed(tls_broker.port, tls=client_tls(pki.ca.cert)) as subscriber:
            [sent] = finals(transcribe(f"{service.ws_url}?site=tls_kitchen", read_pcm(CLIP)))
            final = subscriber.on("edge_asr/tls_kitchen/final").json()
    finally:
        service.stop()

    assert component == {"name": "mqtt", "state": "connected", "healthy": True}
    assert final["text"] == sent["text"]
    assert normalise(final["text"]) == normalise(reference(CLIP))


@pytest.fixture(scope="module")
def mutual_service(tmp_path_factory: pytest.TempPathFactory, pki: Pki, mutual_broker: Broker) -> Iterator[Service]:
    """A service that shows the broker its client certificate."""
    running = mqtt_service(tmp_path_factory.mktemp("mutual-service"), mutual_broker, *tls_settings(pki.ca.cert, pki))
    yield running
    running.stop()


def test_a_broker_that_wants_a_client_certificate_takes_the_services(
    mutual_service: Service, pki: Pki, mutual_broker: Broker
) -> None:
    component = wait_component(mutual_service, lambda c: c["state"] != "connecting")
    with subscribed(mutual_broker.port, tls=client_tls(pki.ca.cert, pki.client)) as subscriber:
        status = subscriber.on("edge_asr/status")

    assert component == {"name": "mqtt", "state": "connected", "healthy": True}
    assert (status.payload, status.retain) == ("online", True)


def test_without_a_client_certificate_the_service_is_refused_says_why_and_keeps_serving_speech(
    tmp_path: Path, pki: Pki, mutual_broker: Broker
) -> None:
    service = mqtt_service(tmp_path, mutual_broker, *tls_settings(pki.ca.cert))
    try:
        component = wait_component(service, lambda c: c["state"] != "connecting")
        messages = transcribe(service.ws_url, read_pcm(CLIP))
        status, _health = service.health()
        still = mqtt_component(service)
    finally:
        service.stop()

    assert component["healthy"] is False
    assert component["state"] == (
        "tls failed: the broker closed the connection during tls set-up (does it want a client certificate?)"
    )
    assert still == component  # it keeps trying, and keeps saying why
    assert normalise(finals(messages)[-1]["text"]) == normalise(reference(CLIP))
    assert status == 200
    log = service.log()
    assert "mqtt.cert_file" in log
    assert log.count("TLS with the broker") == 1  # once, not at each retry


def test_a_ca_that_did_not_sign_the_brokers_certificate_leaves_the_service_unconnected_saying_why(
    tmp_path: Path, pki: Pki, tls_broker: Broker
) -> None:
    service = mqtt_service(tmp_path, tls_broker, *tls_settings(pki.other_ca.cert))
    try:
        component = wait_component(service, lambda c: c["state"] != "connecting")
        status, _health = service.health()
    finally:
        service.stop()

    assert component["healthy"] is False
    assert component["state"].startswith("tls failed: certificate verify failed")
    assert status == 200
    assert "mqtt.ca_file" in service.log()


def test_forget_site_uses_the_same_tls_as_the_service(mutual_service: Service, pki: Pki, mutual_broker: Broker) -> None:
    wait_component(mutual_service, lambda c: c["healthy"])
    observer = client_tls(pki.ca.cert, pki.client)
    before = retained(mutual_broker.port, "homeassistant/#", tls=observer)
    without_certificate = forget_site(mutual_broker.port, "default", *tls_settings(pki.ca.cert))
    forgotten = forget_site(mutual_broker.port, "default", *tls_settings(pki.ca.cert, pki))
    after = retained(mutual_broker.port, "homeassistant/#", tls=observer)

    assert "homeassistant/event/edge-asr_default/config" in before
    assert without_certificate.returncode == 1
    assert "closed the connection during TLS set-up" in without_certificate.stderr
    assert "mqtt.cert_file" in without_certificate.stderr
    assert forgotten.returncode == 0, forgotten.stderr
    assert not [topic for topic in after if "edge-asr_default" in topic]
