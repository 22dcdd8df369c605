"""A request whose session the engine aborts mid-way (its decode bookkeeping raised): the client gets the error at
once, and its `audio-stop` still gets `transcript` and `transcript-stop`, on the real engine and a real socket."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from wyoming.asr import Transcribe, Transcript, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event

from edge_asr.audio import FloatAudio
from edge_asr.config import build_settings
from edge_asr.engine import Engine
from edge_asr.transcript import Transcript as Decoded
from edge_asr.transcript import Word
from edge_asr.vocabulary import NamesInPrompt

from .fakes import ScriptedTranscriber
from .speech import read_pcm
from .wyoming_client import serving

pytestmark = pytest.mark.fast

WAIT_S = 10.0
CHUNK_BYTES = 3200


class UntakeableTranscriber(ScriptedTranscriber):
    """Answers every decode with a word the session cannot take, so that taking the decode raises and the
    scheduler aborts the session."""

    def decode(
        self,
        audio: FloatAudio,
        prompt: str,
        language: str,
        whole: bool = False,
        names: NamesInPrompt | None = None,
        judge_end: bool = False,
    ) -> Decoded:
        """A transcript whose one word is not a word."""
        return Decoded((cast(Word, None),), 5.0)


async def _read(client: AsyncTcpClient) -> Event:
    event = await asyncio.wait_for(client.read_event(), WAIT_S)
    assert event is not None, "the server closed the connection"
    return event


async def test_an_aborted_session_still_answers_audio_stop_with_a_transcript() -> None:
    engine = Engine(build_settings({"model": {"threads": 1, "workers": 1}}), UntakeableTranscriber)
    await engine.start()
    try:
        async with serving(engine) as port, AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Transcribe(language="en").event())
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            assert TranscriptStart.is_type((await _read(client)).type)
            # The silence after the command starts its whole decode (nothing reads partials: none is decoded).
            pcm = read_pcm("asterisk_conf-onlyone") + bytes(16_000)
            for offset in range(0, len(pcm), CHUNK_BYTES):
                chunk = pcm[offset : offset + CHUNK_BYTES]
                await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=chunk).event())
            error = await _read(client)
            assert Error.is_type(error.type)
            assert Error.from_event(error).code == "internal_error"

            await client.write_event(AudioStop().event())
            transcript = await _read(client)
            assert Transcript.is_type(transcript.type), transcript.type
            assert Transcript.from_event(transcript).text == ""
            assert TranscriptStop.is_type((await _read(client)).type)

            # The connection goes on: a next request (without audio, so nothing to decode) is answered as usual.
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            await client.write_event(AudioStop().event())
            answer = [(await _read(client)).type for _ in range(3)]
            assert answer == ["transcript-start", "transcript", "transcript-stop"]
        assert engine.health().sessions == 0
    finally:
        await engine.stop()
