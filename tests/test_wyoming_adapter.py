"""The Wyoming adapter on a real socket against a fake engine, spoken to by the `wyoming` package's client:
describe, a streamed request, the refusal codes and bad audio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info

from adapters.wyoming import WyomingAdapter
from edge_asr.api import EngineBusy, EngineNotReady, EngineRefusal, UnsupportedLanguage
from edge_asr.config import build_settings

from .fakes import FakeEngine
from .server import free_port

pytestmark = pytest.mark.fast

WAIT_S = 5.0


@pytest.fixture
def engine() -> FakeEngine:
    """A fresh fake engine per test."""
    return FakeEngine()


@pytest.fixture
async def port(engine: FakeEngine) -> AsyncIterator[int]:
    """The adapter listening on a free loopback port."""
    port = free_port()
    adapter = WyomingAdapter(engine, build_settings({"wyoming": {"uri": f"tcp://127.0.0.1:{port}"}}))
    await adapter.start()
    try:
        yield port
    finally:
        await adapter.stop()


async def _read(client: AsyncTcpClient) -> Event:
    event = await asyncio.wait_for(client.read_event(), WAIT_S)
    assert event is not None, "the server closed the connection"
    return event


async def _request(client: AsyncTcpClient, chunks: list[bytes], language: str | None = "en") -> None:
    await client.write_event(Transcribe(language=language, context={"site": "hall"}).event())
    await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
    for chunk in chunks:
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=chunk).event())
    await client.write_event(AudioStop().event())


async def test_describe_names_the_engines_languages(port: int) -> None:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        info = Info.from_event(await _read(client))

    [program] = info.asr
    assert program.supports_transcript_streaming
    assert program.models[0].languages == ["en", "de"]


async def test_a_request_streams_committed_text_then_the_whole_transcript(engine: FakeEngine, port: int) -> None:
    async with AsyncTcpClient("127.0.0.1", port) as client:
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
    engine: FakeEngine, port: int
) -> None:
    engine.revisions = {"w2": "wX"}
    async with AsyncTcpClient("127.0.0.1", port) as client:
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
        (UnsupportedLanguage("language 'xx' is not one the model knows"), "unsupported_language"),
    ],
)
async def test_a_refused_request_gets_the_code_from_the_one_table(
    engine: FakeEngine, port: int, refusal: EngineRefusal, code: str
) -> None:
    engine.refusal = refusal
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await _request(client, [bytes(640)])
        error = Error.from_event(await _read(client))

    assert error.code == code
    assert error.text == str(refusal)


async def test_a_chunk_of_partial_samples_gets_bad_audio_and_the_request_goes_on(port: int) -> None:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await _request(client, [bytes(640), b"\x01\x02\x03", bytes(640)])
        events = [await _read(client)]
        while not TranscriptStop.is_type(events[-1].type):
            events.append(await _read(client))

    errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
    assert [e.code for e in errors] == ["bad_audio"]
    assert Transcript.from_event(events[-2]).text == "w1 w2"
