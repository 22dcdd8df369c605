"""The service's life on the real parts: SIGTERM lets people finish their sentence (on the client and the
broker), a model that keeps failing is reported and stops the watchdog, a slow reader is cut off."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from wyoming.asr import Transcribe, TranscriptStop
from wyoming.audio import AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error

from edge_asr.bench.processes import Broker, Service, free_port, make_broker
from edge_asr.bench.wyoming_client import read_until, send_clip, transcribe, transcript_text
from edge_asr.config import build_settings
from edge_asr.service import serve

from .broker import Message, mqtt_service, subscribed
from .fakes import ScriptedTranscriber
from .notify import NotifyListener
from .server import start_service
from .speech import normalise, read_pcm, reference, silence
from .waiting import eventually
from .wsclient import finals, open_stream, send_audio

CLIP = "asterisk_confbridge-pin"  # 5 s without a pause: mid-sentence at the signal
ACCEPT_S = 0.8


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own."""
    running = make_broker(tmp_path)
    yield running
    running.stop()


def _draining_service(tmp_path: Path, broker: Broker, site: str, *settings: str) -> Service:
    return mqtt_service(tmp_path, broker, f"mqtt.default_site={site}", f"service.drain_accept_s={ACCEPT_S}", *settings)


def _wait_for_draining(service: Service) -> None:
    """/health turns not-ready and says why at once after the signal."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        status, body = service.health()
        if status == 503 and isinstance(body, dict) and body["status"] == "draining":
            return
        time.sleep(0.02)
    raise AssertionError(f"/health did not report draining: {service.health()}")


def _final_on(messages: list[Message], topic: str) -> bool:
    return any(m.topic == topic for m in messages)


def test_sigterm_mid_sentence_lets_a_websocket_speaker_finish_on_the_socket_and_the_broker(
    tmp_path: Path, broker: Broker
) -> None:
    service = _draining_service(tmp_path, broker, "drain_ws")
    pcm = silence(0.3) + read_pcm(CLIP)
    first, second = 32000, 32000 * 2 + 12800  # 1 s before the signal, then 1.2 s: past the accept window
    with subscribed(broker.port) as subscriber, open_stream(service.ws_url) as (ws, _ready):
        send_audio(ws, pcm[:first])
        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        _wait_for_draining(service)
        with open_stream(service.ws_url) as (_late_ws, late_ready):
            assert late_ready["type"] == "ready", "new sessions are still taken while the balancer notices"
        assert time.monotonic() - signalled < ACCEPT_S
        send_audio(ws, pcm[first:second])  # the accept window passes while the speaker goes on
        with open_stream(service.ws_url) as (refused_ws, refusal):
            assert refusal["type"] == "error"
            assert refusal["code"] == "shutting_down"
            with pytest.raises(ConnectionClosed) as closed:
                refused_ws.recv(timeout=10)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1012
        with contextlib.suppress(ConnectionClosed):  # the drain ends once the utterance has ended
            send_audio(ws, pcm[second:] + silence(1.0))
        messages = _messages_until_closed(ws)
        published = subscriber.wait_for(lambda got: _final_on(got, "edge_asr/drain_ws/final"))

    [final] = finals(messages)
    assert normalise(final["text"]) == normalise(reference(CLIP)), "the whole sentence, not cut at the signal"
    [on_broker] = [m.json() for m in published if m.topic == "edge_asr/drain_ws/final"]
    assert on_broker["text"] == final["text"]
    assert service.process.wait(timeout=30) == 0


def _messages_until_closed(ws: ClientConnection, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """What the server sends until it closes the connection at the end of its drain."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(ConnectionClosed):
        while time.monotonic() < deadline:
            messages.append(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
    return messages


def test_sigterm_mid_request_lets_a_satellite_finish_and_refuses_later_requests_with_a_transcript(
    tmp_path: Path, broker: Broker
) -> None:
    service = _draining_service(tmp_path, broker, "drain_wy")
    pcm = read_pcm(CLIP)
    half = len(pcm) // 2 - len(pcm) // 2 % 2

    async def speak() -> tuple[str, list[str], str]:
        client = AsyncTcpClient("127.0.0.1", service.wyoming_port)
        await client.connect()
        try:
            await client.write_event(Transcribe(language="en").event())
            reader = asyncio.create_task(read_until(client, TranscriptStop().event().type, timeout_s=60))
            sender = asyncio.create_task(send_clip(client, pcm, trailing_s=0.5))
            await asyncio.sleep(half / 32000)
            service.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(ACCEPT_S + 0.3)  # the satellite goes on speaking; another one comes too late
            async with AsyncTcpClient("127.0.0.1", service.wyoming_port) as late:
                await late.write_event(Transcribe(language="en").event())
                await late.write_event(AudioStart(rate=16000, width=2, channels=1).event())
                await late.write_event(AudioStop().event())
                refused = await read_until(late, TranscriptStop().event().type, timeout_s=10)
            text = transcript_text(await reader)
            # A command the service ended itself is answered while the satellite still sends its trailing silence;
            # the drain then closes the connection under the rest, as Home Assistant itself closes it.
            with contextlib.suppress(ConnectionError):
                await sender
        finally:
            # The drain may have closed the connection under the satellite's trailing audio (see above).
            with contextlib.suppress(ConnectionError):
                await client.disconnect()
        codes = [str(Error.from_event(r.event).code) for r in refused if Error.is_type(r.event.type)]
        return text, codes, transcript_text(refused)

    with subscribed(broker.port) as subscriber:
        text, codes, refused_text = asyncio.run(speak())
        published = subscriber.wait_for(lambda got: _final_on(got, "edge_asr/drain_wy/final"))

    assert normalise(text) == normalise(reference(CLIP))
    assert codes == ["shutting_down"]
    assert refused_text == "", "a refused request still gets its (empty) transcript"
    [on_broker] = [m.json() for m in published if m.topic == "edge_asr/drain_wy/final"]
    assert normalise(on_broker["text"]) == normalise(reference(CLIP))
    assert service.process.wait(timeout=30) == 0


def test_an_utterance_still_open_when_the_drain_times_out_is_finalised_and_delivered(
    tmp_path: Path, broker: Broker
) -> None:
    service = mqtt_service(
        tmp_path,
        broker,
        "mqtt.default_site=drain_cut",
        "service.drain_accept_s=0",
        "service.drain_timeout_s=1",
    )
    pcm = read_pcm(CLIP)
    with subscribed(broker.port) as subscriber, open_stream(service.ws_url) as (ws, _ready):
        send_audio(ws, pcm[:32000])
        service.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(ConnectionClosed):
            send_audio(ws, pcm[32000:])  # the speaker goes on past the drain timeout
        messages = _messages_until_closed(ws)
        published = subscriber.wait_for(lambda got: _final_on(got, "edge_asr/drain_cut/final"))

    [final] = finals(messages)
    words = normalise(str(final["text"])).split()
    assert words, "what was said before the cut is delivered"
    assert words == normalise(reference(CLIP)).split()[: len(words)]
    [on_broker] = [m.json() for m in published if m.topic == "edge_asr/drain_cut/final"]
    assert on_broker["text"] == final["text"]
    assert service.process.wait(timeout=30) == 0


async def test_a_model_that_keeps_failing_turns_health_503_and_stops_feeding_the_watchdog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    port = free_port()
    settings = build_settings(
        {
            "http": {"host": "127.0.0.1", "port": port},
            "wyoming": {"uri": f"tcp://127.0.0.1:{free_port()}"},
            "service": {"max_decode_failures": 3, "drain_accept_s": 0, "drain_timeout_s": 1},
        }
    )
    caplog.set_level(logging.ERROR, logger="edge_asr")
    running = asyncio.create_task(serve(settings, lambda: ScriptedTranscriber(fail=True)))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await eventually(lambda: listener.count("READY=1") == 1, what="READY=1")
            assert (await http.get("/health")).status_code == 200
            async with connect(f"ws://127.0.0.1:{port}/ws/stream") as ws:
                await ws.recv()
                for _ in range(3):
                    await ws.send(silence(0.3) + read_pcm("cmd_piper_joe_01") + silence(0.6))
                    await ws.send(json.dumps({"type": "end"}))
                await eventually(lambda: listener.count("WATCHDOG=1") > 0, what="the watchdog fed while healthy")
                health = await _wait_status(http, 503)
            fed = listener.count("WATCHDOG=1")
            await asyncio.sleep(0.6)

        status = str(health["status"])
        assert "model failing: " in status
        assert "scripted failure" in status
        assert listener.count("WATCHDOG=1") == fed, "systemd restarts a service whose model keeps failing"
        tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("edge_asr")]
        assert len(tracebacks) == 1, "one traceback, then rate-limited summaries"
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(running, 30) == 0
        listener.close()


async def _wait_status(http: httpx.AsyncClient, status: int, timeout_s: float = 30.0) -> dict[str, object]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        response = await http.get("/health")
        if response.status_code == status:
            body: dict[str, object] = response.json()
            return body
        assert asyncio.get_running_loop().time() < deadline, f"/health stayed {response.status_code}"
        await asyncio.sleep(0.05)


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def test_a_client_flooding_audio_at_150x_real_time_is_slowed_and_a_satellite_is_still_served(tmp_path: Path) -> None:
    """Reduced here (10 s, 5 s of buffer, so utterances of 4 s); `edge-asr bench --soak` runs the long version.

    Loopback sockets buffer up to some 10 MB (over 300 s of audio) in the kernel before the service's pause in
    reading reaches the client, and two decode workers get through 4 s utterances at some 30-45 times real time:
    at 50x the flood came within 10 % of its pace on a quiet machine although the service stopped reading. At
    150x a service that reads as fast as it is sent to is told apart from one that waits for its decodes."""
    service = start_service(tmp_path, "limits.max_buffer_s=5", "limits.max_utterance_s=4", "stream.max_window_s=4")
    flood_s, speed = 10.0, 150
    speech = read_pcm("asterisk_conf-usermenu")
    baseline_mb = _rss_mb(service.process.pid)
    peak_mb = baseline_mb
    sent_s = 0.0
    stop = threading.Event()

    def flood() -> None:
        nonlocal sent_s
        chunk = 6400  # 0.2 s of audio every 1.3 ms: 150 times real time
        with contextlib.suppress(ConnectionClosed), open_stream(service.ws_url) as (ws, _ready):
            started = time.monotonic()
            offset = 0
            while not stop.is_set() and time.monotonic() - started < flood_s:
                ws.send(speech[offset % len(speech) : offset % len(speech) + chunk])
                offset += chunk
                sent_s = offset / 32000
                time.sleep(max(0.0, started + sent_s / speed - time.monotonic()))

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        time.sleep(2.0)
        received, _stop_at = asyncio.run(transcribe(service.wyoming_port, read_pcm("asterisk_conf-onlyone")))
        while flooder.is_alive():
            peak_mb = max(peak_mb, _rss_mb(service.process.pid))
            flooder.join(0.2)
    finally:
        stop.set()
        flooder.join()

    assert normalise(transcript_text(received)) == normalise(reference("asterisk_conf-onlyone"))
    assert sent_s < 0.9 * flood_s * speed, f"the flood was not slowed: {sent_s:.0f} s of audio sent in {flood_s} s"
    assert peak_mb - baseline_mb < 100, f"RSS {baseline_mb:.0f} -> {peak_mb:.0f} MB"
    assert service.sessions_drop_to(0)
    assert service.stop() == 0
