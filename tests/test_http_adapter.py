"""The HTTP/WebSocket adapter on a real socket against a fake engine: the wire format, the refusal codes,
bad frames, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from adapters.http import HttpAdapter
from edge_asr.api import EngineBusy, EngineNotReady, EngineRefusal, UnsupportedLanguage
from edge_asr.config import build_settings
from edge_asr.events import Done, Final, Message, Partial, Ready, SessionError, message_from_dict

from .fakes import FakeEngine

pytestmark = pytest.mark.fast

WAIT_S = 5.0


@pytest.fixture
def engine() -> FakeEngine:
    """A fresh fake engine per test, checking sites as the real one does."""
    return FakeEngine(check_sites=True)


@pytest.fixture
async def base_url(engine: FakeEngine) -> AsyncIterator[str]:
    """The adapter listening on a free loopback port; its `host:port`."""
    settings = build_settings({"http": {"host": "127.0.0.1", "port": 0}, "limits": {"max_frame_bytes": 4096}})
    adapter = HttpAdapter(engine, settings)
    await adapter.start()
    try:
        yield f"127.0.0.1:{adapter.port}"
    finally:
        await adapter.stop()


async def _receive(ws: ClientConnection) -> Message:
    return message_from_dict(json.loads(await asyncio.wait_for(ws.recv(), WAIT_S)))


async def _until_done(ws: ClientConnection) -> list[Message]:
    messages: list[Message] = []
    while not isinstance(messages[-1:] and messages[-1], Done):
        messages.append(await _receive(ws))
    return messages


async def test_a_stream_gets_ready_partials_its_final_and_done(engine: FakeEngine, base_url: str) -> None:
    async with connect(f"ws://{base_url}/ws/stream?site=kitchen&prompt=Lights.") as ws:
        ready = await _receive(ws)
        assert ready == Ready(session=1, sample_rate=16000, language="en", max_frame_bytes=4096)
        for _ in range(3):
            await ws.send(bytes(640))
        await ws.send(json.dumps({"type": "end"}))
        messages = await _until_done(ws)

    assert messages == [
        Partial("w1", "", 1, 1, 1),
        Partial("w1 w2", "w1", 1, 1, 1),
        Partial("w1 w2 w3", "w1 w2", 1, 1, 1),
        Final("w1 w2 w3", 1, 1, 1, 1, 0.0, 0.06),
        Done(1),
    ]
    [session] = engine.sessions
    assert (session.site, session.prompt, len(session.fed)) == ("kitchen", "Lights.", 3 * 640)
    await asyncio.wait_for(session.gone.wait(), WAIT_S)


async def test_a_final_that_revises_stable_words_says_so(engine: FakeEngine, base_url: str) -> None:
    engine.revisions = {"w1": "wX"}
    async with connect(f"ws://{base_url}/ws/stream") as ws:
        await _receive(ws)
        for _ in range(2):
            await ws.send(bytes(640))
        await ws.send(json.dumps({"type": "end"}))
        messages = await _until_done(ws)

    assert messages[-2] == Final("wX w2", 1, 1, 1, 1, 0.0, 0.04, revised=True)


@pytest.mark.parametrize(
    ("refusal", "code", "close_code"),
    [
        (EngineBusy("all 8 sessions are in use"), "busy", 1013),
        (EngineNotReady("loading model"), "not_ready", 1013),
        (UnsupportedLanguage("language 'xx' is not one the model knows"), "unsupported_language", 1000),
    ],
)
async def test_a_refused_session_gets_the_code_from_the_one_table_and_a_close(
    engine: FakeEngine, base_url: str, refusal: EngineRefusal, code: str, close_code: int
) -> None:
    engine.refusal = refusal
    async with connect(f"ws://{base_url}/ws/stream") as ws:
        error = await _receive(ws)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT_S)

    assert error == SessionError(code, str(refusal))
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == close_code


async def test_an_unknown_language_is_unsupported_language_at_connect_and_in_a_config_message(
    base_url: str,
) -> None:
    async with connect(f"ws://{base_url}/ws/stream?language=fr") as ws:
        refused = await _receive(ws)
    async with connect(f"ws://{base_url}/ws/stream") as ws:
        await _receive(ws)
        await ws.send(json.dumps({"type": "config", "language": "fr"}))
        in_session = await _receive(ws)
        await ws.send(json.dumps({"type": "config", "language": "de-DE"}))
        await ws.send(bytes(640))
        await ws.send(json.dumps({"type": "end"}))
        rest = await _until_done(ws)

    assert isinstance(refused, SessionError)
    assert refused.code == "unsupported_language"
    assert isinstance(in_session, SessionError)
    assert in_session.code == "unsupported_language"
    assert rest[-2:] == [Final("w1", 1, 1, 1, 1, 0.0, 0.02), Done(1)]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x01\x02\x03", "bad_audio"),
        ("not json", "bad_json"),
        ('{"type": "shout"}', "unknown_message"),
        ('{"type": "config", "volume": 11}', "bad_config"),
        ('{"type": "config", "site": 7}', "bad_config"),
        ('{"type": "config", "site": "living room"}', "bad_config"),
        ('{"type": "config", "partials": "no"}', "bad_config"),
        ('{"type": "config", "partials": 0}', "bad_config"),
        ("[" * 33 + "]" * 33, "bad_json"),  # deeper than MAX_JSON_DEPTH
        ('{"type": "config", "prompt": ' * 2000, "bad_json"),  # deeper than the interpreter's stack
        ("1" * 5000, "bad_json"),  # more digits than Python converts
    ],
)
async def test_a_bad_frame_gets_its_error_and_loses_nothing_else(base_url: str, frame: str | bytes, code: str) -> None:
    async with connect(f"ws://{base_url}/ws/stream") as ws:
        await _receive(ws)
        await ws.send(bytes(640))
        await ws.send(frame)
        await ws.send(bytes(640))
        await ws.send(json.dumps({"type": "end"}))
        messages = await _until_done(ws)

    assert [m for m in messages if isinstance(m, SessionError)] == [messages[1]]
    assert isinstance(messages[1], SessionError)
    assert messages[1].code == code
    assert messages[-2:] == [Final("w1 w2", 1, 1, 1, 1, 0.0, 0.04), Done(1)]


async def test_a_frame_over_the_limit_closes_with_1009(base_url: str) -> None:
    async with connect(f"ws://{base_url}/ws/stream") as ws:
        await _receive(ws)
        await ws.send(bytes(4098))
        error = await _receive(ws)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT_S)

    assert isinstance(error, SessionError)
    assert error.code == "frame_too_large"
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


async def test_health_follows_the_engine_and_metrics_are_prometheus_text(engine: FakeEngine, base_url: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://{base_url}") as client:
        engine.ready = False
        loading = await client.get("/health")
        engine.ready = True
        ready = await client.get("/health")
        metrics = await client.get("/metrics")

    assert loading.status_code == 503
    assert loading.json()["status"] == "loading model"
    assert ready.status_code == 200
    assert ready.json()["languages"] == ["en", "de"]
    assert metrics.status_code == 200
    assert "edge_asr_sessions_active" in metrics.text


async def test_a_client_that_stops_reading_is_cut_off_and_its_session_freed(engine: FakeEngine) -> None:
    settings = build_settings({"http": {"host": "127.0.0.1", "port": 0}, "limits": {"send_timeout_s": 1.0}})
    engine.partial_padding = 64 * 1024
    adapter = HttpAdapter(engine, settings)
    await adapter.start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", adapter.port))
    try:
        async with connect(f"ws://127.0.0.1:{adapter.port}/ws/stream", sock=sock, max_queue=1, close_timeout=0.5) as ws:
            await _receive(ws)
            [session] = engine.sessions
            # Every frame makes the fake engine send 64 kB back (12 MB in all); the client reads none of it.
            with contextlib.suppress(ConnectionClosed):
                for _ in range(200):
                    await ws.send(bytes(640))
            await asyncio.wait_for(session.gone.wait(), WAIT_S)
            # The server must not wait for this client to take what it was sent: it resets the connection.
            reset = await _until_reset(sock, WAIT_S)
    finally:
        await adapter.stop()

    assert session.closed
    assert reset


async def _until_reset(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server resets this connection within `timeout_s` (while the client reads nothing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                return True
        except OSError:  # asyncio met the reset and closed the socket
            return True
        await asyncio.sleep(0.05)
    return False


async def test_an_invalid_site_is_bad_config_closing_at_connect_and_keeping_the_session_in_a_config_message(
    engine: FakeEngine, base_url: str
) -> None:
    async with connect(f"ws://{base_url}/ws/stream?site=living%20room") as ws:
        refused = await _receive(ws)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT_S)
    async with connect(f"ws://{base_url}/ws/stream?site=hall") as ws:
        await _receive(ws)
        await ws.send(json.dumps({"type": "config", "site": "hall/+/#", "prompt": "never applied"}))
        in_session = await _receive(ws)
        await ws.send(bytes(640))
        await _receive(ws)
        await ws.send(json.dumps({"type": "end"}))
        final = await _receive(ws)

    assert isinstance(refused, SessionError)
    assert refused.code == "bad_config"
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1000
    assert isinstance(in_session, SessionError)
    assert in_session.code == "bad_config"
    assert final == Final("w1", 1, 1, 1, 1, 0.0, 0.02)
    [session] = engine.sessions
    assert (session.site, session.prompt) == ("hall", "")


async def test_a_config_message_gives_the_session_its_vocabulary_and_a_bad_one_is_bad_config(
    engine: FakeEngine, base_url: str
) -> None:
    async with connect(f"ws://{base_url}/ws/stream") as ws:
        await _receive(ws)
        await ws.send(json.dumps({"type": "config", "vocabulary": ["Elowen", "Quillo fan"]}))
        await ws.send(json.dumps({"type": "config", "vocabulary": "Elowen"}))
        # A JSON escape can carry a lone surrogate, which no tokenizer or client can take.
        await ws.send(json.dumps({"type": "config", "vocabulary": ["Brannoc", "\ud800"]}))
        await ws.send(json.dumps({"type": "config", "prompt": "Lights \udcff"}))
        errors = [await _receive(ws) for _ in range(3)]
        await ws.send(bytes(640))
        await ws.send(json.dumps({"type": "end"}))
        await _until_done(ws)

    [session] = engine.sessions
    assert (session.vocabulary, session.prompt) == (("Elowen", "Quillo fan"), "")
    refusals = [error for error in errors if isinstance(error, SessionError) and error.code == "bad_config"]
    assert len(refusals) == 3, errors
    assert all("vocabulary" in refusal.message for refusal in refusals[:2]), refusals
    assert "prompt" in refusals[2].message


async def test_a_client_that_turns_partials_off_gets_none_and_the_session_is_told(
    engine: FakeEngine, base_url: str
) -> None:
    async with connect(f"ws://{base_url}/ws/stream") as ws:
        await _receive(ws)
        await ws.send(bytes(640))
        first = await _receive(ws)
        await ws.send(json.dumps({"type": "config", "partials": False}))
        await ws.send(bytes(640))
        await ws.send(bytes(640))
        await ws.send(json.dumps({"type": "end"}))
        rest = await _until_done(ws)

    assert first == Partial("w1", "", 1, 1, 1)
    assert rest == [Final("w1 w2 w3", 1, 1, 1, 1, 0.0, 0.06), Done(1)]
    [session] = engine.sessions
    assert not session.partials
