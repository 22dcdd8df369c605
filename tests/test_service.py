"""The composition root: a start-up that fails part way leaves nothing listening or running behind."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from edge_asr.bench.processes import free_port
from edge_asr.config import build_settings
from edge_asr.model import ModelError
from edge_asr.service import serve

pytestmark = pytest.mark.fast


async def test_a_model_that_fails_to_load_stops_the_adapters_already_started(tmp_path: Path) -> None:
    http_port, wyoming_port, broker_port = free_port(), free_port(), free_port()
    threads_before = set(threading.enumerate())
    settings = build_settings(
        {
            "model": {"name": str(tmp_path)},  # a directory without model.bin
            "http": {"host": "127.0.0.1", "port": http_port},
            "wyoming": {"uri": f"tcp://127.0.0.1:{wyoming_port}"},
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker_port},
        }
    )

    with pytest.raises(ModelError, match=r"model\.bin"):
        await serve(settings)

    for port in (http_port, wyoming_port):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # the listener is closed, so the port is free again
    left = [t for t in set(threading.enumerate()) - threads_before if t.is_alive() and "paho" in t.name.lower()]
    assert left == [], "the MQTT client's network thread was stopped"
