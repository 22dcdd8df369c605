"""The Wyoming adapter on the real service and model, spoken to by the `wyoming` package's own client."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, read_event
from wyoming.info import Describe, Info

from .conftest import Service, read_pcm, reference, start_service
from .wsclient import normalise

CHUNK_S = 0.1


@dataclass
class Received:
    """An event and when it arrived."""

    event: Event
    at: float


@pytest.fixture(scope="module")
def wyoming_service(service: Service) -> Service:
    """The shared service: it listens for Wyoming on a free port too."""
    return service


def _port(service: Service) -> int:
    return service.wyoming_port


async def _read_until(client: AsyncTcpClient, last_type: str, timeout_s: float = 30.0) -> list[Received]:
    received: list[Received] = []
    while True:
        event = await asyncio.wait_for(client.read_event(), timeout_s)
        assert event is not None, "connection closed early"
        received.append(Received(event, time.monotonic()))
        if event.type == last_type:
            return received


async def _send_clip(
    client: AsyncTcpClient, pcm: bytes, rate: int = 16000, width: int = 2, channels: int = 1, trailing_s: float = 0.3
) -> float:
    """Paced audio-start, chunks and audio-stop; returns when audio-stop was sent."""
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    frame = width * channels
    audio = pcm + bytes(int(trailing_s * rate) * frame)
    step = int(CHUNK_S * rate) * frame
    started = time.monotonic()
    for offset in range(0, len(audio), step):
        await client.write_event(
            AudioChunk(rate=rate, width=width, channels=channels, audio=audio[offset : offset + step]).event()
        )
        delay = started + (offset + step) / (rate * frame) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    await client.write_event(AudioStop().event())
    return time.monotonic()


async def _transcribe(port: int, pcm: bytes, **audio: int) -> tuple[list[Received], float]:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        reader = asyncio.create_task(_read_until(client, TranscriptStop().event().type))
        stop_at = await _send_clip(client, pcm, **audio)
        return await reader, stop_at


def _transcript(received: list[Received]) -> str:
    return next(Transcript.from_event(r.event).text for r in received if Transcript.is_type(r.event.type))


def test_describe_answers_with_the_model_and_its_real_languages(wyoming_service: Service) -> None:
    async def describe() -> Info:
        async with AsyncTcpClient("127.0.0.1", _port(wyoming_service)) as client:
            await client.write_event(Describe().event())
            event = await asyncio.wait_for(client.read_event(), 5)
            assert event is not None
            return Info.from_event(event)

    info = asyncio.run(describe())
    [program] = info.asr
    assert program.name == "edge-asr" and program.installed and program.version
    assert program.supports_transcript_streaming is True
    assert program.attribution.name and program.description
    [model] = program.models
    assert model.name == "tiny.en" and model.languages == ["en"]


def test_a_request_streams_committed_chunks_before_audio_stop_then_the_transcript(wyoming_service: Service) -> None:
    clip = "asterisk_conf-usermenu"
    received, stop_at = asyncio.run(_transcribe(_port(wyoming_service), read_pcm(clip)))

    types = [r.event.type for r in received]
    assert types[0] == TranscriptStart().event().type
    assert types[-2:] == [Transcript(text="").event().type, TranscriptStop().event().type]
    assert not [r for r in received if Error.is_type(r.event.type)]
    chunks = [r for r in received if TranscriptChunk.is_type(r.event.type)]
    assert [c for c in chunks if c.at < stop_at], "no transcript-chunk while the audio was still flowing"
    text = _transcript(received)
    assert normalise(text) == normalise(reference(clip))
    assert normalise("".join(TranscriptChunk.from_event(c.event).text for c in chunks)) == normalise(text)


def test_internal_silence_does_not_split_a_request(wyoming_service: Service) -> None:
    first, second = read_pcm("asterisk_conf-hasjoin"), read_pcm("asterisk_conf-leaderhasleft")
    received, _stop_at = asyncio.run(_transcribe(_port(wyoming_service), first + bytes(32000) + second))

    expected = f"{reference('asterisk_conf-hasjoin')} {reference('asterisk_conf-leaderhasleft')}"
    assert normalise(_transcript(received)) == normalise(expected)
    assert [r.event.type for r in received].count(Transcript(text="").event().type) == 1


def test_several_requests_follow_on_one_connection(wyoming_service: Service) -> None:
    async def two_requests() -> list[str]:
        texts = []
        async with AsyncTcpClient("127.0.0.1", _port(wyoming_service)) as client:
            for clip in ("asterisk_conf-hasjoin", "asterisk_conf-leaderhasleft"):
                await client.write_event(Transcribe().event())
                reader = asyncio.create_task(_read_until(client, TranscriptStop().event().type))
                await _send_clip(client, read_pcm(clip))
                texts.append(_transcript(await reader))
        return texts

    texts = asyncio.run(two_requests())
    assert [normalise(t) for t in texts] == [
        normalise(reference("asterisk_conf-hasjoin")),
        normalise(reference("asterisk_conf-leaderhasleft")),
    ]


def test_a_44k_stereo_clip_is_converted(wyoming_service: Service) -> None:
    clip = "asterisk_conf-onlyone"
    mono = np.frombuffer(read_pcm(clip), dtype="<i2").astype(np.float64)
    positions = np.arange(0, len(mono), 16000 / 44100)
    resampled = np.interp(positions, np.arange(len(mono)), mono).astype("<i2")
    stereo = np.repeat(resampled, 2).tobytes()

    received, _stop_at = asyncio.run(_transcribe(_port(wyoming_service), stereo, rate=44100, width=2, channels=2))

    assert normalise(_transcript(received)) == normalise(reference(clip))


def test_three_satellites_at_once_are_all_served(wyoming_service: Service) -> None:
    clips = ("asterisk_conf-hasjoin", "asterisk_conf-leaderhasleft", "asterisk_conf-getconfno")

    async def together() -> list[tuple[list[Received], float]]:
        return await asyncio.gather(*(_transcribe(_port(wyoming_service), read_pcm(c)) for c in clips))

    results = asyncio.run(together())
    for clip, (received, _stop_at) in zip(clips, results, strict=True):
        assert normalise(_transcript(received)) == normalise(reference(clip))


def _raw_exchange(port: int, data: bytes, wait_s: float = 5.0, linger_s: float = 0.5) -> tuple[list[Event], bool]:
    """Write raw bytes; read events back with the wyoming framing until an info or error event, the server
    closing, or `wait_s`; return them and whether the server closed the connection."""
    events: list[Event] = []
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        stream = sock.makefile("rb")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                event = read_event(stream)
            except (TimeoutError, OSError):
                return events, False
            if event is None:
                return events, True
            events.append(event)
            if event.type in ("info", "error"):
                # a connection the server means to close is closed right after the error
                deadline = min(deadline, time.monotonic() + linger_s)
    return events, False


def _line(event_type: str, data: dict[str, object] | None = None, payload: bytes = b"") -> bytes:
    header: dict[str, object] = {"type": event_type, "data": data or {}}
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header).encode() + b"\n" + payload


def _error_codes(port: int, data: bytes, wait_s: float = 5.0) -> tuple[list[str], bool]:
    events, closed = _raw_exchange(port, data, wait_s)
    return [str(Error.from_event(e).code) for e in events if Error.is_type(e.type)], closed


@pytest.mark.parametrize(
    ("data", "code", "closes"),
    [
        (b"this is not json\n", "bad_json", True),
        (b'["a", "list"]\n', "bad_header", True),
        (json.dumps({"type": "audio-chunk", "payload_length": -3}).encode() + b"\n", "bad_header", True),
        (_line("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, bytes(64)), "no_audio_start", False),
        (_line("audio-stop"), "no_audio_start", False),
        (_line("what-is-this"), "unknown_event", False),
        (
            _line("audio-start", {"rate": 16000, "width": 2, "channels": 1})
            + _line("audio-chunk", {"rate": 16000, "channels": 1}, bytes(64)),
            "bad_event",
            False,
        ),
        (_line("audio-start", {"rate": 0, "width": 2, "channels": 1}), "bad_event", False),
        (
            json.dumps({"type": "audio-chunk", "data": {}, "payload_length": 100}).encode() + b"\n" + bytes(10),
            "read_timeout",
            True,
        ),
        (json.dumps({"type": "audio-chunk", "data": {}, "payload_length": 10**9}).encode() + b"\n", "too_large", True),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "negative-length",
        "chunk-first",
        "stop-first",
        "unknown",
        "no-width",
        "bad-rate",
        "short-payload",
        "oversized",
    ],
)
def test_bad_input_gets_an_error_event_and_the_server_keeps_serving(
    wyoming_service: Service, data: bytes, code: str, closes: bool
) -> None:
    codes, closed = _error_codes(_port(wyoming_service), data, wait_s=3.0)

    assert codes == [code]
    assert closed is closes
    info_events, _closed = _raw_exchange(_port(wyoming_service), _line("describe"), wait_s=2.0)
    assert [e.type for e in info_events] == ["info"]


def test_a_satellite_that_vanishes_mid_request_frees_its_session(wyoming_service: Service) -> None:
    pcm = read_pcm("asterisk_conf-usermenu")[: 32000 * 2]
    start = _line("audio-start", {"rate": 16000, "width": 2, "channels": 1})
    chunks = b"".join(
        _line("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, pcm[i : i + 3200])
        for i in range(0, len(pcm), 3200)
    )
    with socket.create_connection(("127.0.0.1", _port(wyoming_service))) as sock:
        sock.sendall(start + chunks)
        time.sleep(0.5)

    assert wyoming_service.sessions_drop_to(0)


def test_describe_is_answered_while_the_model_loads(tmp_path: Path) -> None:
    service = start_service(tmp_path, wait_ready=False)
    port = service.wyoming_port
    try:
        answered_while_loading = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                before = service.health()[0]
                events, _closed = _raw_exchange(port, _line("describe"), wait_s=1.0, linger_s=0.0)
                after = service.health()[0]
            except OSError:
                time.sleep(0.01)
                continue
            assert [e.type for e in events] == ["info"]
            if before == after == 503:
                answered_while_loading = True
            if after == 200:
                break
        assert answered_while_loading
    finally:
        service.stop()


def test_a_satellite_that_stalls_mid_request_is_cut_off_after_idle_timeout(tmp_path: Path) -> None:
    service = start_service(tmp_path, "limits.idle_timeout_s=2")
    try:
        start = _line("audio-start", {"rate": 16000, "width": 2, "channels": 1})
        chunk = _line("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, read_pcm("asterisk_conf-hasjoin"))
        codes, closed = _error_codes(service.wyoming_port, start + chunk, wait_s=10.0)

        assert codes == ["idle_timeout"]
        assert closed
        assert service.sessions_drop_to(0)
    finally:
        service.stop()
