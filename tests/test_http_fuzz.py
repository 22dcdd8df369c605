"""Property-based: whatever frames a client sends, the WebSocket adapter answers each wrong one with its error
event (never a traceback in the log), goes on or closes cleanly, and serves the next client's stream."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from adapters.http import MAX_TEXT_BYTES, HttpAdapter, protocol_max_bytes
from adapters.wire_json import MAX_JSON_DEPTH
from edge_asr.config import SITE_PATTERN, build_settings

from .fakes import FakeEngine

pytestmark = pytest.mark.fast

WAIT_S = 5.0
MAX_FRAME_BYTES = 4096
LANGUAGES = ("en", "de")
CLOSE_INVALID_DATA, CLOSE_TOO_BIG = 1007, 1009
SETTINGS = build_settings({"http": {"host": "127.0.0.1", "port": 0}, "limits": {"max_frame_bytes": MAX_FRAME_BYTES}})
PROTOCOL_MAX_BYTES = protocol_max_bytes(SETTINGS.limits)


@dataclass(frozen=True)
class NotUtf8:
    """A text frame whose bytes are not UTF-8 (which a well-behaved client cannot even send)."""

    data: bytes


Frame = str | bytes | NotUtf8

_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    _LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=24,
)
CONFIG_MESSAGES = st.fixed_dictionaries(
    {"type": st.just("config")},
    optional={
        "language": JSON_VALUES | st.sampled_from(["en", "de-DE", "EN_us", "fr", "", "e\ud800"]),
        "prompt": JSON_VALUES | st.sampled_from(["Lights \udcff", "Lights."]),
        "site": JSON_VALUES | st.sampled_from(["kitchen", "living room", "", "x" * 65, "hall/+/#", "\ud800"]),
        "vocabulary": JSON_VALUES | st.lists(st.text(max_size=12) | st.sampled_from(["\ud800", "x" * 101]), max_size=4),
        "partials": JSON_VALUES,
        "volume": JSON_VALUES,
    },
)
# Config messages with any other keys too, and messages of any type.
MESSAGES = (
    CONFIG_MESSAGES
    | st.builds(
        lambda extra, config: {**extra, **config}, st.dictionaries(st.text(max_size=8), JSON_VALUES), CONFIG_MESSAGES
    )
    | st.fixed_dictionaries({"type": JSON_VALUES | st.sampled_from(["end", "config"])})
)
VALID_TEXTS = ('{"type": "end"}', '{"type": "config", "language": "de", "site": "hall", "prompt": "Lights."}')


def _nested(depth: int, opening: str, closed: bool) -> str:
    """Arrays or objects `depth` deep, closed or left open."""
    closing = {"[": "]", '{"a":': "}"}[opening]
    return opening * depth + "1" + (closing * depth if closed else "")


def _mutated(text: str, at: int, cut: int, insert: str) -> str:
    """`text` with `cut` characters at `at` replaced by `insert`."""
    at %= len(text) + 1
    return text[:at] + insert + text[at + cut :]


TEXT_FRAMES = st.one_of(
    JSON_VALUES.map(json.dumps),
    MESSAGES.map(json.dumps),
    st.builds(_nested, st.integers(1, 30_000), st.sampled_from(["[", '{"a":']), st.booleans()),
    st.builds(lambda length: json.dumps({"type": "config", "prompt": "x" * length}), st.integers(0, 70_000)),
    st.builds(lambda length: "1" * length, st.integers(4000, 5000)),  # beyond int()'s 4300 digits
    st.builds(
        _mutated,
        st.sampled_from(VALID_TEXTS) | MESSAGES.map(json.dumps),
        st.integers(0, 200),
        st.integers(0, 3),
        st.text(max_size=3),
    ),
    st.text(),
)
BINARY_FRAMES = st.binary(max_size=64) | st.integers(0, 3 * MAX_FRAME_BYTES).map(bytes)
# 0xFF is never part of UTF-8.
NOT_UTF8_FRAMES = st.builds(
    lambda head, tail: NotUtf8(head + b"\xff" + tail), st.binary(max_size=8), st.binary(max_size=8)
)


def _depth(value: Any) -> int:
    """Levels of arrays and objects (walked without recursion: the value may be hundreds deep)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            pending += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _is_text(value: object) -> bool:
    """A string JSON can carry but UTF-8 cannot (a lone surrogate escape) is not text."""
    return isinstance(value, str) and not any(0xD800 <= ord(char) <= 0xDFFF for char in value)


def _vocabulary_error(vocabulary: object) -> str | None:
    if vocabulary is None:
        return None
    if not isinstance(vocabulary, list) or not all(_is_text(name) and len(name) <= 100 for name in vocabulary):
        return "bad_config"
    return None


def _config_error(message: dict[str, Any]) -> str | None:
    if set(message) - {"type", "language", "prompt", "site", "vocabulary", "partials"}:
        return "bad_config"
    if not isinstance(message.get("partials", True), bool):
        return "bad_config"
    values = [message[key] for key in ("language", "prompt", "site") if key in message]
    if not all(_is_text(value) for value in values):
        return "bad_config"
    if _vocabulary_error(message.get("vocabulary")):
        return "bad_config"
    if "language" in message and message["language"].lower()[:2] not in LANGUAGES:
        return "unsupported_language"
    if message.get("site") and not SITE_PATTERN.fullmatch(message["site"]):
        return "bad_config"
    return None


def _text_error(text: str) -> str | None:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return "bad_json"
    if _depth(message) > MAX_JSON_DEPTH:
        return "bad_json"
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "end":
        return None
    return _config_error(message) if kind == "config" else "unknown_message"


def _expected(frame: Frame) -> tuple[str | None, int | None]:
    """The error code this frame must get (None: none), and the close code that must follow (None: it goes on)."""
    if isinstance(frame, NotUtf8):
        return "bad_json", CLOSE_INVALID_DATA
    if isinstance(frame, bytes):
        if len(frame) > MAX_FRAME_BYTES:
            return "frame_too_large", CLOSE_TOO_BIG
        return ("bad_audio" if len(frame) % 2 else None), None
    size = len(frame.encode())
    if size > PROTOCOL_MAX_BYTES:
        # The protocol refuses it unread: the close code (and its reason) is the whole answer.
        return None, CLOSE_TOO_BIG
    if size > MAX_TEXT_BYTES:
        return "frame_too_large", CLOSE_TOO_BIG
    return _text_error(frame), None


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The adapter, against a fake engine that checks sites, on its own event loop in a thread (the clients and
    hypothesis are synchronous); one for the whole module, as a service is one for all its clients."""
    adapter = HttpAdapter(FakeEngine(check_sites=True), SETTINGS)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(adapter.start(), loop).result(WAIT_S)
    try:
        yield f"ws://127.0.0.1:{adapter.port}/ws/stream"
    finally:
        asyncio.run_coroutine_threadsafe(adapter.stop(), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()


def _receive(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(ws.recv(WAIT_S))
    return message


def _errors_until_probe(ws: ClientConnection, probe: str) -> list[str]:
    """Error codes received before the answer to the probe (an unknown message type that names it)."""
    codes = []
    while (message := _receive(ws))["type"] != "error" or probe not in message["message"]:
        if message["type"] == "error":
            codes.append(message["code"])
    return codes


def _closing_errors(ws: ClientConnection) -> tuple[list[str], int | None]:
    """Error codes received until the server closes, and its close code."""
    codes = []
    try:
        while True:
            message = _receive(ws)
            if message["type"] == "error":
                codes.append(message["code"])
    except ConnectionClosed as closed:
        return codes, closed.rcvd.code if closed.rcvd else None


def _check_frames(url: str, frames: list[Frame]) -> None:
    with connect(url, max_size=None, compression=None) as ws:
        assert _receive(ws)["type"] == "ready"
        for number, frame in enumerate(frames):
            code, close_code = _expected(frame)
            if isinstance(frame, NotUtf8):
                ws.send(frame.data, text=True)
            else:
                ws.send(frame)
            if close_code is not None:
                assert _closing_errors(ws) == ([code] if code else [], close_code)
                return
            probe = f"probe-{number}"
            ws.send(json.dumps({"type": probe}))
            assert _errors_until_probe(ws, probe) == ([code] if code else [])


def _check_a_stream_is_served(url: str) -> None:
    with connect(url) as ws:
        assert _receive(ws)["type"] == "ready"
        ws.send(bytes(640))
        ws.send(bytes(640))
        ws.send(json.dumps({"type": "end"}))
        messages = [_receive(ws) for _ in range(4)]
    assert [m["type"] for m in messages] == ["partial", "partial", "final", "done"]
    assert messages[2]["text"] == "w1 w2"


def _check_the_log(caplog: pytest.LogCaptureFixture) -> None:
    faults = [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.ERROR or record.exc_info or "exception" in record.getMessage().lower()
    ]
    assert faults == []


@settings(
    max_examples=75,
    deadline=None,
    database=None,
    # One adapter and one log capture serve every example: that is the point.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames=st.lists(TEXT_FRAMES | BINARY_FRAMES | NOT_UTF8_FRAMES, min_size=1, max_size=6))
def test_any_frames_get_their_errors_and_never_break_the_service(
    url: str, caplog: pytest.LogCaptureFixture, frames: list[Frame]
) -> None:
    caplog.set_level(logging.INFO)
    _check_frames(url, frames)
    _check_a_stream_is_served(url)
    _check_the_log(caplog)
