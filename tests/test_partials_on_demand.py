"""Partials on demand: a session decodes partials only while its client or a listener reads them; without a reader
it decodes what its finals need and nothing more, and loses no word of them."""

from __future__ import annotations

import asyncio

import pytest

from edge_asr.api import SessionRequest
from edge_asr.config import LimitSettings, StreamSettings, build_settings
from edge_asr.decode_policy import WHOLE_DECODE_MAX_S
from edge_asr.engine import Engine
from edge_asr.events import Event, Final, Partial, SessionInfo
from edge_asr.session import StreamSession
from edge_asr.vad import VadGate

from .fakes import ScriptedTranscriber
from .test_session import Audio, Driver

pytestmark = pytest.mark.fast

WAIT_S = 10.0


def _driver(
    audio: Audio, *, partials: bool, split_on_silence: bool = True, limits: LimitSettings | None = None
) -> Driver:
    stream = StreamSettings()
    session = StreamSession(stream, limits or LimitSettings(), split_on_silence=split_on_silence, partials=partials)
    return Driver(session, audio.script, stream.final_silence_ms / 1000, VadGate.of(stream).final_tail_s)


def _commands(*names: str) -> Audio:
    audio = Audio().pause(0.3)
    for name in names:
        audio.say(name).pause(0.2)
    return audio.pause(1.0)


def test_without_a_reader_only_whole_decodes_run_and_the_finals_are_the_same() -> None:
    audio = _commands("cmd_piper_joe_03", "cmd_piper_joe_05", "cmd_piper_joe_07")
    reading = _driver(audio, partials=True)
    reading.feed(audio.pcm)
    silent = _driver(audio, partials=False)
    silent.feed(audio.pcm)

    assert any(not request.final for request in reading.requests), "a reader gets partial decodes"
    assert silent.requests, "the finals were decoded"
    assert all(request.final for request in silent.requests)
    assert not silent.partials()
    assert len(silent.requests) < len(reading.requests)
    assert [final.text for final in silent.finals()] == [final.text for final in reading.finals()]
    assert " ".join(final.text for final in silent.finals()).split() == " ".join(audio.texts).split()


def test_a_reader_that_comes_mid_utterance_gets_partials_from_then_on() -> None:
    audio = _commands("cmd_piper_joe_03", "cmd_piper_joe_05")
    driver = _driver(audio, partials=False, split_on_silence=False)
    half = len(audio.pcm) // 2 // 640 * 640
    driver.feed(audio.pcm[:half])
    assert all(request.final for request in driver.requests)
    decoded = len(driver.requests)

    driver.session.set_partials(True)
    driver.feed(audio.pcm[half:])
    driver.end()

    assert any(not request.final for request in driver.requests[decoded:])
    assert driver.partials()
    [final] = driver.finals()
    assert final.text.split() == " ".join(audio.texts).split()


def test_without_a_reader_an_utterance_longer_than_whispers_window_still_loses_no_word() -> None:
    audio = Audio().pause(0.3)
    while audio.seconds < WHOLE_DECODE_MAX_S + 8:
        audio.say(f"cmd_piper_joe_{len(audio.texts) % 20 + 1:02d}")
    audio.pause(1.0)
    driver = _driver(audio, partials=False, split_on_silence=False, limits=LimitSettings(max_utterance_s=60.0))
    driver.feed(audio.pcm)
    driver.end()

    partial_decodes = [request for request in driver.requests if not request.final]
    assert partial_decodes, "past Whisper's window the final needs the words partial decodes commit"
    assert min(r.end_s - r.utterance_start_s for r in partial_decodes) > WHOLE_DECODE_MAX_S
    assert not driver.partials()
    [final] = driver.finals()
    assert final.text.split() == " ".join(audio.texts).split()


async def test_the_engine_decodes_partials_for_a_listener_but_gives_the_client_only_what_it_reads() -> None:
    engine = Engine(build_settings({"model": {"threads": 1, "workers": 1}}), ScriptedTranscriber)
    heard: list[Event] = []

    def listen(info: SessionInfo, event: Event) -> None:
        heard.append(event)

    engine.add_listener(listen, reads_partials=True)
    await engine.start()
    try:
        async with engine.session(
            SessionRequest(source="websocket", split_on_silence=False, partials=False)
        ) as session:
            audio = _commands("cmd_piper_joe_03", "cmd_piper_joe_05")
            for offset in range(0, len(audio.pcm), 3200):
                session.feed(audio.pcm[offset : offset + 3200])
                await asyncio.sleep(0.01)
            final = await asyncio.wait_for(session.finish(), WAIT_S)
            session.close()
            received = [event async for event in session.events()]
    finally:
        await engine.stop()

    assert final is not None
    assert any(isinstance(event, Partial) for event in heard), "the listener reads partials: they were decoded"
    assert not any(isinstance(event, Partial) for event in received), "the client reads none"
    assert [event for event in received if isinstance(event, Final)] == [final]
