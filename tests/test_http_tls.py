"""TLS on the HTTP listener: with a certificate and key it serves https:// and wss://, and nothing in plain text."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus
from websockets.typing import Origin

from adapters.http import HttpAdapter
from edge_asr.config import build_settings

from .fakes import FakeEngine

pytestmark = pytest.mark.fast

WAIT_S = 5.0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "c.pem", directory / "k.pem"
    request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-days", "1"]
    extension = ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run([*request, *extension, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
async def port(certificate: tuple[Path, Path]) -> AsyncIterator[int]:
    """The adapter with TLS on a free loopback port."""
    cert, key = certificate
    settings = build_settings(
        {"http": {"host": "127.0.0.1", "port": 0, "tls_cert_file": str(cert), "tls_key_file": str(key)}}
    )
    adapter = HttpAdapter(FakeEngine(), settings)
    await adapter.start()
    try:
        yield adapter.port
    finally:
        await adapter.stop()


async def test_wss_and_https_work_for_a_client_that_trusts_the_certificate(
    port: int, certificate: tuple[Path, Path]
) -> None:
    trusting = ssl.create_default_context(cafile=str(certificate[0]))
    async with connect(f"wss://127.0.0.1:{port}/ws/stream", ssl=trusting) as ws:
        ready = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        await ws.send(bytes(640))
        partial = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
    async with httpx.AsyncClient(verify=trusting) as client:
        health = await client.get(f"https://127.0.0.1:{port}/health")

    assert (ready["type"], partial["type"]) == ("ready", "partial")
    assert health.status_code == 200


async def test_the_own_page_is_the_https_one(port: int, certificate: tuple[Path, Path]) -> None:
    trusting = ssl.create_default_context(cafile=str(certificate[0]))
    url = f"wss://127.0.0.1:{port}/ws/stream"
    async with connect(url, ssl=trusting, origin=Origin(f"https://127.0.0.1:{port}")) as ws:
        ready = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, ssl=trusting, origin=Origin(f"http://127.0.0.1:{port}")):
            pass

    assert ready["type"] == "ready"
    assert refused.value.response.status_code == 403


async def test_plain_text_clients_and_clients_that_do_not_trust_it_are_refused(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(InvalidMessage):
        async with connect(f"ws://127.0.0.1:{port}/ws/stream", open_timeout=WAIT_S):
            pass
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"http://127.0.0.1:{port}/health")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(f"https://127.0.0.1:{port}/health")

    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
