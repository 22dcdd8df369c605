"""The engine: admission, scheduling and finishing, on the real model and on a scripted one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from edge_asr.api import AudioFormatError, EngineBusy, EngineNotReady, SessionRequest
from edge_asr.config import Settings, build_settings
from edge_asr.engine import Engine
from edge_asr.events import Done, Event, Final, SessionError

from .fakes import ScriptedTranscriber
from .speech import normalise, read_pcm, reference


def _settings(**limits: int) -> Settings:
    return build_settings({"model": {"threads": 1, "workers": 1}, "limits": dict(limits)})


async def _drain(events: list[Event], stream: AsyncIterator[Event]) -> None:
    async for event in stream:
        events.append(event)


async def test_sessions_are_refused_until_the_model_is_ready_and_above_the_limit() -> None:
    engine = Engine(_settings(max_sessions=1), ScriptedTranscriber)
    with pytest.raises(EngineNotReady):
        engine.session(SessionRequest("test"))
    await engine.start()
    try:
        async with engine.session(SessionRequest("test")):
            with pytest.raises(EngineBusy):
                engine.session(SessionRequest("test"))
            assert engine.health().sessions == 1
        async with engine.session(SessionRequest("test")):
            assert engine.health().sessions == 1
        assert engine.health().sessions == 0
    finally:
        await engine.stop()


async def test_odd_byte_counts_are_refused_whole() -> None:
    engine = Engine(_settings(), ScriptedTranscriber)
    await engine.start()
    try:
        async with engine.session(SessionRequest("test")) as session:
            with pytest.raises(AudioFormatError):
                session.feed(b"\x00\x01\x02")
            assert session.audio_s == 0
    finally:
        await engine.stop()


async def test_a_session_never_has_more_than_a_partial_and_a_whole_decode_at_once_and_finals_come_out() -> None:
    transcriber = ScriptedTranscriber(delay_s=0.05)
    engine = Engine(build_settings({"model": {"threads": 1, "workers": 3}}), lambda: transcriber)
    await engine.start()
    try:
        async with engine.session(SessionRequest("test")) as session:
            events: list[Event] = []
            reader = asyncio.create_task(_drain(events, session.events()))
            pcm = read_pcm("asterisk_conf-onlyone")
            for offset in range(0, len(pcm), 3200):
                session.feed(pcm[offset : offset + 3200])
                await asyncio.sleep(0.01)
            final = await session.finish()
            session.close()
            await reader
        assert transcriber.max_concurrent <= 2
        assert isinstance(final, Final)
        assert "word" in final.text
        assert isinstance(events[-1], Done)
    finally:
        await engine.stop()


async def test_a_failing_decode_is_reported_and_the_engine_keeps_serving() -> None:
    transcriber = ScriptedTranscriber(fail=True)
    engine = Engine(_settings(), lambda: transcriber)
    await engine.start()
    try:
        async with engine.session(SessionRequest("test")) as session:
            events: list[Event] = []
            reader = asyncio.create_task(_drain(events, session.events()))
            session.feed(read_pcm("cmd_piper_joe_01"))
            await session.finish()
            session.close()
            await reader
        assert any(isinstance(e, SessionError) and e.code == "decode_failed" for e in events)
        transcriber.fail = False
        async with engine.session(SessionRequest("test")) as session:
            session.feed(read_pcm("cmd_piper_joe_01"))
            assert await session.finish() is not None
    finally:
        await engine.stop()


async def test_the_real_model_finishes_audio_fed_faster_than_real_time() -> None:
    engine = Engine(_settings())
    await engine.start()
    try:
        assert engine.health().ready
        assert engine.health().languages == ("en",)
        async with engine.session(SessionRequest("test")) as session:
            session.feed(read_pcm("asterisk_conf-onlyone"))
            final = await session.finish()
            assert final is not None
            assert normalise(final.text) == normalise(reference("asterisk_conf-onlyone"))
        async with engine.session(SessionRequest("test")) as session:
            session.feed(read_pcm("silence_3s"))
            assert await session.finish() is None
    finally:
        await engine.stop()


async def test_a_client_that_asks_for_answers_faster_than_it_reads_them_gets_no_room_until_it_reads() -> None:
    engine = Engine(_settings(max_queued_events=8), ScriptedTranscriber)
    await engine.start()
    try:
        async with engine.session(SessionRequest("test")) as session:
            for _ in range(8):
                await asyncio.wait_for(session.room(), 1.0)
                await session.finish()  # nothing said: its answer is a `Done`, which is never dropped
            waiting = asyncio.create_task(session.room())
            # One pass of the loop, not a time: room() runs up to where it waits, or to its end when it does not.
            await asyncio.sleep(0)
            held = not waiting.done()
            events = session.events()
            taken = await anext(events)
            await asyncio.wait_for(waiting, 1.0)
        assert held, "room() must wait while the client's events fill the queue"
        assert isinstance(taken, Done)
    finally:
        await engine.stop()


async def test_an_event_the_writer_took_counts_as_undelivered_until_it_asks_for_the_next() -> None:
    engine = Engine(_settings(), ScriptedTranscriber)
    await engine.start()
    try:
        async with engine.session(SessionRequest("test")) as session:
            events = session.events()
            session.report_error("bad_json", "one")
            taken = await anext(events)
            sending = not await engine.delivered(0.05)  # a shutdown must not close the socket under this send
            asking: asyncio.Future[Event] = asyncio.ensure_future(anext(events))
            sent = await engine.delivered(1.0)
            session.close()
            with pytest.raises(StopAsyncIteration):  # the stream ends at close
                await asking
        assert isinstance(taken, SessionError)
        assert sending, "delivered() must wait while the writer is still sending the event it took"
        assert sent, "asking for the next event means the one before was sent"
    finally:
        await engine.stop()
