"""The `edge-asr` command: version, start-up errors that name the key, and `bench` end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from edge_asr import __version__
from edge_asr.bench.processes import free_port

from .server import start_service
from .speech import REPO, SPEECH_DIR


def _edge_asr(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_asr", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_version() -> None:
    result = _edge_asr("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"edge-asr {__version__}"


def test_an_unknown_key_stops_start_up_naming_it() -> None:
    result = _edge_asr("serve", "--set", "stream.silence=300")
    assert result.returncode == 2
    assert "stream.silence: unknown key" in result.stderr


def test_a_bad_value_in_the_environment_stops_start_up_naming_it() -> None:
    result = _edge_asr("serve", env={"EDGE_ASR_HTTP_PORT": "eighty"})
    assert result.returncode == 2
    assert "http.port: expected int" in result.stderr


def test_a_bad_yaml_file_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "edge-asr.yaml"
    config.write_text("stream:\n  silence_ms: -5\n")
    result = _edge_asr("serve", "--config", str(config))
    assert result.returncode == 2
    assert "stream.silence_ms: -5 is below the minimum" in result.stderr


def _listen_anywhere() -> tuple[str, ...]:
    return ("--port", "0", "--set", f"wyoming.uri=tcp://127.0.0.1:{free_port()}")


def test_a_missing_model_directory_exits_2_naming_the_key(tmp_path: Path) -> None:
    result = _edge_asr("serve", *_listen_anywhere(), "--model", str(tmp_path / "no-such-model"))
    assert result.returncode == 2, "exit 2: the unit's RestartPreventExitStatus, no restart loop"
    assert "model.name: directory" in result.stderr
    assert "does not exist" in result.stderr


def test_a_corrupt_model_exits_2_naming_the_key(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.bin").write_bytes(b"not a model" * 100)
    (corrupt / "config.json").write_text("{}")
    result = _edge_asr("serve", *_listen_anywhere(), "--model", str(corrupt))
    assert result.returncode == 2
    assert "model.name: cannot load" in result.stderr


def test_a_port_in_use_exits_2_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _edge_asr("serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2
    assert f"http.port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr


def _corpus(tmp_path: Path, *names: str) -> Path:
    """A corpus directory of links to clips of the shipped speech corpus."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in names:
        for suffix in (".wav", ".txt"):
            (corpus / f"{name}{suffix}").symlink_to(SPEECH_DIR / f"{name}{suffix}")
    return corpus


def test_bench_replays_a_corpus_and_reports_json(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, "asterisk_conf-hasjoin", "silence_3s")
    report = tmp_path / "report.json"

    result = _edge_asr("bench", str(corpus), "--fast", "--json", str(report), "--threads", "1")

    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    streaming, offline = data["streaming"], data["offline"]
    assert streaming["clips"] == 2
    assert streaming["no_speech_clips"] == 1
    assert streaming["hallucinations"] == 0
    assert offline["hallucinations"] == 0
    assert streaming["reference_words"] == 5
    assert offline["reference_words"] == 5
    assert streaming["wer"] == streaming["word_errors"] / 5
    by_name = {clip["name"]: clip for clip in data["clips"]}
    assert by_name["silence_3s"]["hypothesis"] == ""
    assert by_name["asterisk_conf-hasjoin"]["hypothesis"]
    assert data["resources"]["peak_rss_mb"] > 0
    assert data["resources"]["start_to_ready_s"] > 0
    assert "streaming" in result.stderr + result.stdout


def test_bench_with_no_corpus_argument_replays_the_shipped_corpus(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    clips = "asterisk_digits_*"

    result = _edge_asr("bench", "--match", clips, "--fast", "--no-offline", "--json", str(report), "--threads", "1")

    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["corpus"] == str(SPEECH_DIR)
    assert sorted(clip["name"] for clip in data["clips"]) == sorted(
        path.stem for path in SPEECH_DIR.glob(f"{clips}.wav")
    )
    assert data["streaming"]["reference_words"] > 0


def test_bench_measures_a_wyoming_server(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, "asterisk_conf-hasjoin", "silence_3s")
    report = tmp_path / "report.json"
    uri = f"tcp://127.0.0.1:{free_port()}"
    service = start_service(tmp_path, f"wyoming.uri={uri}")
    try:
        result = _edge_asr("bench", str(corpus), "--wyoming", uri, "--json", str(report), "--fast", "--no-offline")
    finally:
        service.stop()

    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    streaming = data["streaming"]
    assert (data["protocol"], data["transport"]) == ("wyoming", uri)
    assert streaming["clips"] == 2
    assert streaming["clip_errors"] == 0
    assert streaming["hallucinations"] == 0
    assert streaming["reference_words"] == 5
    assert streaming["wer"] == streaming["word_errors"] / 5
    assert streaming["end_to_final_p50_ms"] >= 0
    assert streaming["end_to_final_p90_ms"] >= 0
    assert streaming["ttct_p50_ms"] is None
    assert streaming["e2e_final_p50_ms"] is None
    by_name = {clip["name"]: clip for clip in data["clips"]}
    assert by_name["silence_3s"]["hypothesis"] == ""
    assert by_name["asterisk_conf-hasjoin"]["hypothesis"]
    assert by_name["asterisk_conf-hasjoin"]["ttct_ms"] == []
    assert "audio-stop->transcript" in result.stdout
