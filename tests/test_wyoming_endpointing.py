"""The service ends a Wyoming request's command itself: the real service and model, satellites on real sockets that
send no audio-stop (as Home Assistant does with a program that needs no external VAD)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from wyoming.asr import Transcribe, Transcript, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event

from edge_asr.bench.pacing import CHUNK_S, Replay, send_audio
from edge_asr.bench.processes import Service
from edge_asr.config import StreamSettings
from edge_asr.vad import VadGate

from .server import start_service
from .speech import normalise, read_pcm, reference, silence
from .wyoming_client import describe

# The service's endpointing for this module, whatever the defaults become: the assertions are worked out from these.
COMPLETE_S, UNFINISHED_S, NO_SPEECH_S, MAX_COMMAND_S = 0.3, 1.0, 2.0, 6.0
ENDPOINTING = (
    f"endpointing.complete_silence_ms={round(COMPLETE_S * 1000)}",
    f"endpointing.unfinished_silence_ms={round(UNFINISHED_S * 1000)}",
    f"endpointing.no_speech_s={NO_SPEECH_S}",
    f"endpointing.max_command_s={MAX_COMMAND_S}",
)
COMMAND = "cmd_piper_joe_05"  # "open the garage door"
# How long a satellite reads after its audio for anything more the service sends.
LINGER_S = 1.0
# A chunk's length, and a little, of slack between the satellite's clock and what the service has been sent.
AHEAD_S = CHUNK_S + 0.005


@dataclass
class Request:
    """What one request's satellite got: every event, and when it sent the audio and got the transcript."""

    events: list[Event]
    transcript_after_s: float | None  # after the start of the audio, in real time

    @property
    def transcripts(self) -> list[str]:
        """The texts of its `transcript` events."""
        return [Transcript.from_event(event).text for event in self.events if Transcript.is_type(event.type)]

    @property
    def stops(self) -> int:
        """Its `transcript-stop` events."""
        return sum(TranscriptStop.is_type(event.type) for event in self.events)

    @property
    def errors(self) -> list[str]:
        """The codes of its error events."""
        return [str(Error.from_event(event).code) for event in self.events if Error.is_type(event.type)]


@pytest.fixture(scope="module")
def endpointing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service that ends commands itself (the default), with this module's endpointing."""
    service = start_service(tmp_path_factory.mktemp("endpointing"), *ENDPOINTING)
    yield service
    service.stop()


async def _send(client: AsyncTcpClient, pcm: bytes) -> None:
    """Audio in 20 ms chunks at the pace it is spoken."""

    async def chunk(audio: bytes) -> None:
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=audio).event())

    await send_audio(pcm, Replay(realtime=True, trailing_silence_s=0.0), chunk)


async def _request(
    client: AsyncTcpClient, pcm: bytes, *, sensitivity: str | None = None, stop: bool = False
) -> Request:
    """One request on an open connection: transcribe, audio-start, the audio in real time (and audio-stop if
    `stop`); every event read until `LINGER_S` after the audio went quiet."""
    await client.write_event(Transcribe(language="en", vad_sensitivity=sensitivity).event())
    await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
    started = time.monotonic()
    events: list[Event] = []
    transcript_after_s: float | None = None

    async def read() -> None:
        nonlocal transcript_after_s
        while (event := await client.read_event()) is not None:
            events.append(event)
            if Transcript.is_type(event.type) and transcript_after_s is None:
                transcript_after_s = time.monotonic() - started

    reader = asyncio.create_task(read())
    await _send(client, pcm)
    if stop:
        await client.write_event(AudioStop().event())
    await asyncio.sleep(LINGER_S)
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    return Request(events, transcript_after_s)


def satellite(service: Service, pcm: bytes, *, sensitivity: str | None = None, stop: bool = False) -> Request:
    """One request on a connection of its own."""

    async def run() -> Request:
        async with AsyncTcpClient("127.0.0.1", service.wyoming_port) as client:
            return await _request(client, pcm, sensitivity=sensitivity, stop=stop)

    return asyncio.run(run())


def voice_end_s(pcm: bytes) -> float:
    """Where the service's VAD puts the end of the last voiced frame of pcm."""
    gate = VadGate.of(StreamSettings(), ends_commands=True)
    gate.push(pcm)
    return gate.last_voice_end_s


def test_describe_says_no_external_vad_is_needed(endpointing: Service) -> None:
    [program] = describe(endpointing.wyoming_port).asr
    assert program.requires_external_vad is False


def test_a_command_gets_one_transcript_soon_after_it_ends_and_later_audio_is_dropped(endpointing: Service) -> None:
    command = silence(0.3) + read_pcm(COMMAND)
    # The satellite goes on sending: three more seconds of silence, then another command the service must not hear.
    request = satellite(endpointing, command + silence(3.0) + read_pcm("cmd_piper_joe_01") + silence(0.5))

    assert request.transcripts == [request.transcripts[0]]
    assert normalise(request.transcripts[0]) == normalise(reference(COMMAND))
    assert request.stops == 1
    assert request.errors == []
    assert request.transcript_after_s is not None
    # The transcript came after the command's voice and its silence (less the 20 ms a chunk is sent ahead of its
    # end, and a frame of the VAD), long before the satellite stopped sending.
    earliest = voice_end_s(command) + COMPLETE_S - AHEAD_S - 0.032
    assert earliest <= request.transcript_after_s < voice_end_s(command) + UNFINISHED_S + 1.0


def test_home_assistant_s_close_right_after_the_transcript_is_normal(endpointing: Service) -> None:
    finals_before = endpointing.metrics().finals

    async def run() -> list[str]:
        async with AsyncTcpClient("127.0.0.1", endpointing.wyoming_port) as client:
            await client.write_event(Transcribe(language="en").event())
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            sender = asyncio.create_task(_send(client, silence(0.3) + read_pcm(COMMAND) + silence(3.0)))
            texts: list[str] = []
            while (event := await asyncio.wait_for(client.read_event(), 10)) is not None:
                if Transcript.is_type(event.type):
                    texts.append(Transcript.from_event(event).text)
                    break  # Home Assistant stops the audio and closes, with no audio-stop
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            return texts

    [text] = asyncio.run(run())
    assert normalise(text) == normalise(reference(COMMAND))
    assert endpointing.sessions_drop_to(0)
    assert endpointing.metrics().finals == (finals_before or 0) + 1, "one final to the listeners (MQTT), not two"
    assert endpointing.log_problems() == ()


def test_audio_stop_before_the_end_gets_the_transcript_at_once(endpointing: Service) -> None:
    request = satellite(endpointing, silence(0.3) + read_pcm(COMMAND), stop=True)
    assert [normalise(text) for text in request.transcripts] == [normalise(reference(COMMAND))]
    assert request.stops == 1


def test_the_connection_serves_the_next_request_after_an_ended_one(endpointing: Service) -> None:
    first, second = "cmd_piper_joe_05", "cmd_piper_joe_01"

    async def run() -> tuple[Request, Request]:
        async with AsyncTcpClient("127.0.0.1", endpointing.wyoming_port) as client:
            # The first satellite request sends audio-stop late, after the service ended it: nothing more comes.
            one = await _request(client, silence(0.3) + read_pcm(first) + silence(2.0), stop=True)
            two = await _request(client, silence(0.3) + read_pcm(second) + silence(2.0))
            return one, two

    one, two = asyncio.run(run())
    assert [normalise(text) for text in one.transcripts] == [normalise(reference(first))]
    assert [normalise(text) for text in two.transcripts] == [normalise(reference(second))]
    assert one.stops == two.stops == 1
    assert one.errors == two.errors == []


def test_no_speech_gets_an_empty_transcript_after_no_speech_s(endpointing: Service) -> None:
    request = satellite(endpointing, silence(NO_SPEECH_S + 1.0))
    assert request.transcripts == [""]
    assert request.transcript_after_s is not None
    assert NO_SPEECH_S - AHEAD_S <= request.transcript_after_s < NO_SPEECH_S + 1.0


def test_a_command_that_goes_on_ends_at_max_command_s(endpointing: Service) -> None:
    speech = b"".join(read_pcm(name) for name in ("asterisk_conf-hasjoin", "asterisk_conf-leaderhasleft") * 3)
    assert len(speech) / 32000 > MAX_COMMAND_S + 0.5
    request = satellite(endpointing, speech)
    [text] = request.transcripts
    assert normalise(reference("asterisk_conf-hasjoin")) in normalise(text)
    assert request.transcript_after_s is not None
    assert MAX_COMMAND_S - AHEAD_S <= request.transcript_after_s < MAX_COMMAND_S + 1.5


def test_the_client_s_sensitivity_scales_the_silence(endpointing: Service) -> None:
    first, second = read_pcm("asterisk_conf-hasjoin"), read_pcm("asterisk_conf-leaderhasleft")
    # A pause between two whole sentences: longer than a complete command's silence, shorter than a relaxed one's.
    pause_s = COMPLETE_S * 1.35 - (len(first) / 32000 - voice_end_s(first))
    speech = first + silence(max(0.0, pause_s)) + second + silence(2.5)
    both = normalise(f"{reference('asterisk_conf-hasjoin')} {reference('asterisk_conf-leaderhasleft')}")

    relaxed = satellite(endpointing, speech, sensitivity="relaxed")
    default = satellite(endpointing, speech)

    assert [normalise(text) for text in relaxed.transcripts] == [both]
    assert [normalise(text) for text in default.transcripts] == [normalise(reference("asterisk_conf-hasjoin"))]


def test_an_unknown_sensitivity_is_refused(endpointing: Service) -> None:
    request = satellite(endpointing, silence(0.3) + read_pcm(COMMAND) + silence(1.5), sensitivity="sleepy")
    assert "bad_event" in request.errors
    # The request itself goes on with what the last valid transcribe asked for.
    assert [normalise(text) for text in request.transcripts] == [normalise(reference(COMMAND))]


def test_without_endpointing_only_audio_stop_ends_a_request(tmp_path: Path) -> None:
    service = start_service(tmp_path, "wyoming.endpointing=false")
    [program] = describe(service.wyoming_port).asr
    assert program.requires_external_vad is True

    unstopped = satellite(service, silence(0.3) + read_pcm(COMMAND) + silence(2.0))
    assert unstopped.transcripts == []
    stopped = satellite(service, silence(0.3) + read_pcm(COMMAND) + silence(0.3), stop=True)
    assert [normalise(text) for text in stopped.transcripts] == [normalise(reference(COMMAND))]
