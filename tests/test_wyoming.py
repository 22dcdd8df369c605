"""The Wyoming adapter on the real service and model, spoken to by the `wyoming` package's own client."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error

from edge_asr.bench.processes import Service
from edge_asr.bench.wyoming_client import ReceivedEvent as Received
from edge_asr.bench.wyoming_client import read_until, send_clip, transcribe, transcript_text

from .server import start_service
from .speech import normalise, read_pcm, reference
from .wyoming_client import (
    assert_answered,
    describe,
    error_codes,
    exchange_to_end,
    raw_exchange,
    wire_event,
    wire_inputs,
)

CHUNK_S = 0.1


@pytest.fixture(scope="module")
def wyoming_service(service: Service) -> Service:
    """The shared service: it listens for Wyoming on a free port too."""
    return service


def test_describe_answers_with_the_model_and_its_real_languages(wyoming_service: Service) -> None:
    [program] = describe(wyoming_service.wyoming_port).asr
    assert program.name == "edge-asr"
    assert program.installed
    assert program.version
    assert program.supports_transcript_streaming is False  # Home Assistant reads only the transcript
    assert program.requires_external_vad is False  # the service ends each command itself
    assert program.attribution.name
    assert program.description
    [model] = program.models
    assert model.name == "tiny.en"
    assert model.languages == ["en"]


def test_by_default_a_request_gets_its_transcript_and_no_chunk(wyoming_service: Service) -> None:
    clip = "asterisk_conf-usermenu"
    received, _stop_at = asyncio.run(transcribe(wyoming_service.wyoming_port, read_pcm(clip)))

    types = [r.event.type for r in received]
    assert types == ["transcript-start", "transcript", "transcript-stop"]
    assert normalise(transcript_text(received)) == normalise(reference(clip))


def test_with_transcript_chunks_a_request_streams_committed_chunks_before_audio_stop_then_the_transcript(
    tmp_path: Path,
) -> None:
    service = start_service(tmp_path, "wyoming.transcript_chunks=true")
    assert describe(service.wyoming_port).asr[0].supports_transcript_streaming is True
    clip = "asterisk_conf-usermenu"
    received, stop_at = asyncio.run(transcribe(service.wyoming_port, read_pcm(clip)))

    types = [r.event.type for r in received]
    assert types[0] == TranscriptStart().event().type
    assert types[-2:] == [Transcript(text="").event().type, TranscriptStop().event().type]
    assert not [r for r in received if Error.is_type(r.event.type)]
    chunks = [r for r in received if TranscriptChunk.is_type(r.event.type)]
    assert [c for c in chunks if c.at < stop_at], "no transcript-chunk while the audio was still flowing"
    text = transcript_text(received)
    assert normalise(text) == normalise(reference(clip))
    # The final may revise committed words ("one" heard later as "1"): the chunks are then a shorter
    # streamed text, and the transcript is the authority. Most of the sentence still streamed ahead.
    streamed = normalise("".join(TranscriptChunk.from_event(c.event).text for c in chunks)).split()
    assert len(streamed) >= len(normalise(text).split()) // 2


def test_a_pause_shorter_than_a_command_s_end_does_not_split_a_request(wyoming_service: Service) -> None:
    first, second = read_pcm("asterisk_conf-hasjoin"), read_pcm("asterisk_conf-leaderhasleft")
    # 0.2 s between two sentences, with the first one's own trailing silence: under endpointing.complete_silence_ms.
    received, _stop_at = asyncio.run(transcribe(wyoming_service.wyoming_port, first + bytes(6400) + second))

    expected = f"{reference('asterisk_conf-hasjoin')} {reference('asterisk_conf-leaderhasleft')}"
    assert normalise(transcript_text(received)) == normalise(expected)
    assert [r.event.type for r in received].count(Transcript(text="").event().type) == 1


def test_several_requests_follow_on_one_connection(wyoming_service: Service) -> None:
    async def two_requests() -> list[str]:
        texts = []
        async with AsyncTcpClient("127.0.0.1", wyoming_service.wyoming_port) as client:
            for clip in ("asterisk_conf-hasjoin", "asterisk_conf-leaderhasleft"):
                await client.write_event(Transcribe().event())
                reader = asyncio.create_task(read_until(client, TranscriptStop().event().type))
                await send_clip(client, read_pcm(clip))
                texts.append(transcript_text(await reader))
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

    received, _stop_at = asyncio.run(transcribe(wyoming_service.wyoming_port, stereo, rate=44100, width=2, channels=2))

    assert normalise(transcript_text(received)) == normalise(reference(clip))


def test_a_3_channel_clip_is_downmixed(wyoming_service: Service) -> None:
    clip = "asterisk_conf-onlyone"
    mono = np.frombuffer(read_pcm(clip), dtype="<i2")
    three = np.repeat(mono, 3).tobytes()

    received, _stop_at = asyncio.run(transcribe(wyoming_service.wyoming_port, three, channels=3))

    assert normalise(transcript_text(received)) == normalise(reference(clip))


def test_a_refused_request_still_gets_an_empty_transcript(wyoming_service: Service) -> None:
    async def refused() -> list[Received]:
        async with AsyncTcpClient("127.0.0.1", wyoming_service.wyoming_port) as client:
            await client.write_event(Transcribe(language="de").event())  # tiny.en speaks English only
            reader = asyncio.create_task(read_until(client, TranscriptStop().event().type))
            await send_clip(client, read_pcm("asterisk_conf-onlyone")[:32000])
            return await reader

    received = asyncio.run(refused())

    assert [r.event.type for r in received] == ["error", "transcript", "transcript-stop"]
    assert Error.from_event(received[0].event).code == "unsupported_language"
    assert transcript_text(received) == ""


def test_a_request_from_a_site_that_cannot_be_a_topic_is_refused_with_an_empty_transcript(
    wyoming_service: Service,
) -> None:
    async def refused() -> list[Received]:
        async with AsyncTcpClient("127.0.0.1", wyoming_service.wyoming_port) as client:
            await client.write_event(Transcribe(language="en", context={"site": "living room/#"}).event())
            reader = asyncio.create_task(read_until(client, TranscriptStop().event().type))
            await send_clip(client, read_pcm("asterisk_conf-onlyone")[:32000])
            return await reader

    received = asyncio.run(refused())

    assert [r.event.type for r in received] == ["error", "transcript", "transcript-stop"]
    assert Error.from_event(received[0].event).code == "bad_config"
    assert transcript_text(received) == ""


def test_three_satellites_at_once_are_all_served(wyoming_service: Service) -> None:
    clips = ("asterisk_conf-hasjoin", "asterisk_conf-leaderhasleft", "asterisk_conf-getconfno")

    async def together() -> list[tuple[list[Received], float]]:
        return await asyncio.gather(*(transcribe(wyoming_service.wyoming_port, read_pcm(c)) for c in clips))

    results = asyncio.run(together())
    for clip, (received, _stop_at) in zip(clips, results, strict=True):
        assert normalise(transcript_text(received)) == normalise(reference(clip))


@pytest.mark.parametrize(
    ("data", "code", "closes"),
    [
        (b"this is not json\n", "bad_json", True),
        (b'["a", "list"]\n', "bad_header", True),
        (json.dumps({"type": "audio-chunk", "payload_length": -3}).encode() + b"\n", "bad_header", True),
        (wire_event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, bytes(64)), "no_audio_start", False),
        (wire_event("audio-stop"), "no_audio_start", False),
        (wire_event("what-is-this"), "unknown_event", False),
        (
            wire_event("audio-start", {"rate": 16000, "width": 2, "channels": 1})
            + wire_event("audio-chunk", {"rate": 16000, "channels": 1}, bytes(64)),
            "bad_event",
            False,
        ),
        (wire_event("audio-start", {"rate": 0, "width": 2, "channels": 1}), "bad_event", False),
        (
            json.dumps({"type": "audio-chunk", "data": {}, "payload_length": 100}).encode() + b"\n" + bytes(10),
            "read_timeout",
            True,
        ),
        (json.dumps({"type": "audio-chunk", "data": {}, "payload_length": 10**9}).encode() + b"\n", "too_large", True),
        (json.dumps({"type": "transcribe", "data": None}).encode() + b"\n", "bad_header", True),
        (json.dumps({"type": "transcribe", "data_length": 4}).encode() + b"\nnull", "bad_data", True),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", "bad_header", True),
        (b"[" * 5_000 + b"]" * 5_000 + b"\n", "bad_header", True),
        (wire_event("transcribe", {"language": 5}), "bad_event", False),
        (wire_event("transcribe", {"context": ["hall"]}), "bad_event", False),
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
        "data-null",
        "data-block-null",
        "nested-100000",
        "nested-5000",
        "language-not-string",
        "context-not-object",
    ],
)
def test_bad_input_gets_an_error_event_and_the_server_keeps_serving(
    wyoming_service: Service, data: bytes, code: str, closes: bool
) -> None:
    codes, closed = error_codes(wyoming_service.wyoming_port, data, wait_s=3.0)

    assert codes == [code]
    assert closed is closes
    info_events, _closed = raw_exchange(wyoming_service.wyoming_port, wire_event("describe"), wait_s=2.0)
    assert [e.type for e in info_events] == ["info"]
    assert "Task exception was never retrieved" not in wyoming_service.log()


@settings(max_examples=5, deadline=None)
@given(data=wire_inputs())
@example(data=json.dumps({"type": "transcribe", "data_length": 4}).encode() + b"\nnull")
@example(data=wire_event("transcribe", {"language": 5, "context": "kitchen"}))
def test_fuzzed_input_never_breaks_the_real_service(wyoming_service: Service, data: bytes) -> None:
    log_from = len(wyoming_service.log())
    events, closed = exchange_to_end(wyoming_service.wyoming_port, data, wait_s=10.0)

    assert_answered(events, closed)
    assert wyoming_service.sessions_drop_to(0)
    clip = "asterisk_conf-hasjoin"
    received, _stop_at = asyncio.run(transcribe(wyoming_service.wyoming_port, read_pcm(clip)))
    assert normalise(transcript_text(received)) == normalise(reference(clip))
    log = wyoming_service.log()[log_from:]
    assert "Traceback" not in log
    assert "Task exception was never retrieved" not in log


def test_a_satellite_that_vanishes_mid_request_frees_its_session(wyoming_service: Service) -> None:
    pcm = read_pcm("asterisk_conf-usermenu")[: 32000 * 2]
    start = wire_event("audio-start", {"rate": 16000, "width": 2, "channels": 1})
    chunks = b"".join(
        wire_event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, pcm[i : i + 3200])
        for i in range(0, len(pcm), 3200)
    )
    with socket.create_connection(("127.0.0.1", wyoming_service.wyoming_port)) as sock:
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
                events, _closed = raw_exchange(port, wire_event("describe"), wait_s=1.0, linger_s=0.0)
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
        start = wire_event("audio-start", {"rate": 16000, "width": 2, "channels": 1})
        chunk = wire_event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, read_pcm("asterisk_conf-hasjoin"))
        codes, closed = error_codes(service.wyoming_port, start + chunk, wait_s=10.0)

        assert codes == ["idle_timeout"]
        assert closed
        assert service.sessions_drop_to(0)
    finally:
        service.stop()
