"""A small real WebSocket client for the tests: streams PCM as a browser or app would."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHUNK_BYTES = 640  # 20 ms of 16 kHz s16le


@contextmanager
def open_stream(url: str) -> Iterator[tuple[ClientConnection, dict[str, Any]]]:
    """Connect and read the server's first message. Like a browser, the client takes every message off the socket
    as it arrives, also while the test is busy sending: with websockets' flow control it would stop reading, and
    a send that fails once the server has closed would then drop what the kernel still held for it."""
    with connect(url, open_timeout=10, max_size=None, max_queue=None) as ws:
        yield ws, json.loads(ws.recv(timeout=10))


def send_audio(ws: ClientConnection, pcm: bytes, realtime: bool = True) -> None:
    """Send PCM in 20 ms frames, paced against the clock when `realtime`."""
    started = time.monotonic()
    for offset in range(0, len(pcm), CHUNK_BYTES):
        ws.send(pcm[offset : offset + CHUNK_BYTES])
        if realtime:
            delay = started + (offset + CHUNK_BYTES) / 32000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def read_until_done(ws: ClientConnection, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Messages up to and including `done` (sent after the client's end is fully transcribed)."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        message = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        messages.append(message)
        if message["type"] == "done":
            return messages


def transcribe(url: str, pcm: bytes, trailing_silence_s: float = 0.3, realtime: bool = True) -> list[dict[str, Any]]:
    """Stream one clip, send `end`, and return every message after `ready`."""
    with open_stream(url) as (ws, ready):
        assert ready["type"] == "ready", ready
        send_audio(ws, pcm + bytes(int(trailing_silence_s * 32000)), realtime)
        ws.send(json.dumps({"type": "end"}))
        return read_until_done(ws)


def finals(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The final events among messages."""
    return [m for m in messages if m["type"] == "final"]
