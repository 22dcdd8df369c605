"""The Wyoming adapter on a real socket against a fake engine, spoken to by the `wyoming` package's client and
by raw bytes: describe, a streamed request, refusals, malformed input, audio conversion, vanishing and slow
clients."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info

from edge_asr.api import (
    EngineBusy,
    EngineNotReady,
    EngineRefusal,
    EngineShuttingDown,
    InvalidSite,
    UnsupportedLanguage,
)
from edge_asr.events import Event as SessionEvent
from edge_asr.events import Final, Partial, SessionInfo

from .fakes import FakeEngine
from .wyoming_client import assert_no_tracebacks, async_exchange, serving, wire_event

pytestmark = pytest.mark.fast

WAIT_S = 5.0
# A send timeout short enough for a test (the setting's lowest is 0.5 s).
SEND_TIMEOUT_S = 1.0
# Describe events a client that never reads sends: their answers far exceed any socket buffer.
DESCRIBES = 20_000
# A small receive buffer for that client, so that the server's writes stall soon.
SMALL_RCVBUF = 4096
START = wire_event("audio-start", {"rate": 16000, "width": 2, "channels": 1})
DESCRIBE = wire_event("describe")


@pytest.fixture
def engine() -> FakeEngine:
    """A fresh fake engine per test."""
    return FakeEngine()


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test checks at its end that nothing reached the log at WARNING or above."""
    caplog.set_level(logging.DEBUG)
    yield
    assert_no_tracebacks(caplog.get_records("setup") + caplog.get_records("call"))


@pytest.fixture
async def port(engine: FakeEngine) -> AsyncIterator[int]:
    """The adapter listening on a free loopback port."""
    async with serving(engine) as port:
        yield port


async def _read(client: AsyncTcpClient) -> Event:
    event = await asyncio.wait_for(client.read_event(), WAIT_S)
    assert event is not None, "the server closed the connection"
    return event


async def _until_stop(client: AsyncTcpClient) -> list[Event]:
    """A request's answer: events up to transcript-stop."""
    events = [await _read(client)]
    while not TranscriptStop.is_type(events[-1].type):
        events.append(await _read(client))
    return events


async def _served(port: int) -> str:
    """The transcript of a normal request on a new connection."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await _request(client, [bytes(640)] * 2)
        return Transcript.from_event((await _until_stop(client))[-2]).text


async def _request(client: AsyncTcpClient, chunks: list[bytes], language: str | None = "en") -> None:
    await client.write_event(Transcribe(language=language, context={"site": "hall"}).event())
    await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
    for chunk in chunks:
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=chunk).event())
    await client.write_event(AudioStop().event())


@pytest.fixture
async def chunks_port(engine: FakeEngine) -> AsyncIterator[int]:
    """The adapter with wyoming.transcript_chunks on, on a free loopback port."""
    async with serving(engine, {"transcript_chunks": True}) as port:
        yield port


async def _describe(port: int) -> Info:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        return Info.from_event(await _read(client))


async def test_describe_names_the_engines_languages_and_streams_only_with_chunks(port: int, chunks_port: int) -> None:
    [program] = (await _describe(port)).asr
    assert not program.supports_transcript_streaming
    assert program.models[0].languages == ["en", "de"]
    [streaming] = (await _describe(chunks_port)).asr
    assert streaming.supports_transcript_streaming


async def test_without_chunks_a_request_reads_no_partials_and_gets_only_its_transcript(
    engine: FakeEngine, port: int
) -> None:
    heard: list[SessionEvent] = []
    engine.add_listener(lambda info, event: heard.append(event), reads_partials=True)
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await _request(client, [bytes(640)] * 3)
        events = await _until_stop(client)

    assert [e.type for e in events] == ["transcript-start", "transcript", "transcript-stop"]
    assert Transcript.from_event(events[1]).text == "w1 w2 w3"
    [session] = engine.sessions
    assert not session.partials, "the session was told that its client reads no partials"
    assert sum(isinstance(event, Partial) for event in heard) == 3, "a listener that reads partials still gets them"


async def test_a_request_streams_committed_text_then_the_whole_transcript(engine: FakeEngine, chunks_port: int) -> None:
    async with AsyncTcpClient("127.0.0.1", chunks_port) as client:
        await _request(client, [bytes(640)] * 3, language="de")
        events = [await _read(client)]
        while not TranscriptStop.is_type(events[-1].type):
            events.append(await _read(client))

    assert TranscriptStart.from_event(events[0]).language == "de"
    chunks = [TranscriptChunk.from_event(e).text for e in events if TranscriptChunk.is_type(e.type)]
    transcript = Transcript.from_event(events[-2])
    assert transcript.text == "w1 w2 w3"
    assert "".join(chunks) == "w1 w2 w3"
    assert len(chunks) > 1, "committed text streams as it grows"
    [session] = engine.sessions
    assert session.site == "hall"
    assert session.closed


async def test_a_final_that_revises_sent_chunks_still_gives_the_corrected_transcript(
    engine: FakeEngine, chunks_port: int
) -> None:
    engine.revisions = {"w2": "wX"}
    async with AsyncTcpClient("127.0.0.1", chunks_port) as client:
        await _request(client, [bytes(640)] * 3)
        events = [await _read(client)]
        while not TranscriptStop.is_type(events[-1].type):
            events.append(await _read(client))

    chunks = [TranscriptChunk.from_event(e).text for e in events if TranscriptChunk.is_type(e.type)]
    assert "".join(chunks) == "w1 w2", "the chunks stop where the final stopped extending them"
    assert Transcript.from_event(events[-2]).text == "w1 wX w3"


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (EngineBusy("all 8 sessions are in use"), "busy"),
        (EngineNotReady("loading model"), "not_ready"),
        (EngineShuttingDown("the service is stopping"), "shutting_down"),
        (UnsupportedLanguage("language 'de' is not one the model knows"), "unsupported_language"),
        (InvalidSite("site 'hall' is not one of sites.allowed"), "bad_config"),
    ],
)
async def test_a_refused_request_still_gets_an_empty_transcript_at_audio_stop(
    engine: FakeEngine, port: int, refusal: EngineRefusal, code: str
) -> None:
    engine.refusal = refusal
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await _request(client, [bytes(640)] * 3, language="de")
        refused = await _until_stop(client)
        engine.refusal = None
        await _request(client, [bytes(640)])
        served = await _until_stop(client)

    assert [e.type for e in refused] == ["error", "transcript", "transcript-stop"]
    error = Error.from_event(refused[0])
    assert (error.code, error.text) == (code, str(refusal))
    transcript = Transcript.from_event(refused[1])
    assert (transcript.text, transcript.language) == ("", "de")
    assert Transcript.from_event(served[-2]).text == "w1", "the next request on the connection is served"


async def test_a_site_the_engine_refuses_gets_bad_config_and_an_empty_transcript() -> None:
    engine = FakeEngine(check_sites=True)
    async with serving(engine) as port, AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en", context={"site": "living room"}).event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=bytes(640)).event())
        await client.write_event(AudioStop().event())
        refused = await _until_stop(client)
        await _request(client, [bytes(640)])
        served = await _until_stop(client)

    assert [e.type for e in refused] == ["error", "transcript", "transcript-stop"]
    assert Error.from_event(refused[0]).code == "bad_config"
    assert Transcript.from_event(refused[1]).text == ""
    assert Transcript.from_event(served[-2]).text == "w1", "the next request, from a valid site, is served"
    assert [session.site for session in engine.sessions] == ["hall"]


async def test_an_audio_format_refused_at_audio_start_still_gets_an_empty_transcript(
    engine: FakeEngine, port: int
) -> None:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16000, width=3, channels=1).event())
        await client.write_event(AudioChunk(rate=16000, width=3, channels=1, audio=bytes(960)).event())
        await client.write_event(AudioStop().event())
        events = await _until_stop(client)

    assert [e.type for e in events] == ["error", "transcript", "transcript-stop"]
    assert Error.from_event(events[0]).code == "bad_event"
    assert Transcript.from_event(events[1]).text == ""
    assert not engine.sessions


async def test_a_chunk_of_partial_samples_gets_bad_audio_and_the_request_goes_on(port: int) -> None:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await _request(client, [bytes(640), b"\x01\x02\x03", bytes(640)])
        events = [await _read(client)]
        while not TranscriptStop.is_type(events[-1].type):
            events.append(await _read(client))

    errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
    assert [e.code for e in errors] == ["bad_audio"]
    assert Transcript.from_event(events[-2]).text == "w1 w2"


def _line(header: object) -> bytes:
    """A header line built by hand."""
    return json.dumps(header).encode() + b"\n"


def _nested(depth: int) -> Any:
    """JSON arrays `depth` levels deep."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _transcribe(data: object) -> bytes:
    """A transcribe event whose data comes in the data block (as the wyoming package writes it)."""
    block = json.dumps(data).encode()
    return _line({"type": "transcribe", "data_length": len(block)}) + block


def _chunk(rate: object = 16000, width: object = 2, channels: object = 1, audio: bytes = bytes(64)) -> bytes:
    """An audio-chunk built by hand, so that its format fields can be wrong."""
    return wire_event("audio-chunk", {"rate": rate, "width": width, "channels": channels}, audio)


@pytest.mark.parametrize(
    ("data", "code", "closes"),
    [
        (b"this is not json\n", "bad_json", True),
        (b"\xff\xfe\n", "bad_json", True),
        (_line(["a", "list"]), "bad_header", True),
        (_line({"type": 5}), "bad_header", True),
        (_line({"type": "transcribe", "data": None}), "bad_header", True),
        (_line({"type": "transcribe", "data": [1]}), "bad_header", True),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", "bad_header", True),
        (b"[" * 5_000 + b"]" * 5_000 + b"\n", "bad_header", True),
        (_line({"type": "transcribe", "data": {"context": {"deep": _nested(40)}}}), "bad_header", True),
        (_line({"type": "audio-chunk", "data": {}, "payload_length": -3}), "bad_header", True),
        (_line({"type": "transcribe", "data_length": True}), "bad_header", True),
        (_line({"type": "transcribe", "data_length": 4}) + b"null", "bad_data", True),
        (_line({"type": "transcribe", "data_length": 5}) + b"[1,2]", "bad_data", True),
        (_line({"type": "transcribe", "data_length": 2}) + b"42", "bad_data", True),
        (_line({"type": "transcribe", "data_length": 5}) + b"{oops", "bad_data", True),
        (_transcribe({"deep": _nested(40)}), "bad_data", True),
        (_line({"type": "audio-chunk", "data": {}, "payload_length": 10**9}), "too_large", True),
        (_line({"type": "audio-chunk", "data": {}, "payload_length": 1000}) + bytes(10), "read_timeout", True),
        (_transcribe({"language": "en", "context": "kitchen"}), "bad_event", False),
        (_transcribe({"language": 5}), "bad_event", False),
        (_transcribe({"language": "\ud800"}), "bad_event", False),
        (_transcribe({"transcript_names": ["Elowen", "\ud800"]}), "bad_event", False),
        (_transcribe({"transcript_terms": ["\udcff fan"]}), "bad_event", False),
        (_transcribe({"context": {"site": ["hall"]}}), "bad_event", False),
        (wire_event("ping", {"text": {}}), "bad_event", False),
        (wire_event("audio-start", {"rate": 0, "width": 2, "channels": 1}), "bad_event", False),
        (wire_event("audio-start", {"rate": "16000", "width": 2, "channels": 1}), "bad_event", False),
        (wire_event("audio-start", {"rate": 16000, "width": 3, "channels": 1}), "bad_event", False),
        (wire_event("audio-start", {"rate": 16000, "width": True, "channels": 1}), "bad_event", False),
        (wire_event("audio-start", {"rate": 16000, "width": 2, "channels": 0}), "bad_event", False),
        (wire_event("audio-start", {"rate": 16000, "width": 2}), "bad_event", False),
        (START + _chunk(rate=-1), "bad_event", False),
        (START + _chunk(width=None), "bad_event", False),
        (START + _chunk(channels=3, audio=bytes(7)), "bad_audio", False),
        (_chunk(), "no_audio_start", False),
        (wire_event("audio-stop"), "no_audio_start", False),
        (wire_event("what-is-this"), "unknown_event", False),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "header-list",
        "type-not-string",
        "data-null",
        "data-list",
        "nested-100000",
        "nested-5000",
        "nested-40-in-data",
        "negative-length",
        "bool-length",
        "block-null",
        "block-list",
        "block-number",
        "block-not-json",
        "block-nested-40",
        "oversized",
        "short-payload",
        "context-not-object",
        "language-not-string",
        "language-lone-surrogate",
        "names-lone-surrogate",
        "terms-lone-surrogate",
        "site-not-string",
        "ping-text-not-string",
        "rate-zero",
        "rate-string",
        "width-3",
        "width-bool",
        "channels-zero",
        "start-no-channels",
        "chunk-rate-negative",
        "chunk-width-null",
        "chunk-partial-frames",
        "chunk-first",
        "stop-first",
        "unknown",
    ],
)
async def test_malformed_input_gets_its_error_code_and_never_a_traceback(
    port: int, caplog: pytest.LogCaptureFixture, data: bytes, code: str, closes: bool
) -> None:
    events, closed = await async_exchange(port, data + DESCRIBE, timeout_s=WAIT_S)

    assert [Error.from_event(e).code for e in events if Error.is_type(e.type)] == [code]
    assert closed is closes, "framing faults close the connection; the others are answered by describe"
    assert await _served(port) == "w1 w2", "the server keeps serving"
    assert_no_tracebacks(caplog.records)


async def test_an_unforeseen_failure_ends_only_its_connection_and_logs_no_input(
    engine: FakeEngine, port: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the secret words")

    monkeypatch.setattr(engine, "session", explode)
    events, closed = await async_exchange(port, _transcribe({"language": "en"}) + START + DESCRIBE)
    monkeypatch.undo()

    assert (events, closed) == ([], True)
    assert "RuntimeError" in caplog.text
    assert "secret" not in caplog.text
    assert await _served(port) == "w1 w2"


async def test_channels_are_averaged_and_each_chunk_is_taken_in_its_own_format(engine: FakeEngine, port: int) -> None:
    three = np.tile(np.array([300, 600, 0], dtype="<i2"), 160).tobytes()  # 10 ms of 3 channels, one silent
    unsigned = bytes([128 + 10]) * 80  # 10 ms of 8-bit 8 kHz: unsigned, 10 steps of 256 above the centre
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=16000, width=2, channels=3, audio=three).event())
        await client.write_event(AudioChunk(rate=8000, width=1, channels=1, audio=unsigned).event())
        await client.write_event(AudioStop().event())
        events = await _until_stop(client)

    assert not [e for e in events if Error.is_type(e.type)]
    [session] = engine.sessions
    fed = np.frombuffer(bytes(session.fed), dtype="<i2")
    assert list(fed[:160]) == [300] * 160
    assert abs(len(fed) - 320) <= 1
    assert set(fed[161:].tolist()) == {2560}


async def test_a_chunk_that_would_convert_beyond_the_limit_is_refused(engine: FakeEngine) -> None:
    frame_limit = 320  # the setting's lowest; converted chunks may be 32 times that
    async with serving(engine, max_frame_bytes=frame_limit) as port, AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=1000, width=1, channels=1).event())
        for size in (frame_limit, frame_limit - 1):  # 16 outputs of 2 bytes per 8-bit 1 kHz sample
            await client.write_event(AudioChunk(rate=1000, width=1, channels=1, audio=bytes(size)).event())
        await client.write_event(AudioStop().event())
        events = await _until_stop(client)

    assert [Error.from_event(e).code for e in events if Error.is_type(e.type)] == ["too_large"]
    [session] = engine.sessions
    assert len(session.fed) == 2 * (16 * (frame_limit - 2) + 1), "only the smaller chunk was fed"


async def test_a_client_that_vanishes_mid_request_has_its_utterance_finished_for_the_listeners(
    engine: FakeEngine, port: int
) -> None:
    finals: list[str] = []

    def listen(info: SessionInfo, event: SessionEvent) -> None:
        if isinstance(event, Final):
            finals.append(event.text)

    engine.add_listener(listen, reads_partials=False)
    fed = _partials_heard(engine, 3)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_transcribe({"language": "en"}) + START + _chunk() * 3)
    await asyncio.wait_for(fed.wait(), WAIT_S)
    writer.close()
    [session] = engine.sessions
    await asyncio.wait_for(session.gone.wait(), WAIT_S)

    assert session.finished
    assert session.closed
    # A closed fake emits nothing: the final reached the listeners before the session was freed.
    assert finals == ["w1 w2 w3"]


def _partials_heard(engine: FakeEngine, count: int) -> asyncio.Event:
    """Set once the engine's sessions emitted `count` partials (the fake emits one per chunk fed)."""
    heard = asyncio.Event()
    partials = 0

    def listen(info: SessionInfo, event: SessionEvent) -> None:
        nonlocal partials
        partials += isinstance(event, Partial)
        if partials >= count:
            heard.set()

    engine.add_listener(listen, reads_partials=True)
    return heard


async def test_a_client_that_does_not_read_is_cut_off_after_the_send_timeout(
    engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    fed = _partials_heard(engine, 1)
    async with serving(engine, send_timeout_s=SEND_TIMEOUT_S) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
        sock.connect(("127.0.0.1", port))
        _reader, writer = await asyncio.open_connection(sock=sock)
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # not even into this process: the server's writes stall
        started = time.monotonic()
        writer.write(_transcribe({"language": "en"}) + START + _chunk() + DESCRIBE * DESCRIBES)
        await asyncio.wait_for(fed.wait(), WAIT_S)
        [session] = engine.sessions
        await asyncio.wait_for(session.gone.wait(), SEND_TIMEOUT_S + WAIT_S)
        cut_after = time.monotonic() - started
        transport.abort()

    assert cut_after >= SEND_TIMEOUT_S
    assert session.closed
    assert "cut off" in caplog.text
    assert_no_tracebacks(caplog.records)


async def test_transcript_names_and_terms_reach_the_session_in_that_order(engine: FakeEngine, port: int) -> None:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(
            Transcribe(language="en", transcript_names=["Elowen", "Brannoc"], transcript_terms=["Quillo fan"]).event()
        )
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioStop().event())
        events = [await _read(client)]
        while not TranscriptStop.is_type(events[-1].type):
            events.append(await _read(client))

    [session] = engine.sessions
    assert session.vocabulary == ("Elowen", "Brannoc", "Quillo fan")


@pytest.mark.parametrize("names", [["Elowen", 7], "Elowen", [["nested"]], ["x" * 101], ["n"] * 201])
async def test_malformed_transcript_names_are_a_bad_event(port: int, names: object) -> None:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Event(type="transcribe", data={"transcript_names": names}))
        error = Error.from_event(await _read(client))

    assert error.code == "bad_event"
    assert "transcript_names" in (error.text or "")


async def test_the_slot_is_free_when_the_satellite_learns_its_request_is_over(engine: FakeEngine, port: int) -> None:
    engine.max_open_sessions = 1
    for _ in range(3):  # one request after the other, as fast as a satellite can ask
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await _request(client, [bytes(640)])
            events = [await _read(client)]
            while not TranscriptStop.is_type(events[-1].type):
                events.append(await _read(client))
        assert not [e for e in events if Error.is_type(e.type)]
