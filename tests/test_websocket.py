"""The real service, real bundled model and real WebSocket: streaming, several clients, bad input."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from edge_asr.bench.processes import Service, http_get
from edge_asr.events import words_after

from .server import start_service
from .speech import normalise, read_pcm, reference
from .wsclient import finals, open_stream, read_until_done, send_audio, transcribe

# Clips the bundled tiny.en transcribes word for word when it hears them whole.
CLEAR_CLIPS = ("asterisk_conf-getconfno", "asterisk_conf-onlyone", "asterisk_conf-hasjoin")


@pytest.mark.parametrize("clip", CLEAR_CLIPS)
def test_partials_stream_before_a_final_that_matches_the_reference(service: Service, clip: str) -> None:
    messages = transcribe(service.ws_url, read_pcm(clip))

    kinds = [m["type"] for m in messages]
    assert kinds[-1] == "done"
    assert "partial" in kinds
    assert kinds.index("partial") < kinds.index("final")
    final_texts = [m["text"] for m in finals(messages)]
    assert normalise(" ".join(final_texts)) == normalise(reference(clip))
    for message in finals(messages):
        assert {"text", "asr_ms", "e2e_ms", "ttct_ms", "utterance", "start", "end"} <= set(message)
        assert all(isinstance(message[k], int) and message[k] >= 0 for k in ("asr_ms", "e2e_ms", "ttct_ms"))
        assert 0 <= message["start"] < message["end"]


def test_stable_text_only_grows_and_prefixes_the_partial(service: Service) -> None:
    messages = transcribe(service.ws_url, read_pcm("asterisk_conf-usermenu"))

    stable = ""
    for message in (m for m in messages if m["type"] == "partial"):
        assert message["text"].startswith(message["stable"])
        assert message["stable"].startswith(stable)
        stable = message["stable"]
        assert message["utterance"] == 1
    final = finals(messages)[-1]
    # The final is a decode of the whole utterance: it extends the stable text, or it says it revised it.
    assert final["revised"] == (words_after(final["text"], stable) is None)


@pytest.mark.parametrize("clip", ["silence_3s", "noise_hiss_3s"])
def test_no_speech_produces_no_text(service: Service, clip: str) -> None:
    messages = transcribe(service.ws_url, read_pcm(clip))

    assert [m["type"] for m in messages] == ["done"]
    assert messages[0]["utterances"] == 0


def test_silence_splits_utterances_and_numbers_them(service: Service) -> None:
    first, second = read_pcm("asterisk_conf-leaderhasleft"), read_pcm("asterisk_conf-hasjoin")
    messages = transcribe(service.ws_url, first + bytes(32000) + second)

    got = finals(messages)
    assert [m["utterance"] for m in got] == [1, 2]
    assert normalise(got[0]["text"]) == normalise(reference("asterisk_conf-leaderhasleft"))
    assert normalise(got[1]["text"]) == normalise(reference("asterisk_conf-hasjoin"))
    assert got[0]["end"] <= got[1]["start"]
    assert messages[-1] == {"type": "done", "utterances": 2}


def test_end_right_after_speech_still_gets_every_word(service: Service) -> None:
    messages = transcribe(service.ws_url, read_pcm("asterisk_conf-onlyone"), trailing_silence_s=0.0)

    assert normalise(finals(messages)[-1]["text"]) == normalise(reference("asterisk_conf-onlyone"))


def test_two_clients_at_once_are_both_served(service: Service) -> None:
    clips = ("asterisk_conf-leaderhasleft", "asterisk_conf-hasjoin")
    results: dict[str, list[dict[str, Any]]] = {}

    def speak(clip: str) -> None:
        results[clip] = transcribe(service.ws_url, read_pcm(clip))

    threads = [threading.Thread(target=speak, args=(clip,)) for clip in clips]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    for clip in clips:
        assert normalise(finals(results[clip])[-1]["text"]) == normalise(reference(clip))


def test_config_message_sets_the_prompt_and_bad_config_is_an_error(service: Service) -> None:
    with open_stream(service.ws_url) as (ws, _ready):
        ws.send(json.dumps({"type": "config", "prompt": "Conference call.", "language": "en"}))
        ws.send(json.dumps({"type": "config", "volume": 11}))
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error"
        assert error["code"] == "bad_config"
        assert "volume" in error["message"]
        send_audio(ws, read_pcm("asterisk_conf-onlyone") + bytes(9600))
        ws.send(json.dumps({"type": "end"}))
        messages = read_until_done(ws)
    assert not [m for m in messages if m["type"] == "error"]
    assert normalise(finals(messages)[-1]["text"]) == normalise(reference("asterisk_conf-onlyone"))


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_json"),
        ('["a", "list"]', "unknown_message"),
        ('{"type": "shout"}', "unknown_message"),
        (b"\x01\x02\x03", "bad_audio"),
    ],
)
def test_bad_frames_get_an_error_and_lose_nothing_else(service: Service, frame: str | bytes, code: str) -> None:
    pcm = read_pcm("asterisk_conf-leaderhasleft")
    half = len(pcm) // 2 - len(pcm) // 2 % 2
    with open_stream(service.ws_url) as (ws, _ready):
        send_audio(ws, pcm[:half])
        ws.send(frame)
        send_audio(ws, pcm[half:] + bytes(9600))
        ws.send(json.dumps({"type": "end"}))
        messages = read_until_done(ws)
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == [code]
    assert errors[0]["message"]
    assert normalise(finals(messages)[-1]["text"]) == normalise(reference("asterisk_conf-leaderhasleft"))


def test_an_oversized_frame_is_refused_with_close_code_1009(service: Service) -> None:
    status, health = service.health()
    assert status == 200
    assert isinstance(health, dict)
    with open_stream(service.ws_url) as (ws, ready):
        ws.send(bytes(ready["max_frame_bytes"] + 2))
        error = json.loads(ws.recv(timeout=10))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert error["type"] == "error"
    assert error["code"] == "frame_too_large"
    assert ws.close_code == 1009


def test_a_client_that_vanishes_mid_utterance_frees_its_session(service: Service) -> None:
    with open_stream(service.ws_url) as (ws, _ready):
        send_audio(ws, read_pcm("asterisk_conf-onlyone")[: 32000 * 2])
        ws.socket.close()  # no close handshake: the client is simply gone

    assert service.sessions_drop_to(0)
    assert service.process.poll() is None


def test_health_and_metrics_describe_the_service(service: Service) -> None:
    transcribe(service.ws_url, read_pcm("asterisk_conf-leaderhasleft"))

    status, health = service.health()
    assert status == 200
    assert isinstance(health, dict)
    assert health["model"] == "tiny.en"
    assert health["languages"] == ["en"]
    assert health["ready"] is True
    assert isinstance(health["decodes"], int)
    assert health["decodes"] > 0
    assert isinstance(health["threads"], int)
    assert health["threads"] >= 1
    status, metrics = http_get(f"{service.base_url}/metrics")
    assert status == 200
    assert isinstance(metrics, str)
    assert 'edge_asr_events_total{type="final"}' in metrics
    assert "edge_asr_decode_seconds_bucket" in metrics
    assert "edge_asr_ttct_seconds_count" in metrics


def test_health_is_503_while_the_model_loads_then_200(tmp_path: Path) -> None:
    service = start_service(tmp_path, wait_ready=False)
    try:
        seen: list[int] = []
        reasons: list[object] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 200 not in seen:
            try:
                status, body = service.health()
            except OSError:
                time.sleep(0.01)
                continue
            seen.append(status)
            if status == 503 and isinstance(body, dict):
                reasons.append(body["status"])
            time.sleep(0.01)
        assert seen[0] == 503
        assert seen[-1] == 200
        assert set(seen) == {503, 200}
        assert "loading model" in reasons
    finally:
        assert service.stop() == 0


def test_language_tags_map_to_the_model_and_unknown_languages_are_refused(service: Service) -> None:
    with open_stream(f"{service.ws_url}?language=en-US") as (_ws, ready):
        assert ready["type"] == "ready"
        assert ready["language"] == "en"
    with open_stream(f"{service.ws_url}?language=de") as (ws, refusal), pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    assert refusal["type"] == "error"
    assert refusal["code"] == "unsupported_language"
    assert "'de'" in refusal["message"]
    with open_stream(service.ws_url) as (ws, _ready):
        ws.send(json.dumps({"type": "config", "language": "fr"}))
        error = json.loads(ws.recv(timeout=10))
    assert error["code"] == "unsupported_language"
    assert "'fr'" in error["message"]


def test_audio_after_end_is_the_next_utterance(service: Service) -> None:
    first, second = read_pcm("asterisk_conf-hasjoin"), read_pcm("asterisk_conf-leaderhasleft")
    with open_stream(service.ws_url) as (ws, _ready):
        send_audio(ws, first)
        ws.send(json.dumps({"type": "end"}))
        send_audio(ws, second + bytes(9600))
        ws.send(json.dumps({"type": "end"}))
        messages = read_until_done(ws)
        messages += read_until_done(ws)
    got = finals(messages)
    assert [normalise(m["text"]) for m in got] == [
        normalise(reference("asterisk_conf-hasjoin")),
        normalise(reference("asterisk_conf-leaderhasleft")),
    ]
    assert [m["utterance"] for m in got] == [1, 2]
    assert [m for m in messages if m["type"] == "done"] == [
        {"type": "done", "utterances": 1},
        {"type": "done", "utterances": 2},
    ]


def test_sessions_above_the_limit_are_refused_as_busy_and_idle_ones_are_closed(tmp_path: Path) -> None:
    service = start_service(tmp_path, "limits.max_sessions=1", "limits.idle_timeout_s=2")
    try:
        with open_stream(service.ws_url) as (_first, _ready), open_stream(service.ws_url) as (second, refusal):
            with pytest.raises(ConnectionClosed):
                second.recv(timeout=10)
            assert refusal["type"] == "error"
            assert refusal["code"] == "busy"
            assert second.close_code == 1013
        # the slot comes back once the first client leaves
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open_stream(service.ws_url) as (_third, ready):
                pass
            if ready["type"] == "ready":
                break
            time.sleep(0.1)
        assert ready["type"] == "ready"
        with open_stream(service.ws_url) as (silent, ready):
            assert ready["type"] == "ready"
            error = json.loads(silent.recv(timeout=10))
            with pytest.raises(ConnectionClosed):
                silent.recv(timeout=10)
        assert error["code"] == "idle_timeout"
        assert service.health()[1]["sessions"] == 0  # type: ignore[index]
    finally:
        service.stop()
