"""The Home Assistant add-on's entry point: the add-on's options become edge-asr's configuration.

Runs as root with the service image's Python (standard library only) and is the container's PID 1:

1. reads the options the Supervisor wrote to /data/options.json and checks them;
2. writes the service's configuration (JSON, which YAML reads) to a file the service user may read but not change;
   the Supervisor's token, for Home Assistant's names, goes to a file only that user (and root) may read;
   with MQTT on and no broker host set, the broker comes from the Supervisor's MQTT service;
3. starts `edge-asr serve --config FILE` as the service user (uid/gid 10001, no supplementary groups);
4. once the service is ready (/health/ready), announces it to Home Assistant through the Supervisor's discovery
   API, as the official Wyoming add-ons do (bashio::discovery "wyoming" {"uri": "tcp://<hostname>:10300"});
   a failed announcement is logged and retried a few times, never fatal;
5. forwards SIGTERM and SIGINT to the service, reaps every child, and exits with the service's exit status.

Environment: SUPERVISOR_TOKEN (set by the Supervisor), SUPERVISOR_API (the Supervisor's base URL, default
http://supervisor). ADDON_WYOMING_PORT and ADDON_HTTP_PORT move the service's ports inside the container; the
Supervisor never sets them (the add-on's container ports are fixed in config.yaml): they let a test run the
image on a host network beside other services.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

OPTIONS_PATH = Path("/data/options.json")
MODELS_DIR = Path("/data/models")
RUNTIME_DIR = Path("/run/edge-asr")
CONFIG_NAME = "config.yaml"
TOKEN_NAME = "supervisor-token"
SERVICE_UID = 10001
SERVICE_GID = 10001
SERVICE_HOME = "/var/lib/edge-asr"
WYOMING_PORT = 10300
HTTP_PORT = 8787
DEFAULT_SUPERVISOR = "http://supervisor"
# What the service reads from its environment (EDGE_ASR_<SECTION>_<KEY>, WHISPER_MODEL) would win over the file:
# the add-on's options are its whole configuration, so none of it reaches the service.
SERVICE_ENV_PREFIX = "EDGE_ASR_"
DROPPED_VARIABLES = ("WHISPER_MODEL", "SUPERVISOR_TOKEN", "HASSIO_TOKEN", "SUPERVISOR_API")
# Exit statuses: 2 = the options must be fixed (as the service's own, for configuration).
EXIT_CONFIG = 2
EXIT_FAILURE = 1
# Asking the Supervisor: each request's timeout, how often and how far apart (doubling).
REQUEST_TIMEOUT_S = 10.0
# The Supervisor's answers are a few hundred bytes; anything past this is not one of them.
MAX_ANSWER_BYTES = 1024 * 1024
ANNOUNCE_ATTEMPTS = 6
MQTT_ATTEMPTS = 6
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
READY_POLL_S = 0.5


class OptionsError(Exception):
    """Options that cannot be used; the message names the option."""


class SupervisorError(Exception):
    """The Supervisor could not be asked, or refused; the message says why (never the token)."""


@dataclass(frozen=True)
class Option:
    """One add-on option: the Python type its value has in options.json, whether the Supervisor requires it, and
    the configuration key it sets ("section.key", or "log_level")."""

    kind: type
    required: bool
    key: str


# Every option of config.yaml's schema, with the configuration key it lands on.
OPTIONS: dict[str, Option] = {
    "model": Option(str, True, "model.name"),
    "language": Option(str, True, "model.language"),
    "beam_size": Option(int, True, "model.beam_size"),
    "threads": Option(int, True, "model.threads"),
    "vocabulary": Option(list, False, "model.vocabulary"),
    # On: homeassistant.url = the Supervisor's proxy of Core, homeassistant.token_file = the Supervisor's token.
    "names_from_home_assistant": Option(bool, True, "homeassistant.url"),
    "silence_ms": Option(int, True, "stream.silence_ms"),
    "max_sessions": Option(int, True, "limits.max_sessions"),
    # Also bounds stream.max_window_s (at most the utterance) and raises limits.max_buffer_s (more than it).
    "max_utterance_s": Option(float, True, "limits.max_utterance_s"),
    "idle_timeout_s": Option(float, True, "limits.idle_timeout_s"),
    "mqtt": Option(bool, True, "mqtt.enabled"),
    # Empty host: host, port, user name, password and TLS come from the Supervisor's MQTT service.
    "mqtt_host": Option(str, False, "mqtt.host"),
    "mqtt_port": Option(int, False, "mqtt.port"),
    "mqtt_username": Option(str, False, "mqtt.username"),
    "mqtt_password": Option(str, False, "mqtt.password"),
    "mqtt_topic_prefix": Option(str, True, "mqtt.topic_prefix"),
    # Missing in the options of an add-on installed before it: partials stay on, as then.
    "mqtt_partials": Option(bool, False, "mqtt.partials"),
    "log_level": Option(str, True, "log_level"),
}
# The service's defaults these two are checked against: a window never longer than the utterance, and more audio
# may wait for a decode than an utterance holds.
MAX_WINDOW_S = 15.0
MAX_BUFFER_S = 60.0


def log(message: str) -> None:
    """One line on stderr, which the Supervisor shows as the add-on's log."""
    print(f"edge-asr add-on: {message}", file=sys.stderr, flush=True)


def check_options(raw: object) -> dict[str, Any]:
    """The options as the Supervisor wrote them, each of its type; OptionsError names the first bad one.

    An optional option may be missing or null. Unknown options are left out (the Supervisor drops them too)."""
    if not isinstance(raw, dict):
        raise OptionsError("the options must be a JSON object")
    options: dict[str, Any] = {}
    for name, option in OPTIONS.items():
        value = raw.get(name)
        if value is None:
            if option.required:
                raise OptionsError(f"{name}: missing (it sets {option.key})")
            continue
        if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, option.kind) or (option.kind is int and isinstance(value, bool)):
            raise OptionsError(f"{name}: expected {option.kind.__name__}, got {type(value).__name__}")
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise OptionsError(f"{name}: expected a list of strings")
        options[name] = value
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        log(f"ignoring unknown options: {', '.join(unknown)}")
    return options


def read_options(path: Path) -> dict[str, Any]:
    """The checked options in `path`; OptionsError says what is wrong with the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise OptionsError(f"cannot read {path}: {err.strerror or err} (the Supervisor writes it)") from None
    except ValueError as err:  # not UTF-8 (UnicodeDecodeError) or not JSON
        raise OptionsError(f"{path} is not JSON: {err}") from None
    return check_options(raw)


def _set(config: dict[str, Any], key: str, value: Any) -> None:
    section, dot, name = key.partition(".")
    if dot:
        config.setdefault(section, {})[name] = value
    else:
        config[section] = value


def service_config(
    options: Mapping[str, Any],
    *,
    supervisor: str = DEFAULT_SUPERVISOR,
    token_file: str = "",
    broker: Mapping[str, Any] | None = None,
    models_dir: str = str(MODELS_DIR),
    wyoming_port: int = WYOMING_PORT,
    http_port: int = HTTP_PORT,
) -> dict[str, Any]:
    """edge-asr's configuration (the layer build_settings reads) from checked options.

    `token_file` holds the Supervisor's token (needed when names_from_home_assistant is on); `broker` is the
    Supervisor's MQTT service (host, port, username, password, ssl, protocol), used when mqtt is on and
    mqtt_host is empty."""
    config: dict[str, Any] = {}
    for name in ("model", "language", "beam_size", "threads", "silence_ms", "max_sessions", "idle_timeout_s"):
        _set(config, OPTIONS[name].key, options[name])
    _set(config, OPTIONS["vocabulary"].key, [name.strip() for name in options.get("vocabulary", []) if name.strip()])
    utterance_s = float(options["max_utterance_s"])
    _set(config, OPTIONS["max_utterance_s"].key, utterance_s)
    _set(config, "stream.max_window_s", min(MAX_WINDOW_S, utterance_s))
    _set(config, "limits.max_buffer_s", max(MAX_BUFFER_S, 2 * utterance_s))
    _set(config, OPTIONS["log_level"].key, str(options["log_level"]).upper())
    _set(config, "model.download_dir", models_dir)
    _set(config, "wyoming.uri", f"tcp://0.0.0.0:{wyoming_port}")
    _set(config, "http.host", "0.0.0.0")
    _set(config, "http.port", http_port)
    if options["names_from_home_assistant"]:
        if not token_file:
            raise OptionsError(
                "names_from_home_assistant: the Supervisor gave no token (SUPERVISOR_TOKEN; config.yaml needs "
                "homeassistant_api: true)"
            )
        _set(config, "homeassistant.url", f"{supervisor.rstrip('/')}/core")
        _set(config, "homeassistant.token_file", token_file)
    _set(config, OPTIONS["mqtt"].key, bool(options["mqtt"]))
    if options["mqtt"]:
        _set(config, OPTIONS["mqtt_topic_prefix"].key, options["mqtt_topic_prefix"])
        _set(config, OPTIONS["mqtt_partials"].key, options.get("mqtt_partials", True))
        config["mqtt"].update(_broker_keys(options, broker))
    return config


def _broker_keys(options: Mapping[str, Any], broker: Mapping[str, Any] | None) -> dict[str, Any]:
    """The mqtt keys naming the broker: the options' own host, else the Supervisor's MQTT service."""
    if options.get("mqtt_host"):
        keys: dict[str, Any] = {"host": options["mqtt_host"]}
        for name in ("mqtt_port", "mqtt_username", "mqtt_password"):
            if options.get(name) not in (None, ""):
                keys[OPTIONS[name].key.partition(".")[2]] = options[name]
        return keys
    if broker is None:
        raise OptionsError("mqtt: no mqtt_host is set and the Supervisor's MQTT service was not asked")
    keys = {"host": broker["host"], "port": int(broker["port"])}
    for name in ("username", "password"):
        if broker.get(name):
            keys[name] = str(broker[name])
    if broker.get("ssl"):
        keys["tls"] = True
    # The Supervisor's MQTT service names 3.1 or 3.1.1; edge-asr speaks 3.1.1 (or 5, which such a broker may lack).
    keys["protocol"] = "3.1.1"
    return keys


def _request(supervisor: str, token: str, method: str, path: str, body: Any = None) -> Any:
    """A Supervisor API call: its `data` when it answers {"result": "ok"}, else SupervisorError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{supervisor.rstrip('/')}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            raw = response.read(MAX_ANSWER_BYTES + 1)
        if len(raw) > MAX_ANSWER_BYTES:
            raise SupervisorError(f"{method} {path}: an answer of more than {MAX_ANSWER_BYTES} bytes")
        answer = json.loads(raw)
    except urllib.error.HTTPError as err:
        raise SupervisorError(f"{method} {path}: HTTP {err.code} {_message(err)}".rstrip()) from None
    except (OSError, ValueError) as err:
        raise SupervisorError(f"{method} {path}: {err}") from None
    if not isinstance(answer, dict) or answer.get("result") != "ok":
        message = answer.get("message") if isinstance(answer, dict) else None
        raise SupervisorError(f"{method} {path}: not ok: {message or answer!r}")
    return answer.get("data")


def _message(err: urllib.error.HTTPError) -> str:
    """The Supervisor's error message in an error answer ({"result": "error", "message": ...}), if any."""
    try:
        answer = json.loads(err.read())
    except (OSError, ValueError):
        return ""
    message = answer.get("message") if isinstance(answer, dict) else None
    return str(message) if message else ""


def _permanent(err: SupervisorError) -> bool:
    """A refusal that asking again will not change (no token, no right to it)."""
    return any(f"HTTP {code}" in str(err) for code in (401, 403, 404, 405))


def mqtt_service(
    supervisor: str, token: str, attempts: int = MQTT_ATTEMPTS, first_s: float = RETRY_FIRST_S
) -> dict[str, Any]:
    """The broker the Supervisor's MQTT service names (GET /services/mqtt), asked a few times: the Mosquitto
    add-on may still be starting. SupervisorError when there is none."""
    delay = first_s
    for attempt in range(1, attempts + 1):
        try:
            data = _request(supervisor, token, "GET", "/services/mqtt")
        except SupervisorError as err:
            if _permanent(err) or attempt == attempts:
                raise
            log(f"the Supervisor's MQTT service: {err}; asking again in {delay:g} s")
            time.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)
            continue
        if not isinstance(data, dict) or not data.get("host") or not data.get("port"):
            raise SupervisorError("GET /services/mqtt: the answer names no host and port")
        return data
    raise SupervisorError("GET /services/mqtt: no answer")  # not reached: the last attempt raises


def announce(
    supervisor: str,
    token: str,
    uri: str,
    attempts: int = ANNOUNCE_ATTEMPTS,
    first_s: float = RETRY_FIRST_S,
    stop: threading.Event | None = None,
) -> bool:
    """Tell Home Assistant about the Wyoming service (POST /discovery, as bashio::discovery does); True once the
    Supervisor took it. A failure is logged, never raised: the service runs on without discovery."""
    body = {"service": "wyoming", "config": {"uri": uri}}
    stop = stop or threading.Event()
    delay = first_s
    for attempt in range(1, attempts + 1):
        try:
            data = _request(supervisor, token, "POST", "/discovery", body)
        except SupervisorError as err:
            if _permanent(err) or attempt == attempts:
                log(f"announcing Wyoming discovery failed: {err}")
                break
            log(f"announcing Wyoming discovery: {err}; trying again in {delay:g} s")
            if stop.wait(delay):
                return False
            delay = min(RETRY_MAX_S, delay * 2)
            continue
        uuid = data.get("uuid") if isinstance(data, dict) else None
        log(f"announced {uri} to Home Assistant (Wyoming discovery {uuid})")
        return True
    log(f"Home Assistant will not offer the Wyoming integration by itself: add it by hand, host {uri}")
    return False


def wait_ready(port: int, stop: threading.Event) -> bool:
    """Wait until the service's /health/ready answers 200 (the model is loaded); False when `stop` is set first."""
    url = f"http://127.0.0.1:{port}/health/ready"
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as response:
                if response.status == 200:
                    return True
        except (OSError, ValueError):
            pass  # not listening yet, or 503 while the model loads
        stop.wait(READY_POLL_S)
    return False


def _port(variable: str, default: int) -> int:
    raw = os.environ.get(variable, "")
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise OptionsError(f"{variable}: {raw!r} is not a port")
    return int(raw)


def _write(path: Path, text: str, mode: int, uid: int = 0, gid: int = SERVICE_GID) -> None:
    """Write `text` to a file created with `mode` (never readable by others in between) owned by uid:gid."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        os.fchown(file.fileno(), uid, gid)
        os.fchmod(file.fileno(), mode)
        file.write(text)


def _directory(path: Path, mode: int, uid: int, gid: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(mode)


def service_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The service's environment: the container's, without what would override its configuration or the token."""
    env = {
        name: value
        for name, value in environ.items()
        if not name.startswith(SERVICE_ENV_PREFIX) and name not in DROPPED_VARIABLES
    }
    try:
        home = pwd.getpwuid(SERVICE_UID).pw_dir
        user = pwd.getpwuid(SERVICE_UID).pw_name
    except KeyError:
        home, user = SERVICE_HOME, "edge-asr"
    env.update(HOME=home, USER=user, LOGNAME=user, HF_HOME=str(MODELS_DIR / "huggingface"))
    return env


def service_command(config_path: Path) -> list[str]:
    """`edge-asr serve --config FILE` with the image's own installation (the script beside this Python)."""
    script = Path(sys.executable).with_name("edge-asr")
    if script.is_file():
        return [str(script), "serve", "--config", str(config_path)]
    return [sys.executable, "-m", "edge_asr", "serve", "--config", str(config_path)]


class Runner:
    """The service as a child process: signals forwarded to it, every child reaped, its exit status kept."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self._pending: int | None = None

    def forward(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: stop announcing and pass the signal on to the service."""
        self.stopping.set()
        if self.child is None:
            self._pending = signum
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child.pid, signum)

    def start(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        """Start the service as the service user: supplementary groups dropped, then gid, then uid (setgroups,
        setregid, setreuid in the child before exec)."""
        self.child = subprocess.Popen(
            list(command), env=dict(env), user=SERVICE_UID, group=SERVICE_GID, extra_groups=[]
        )
        if self._pending is not None:
            os.kill(self.child.pid, self._pending)

    def wait(self) -> int:
        """Reap children until the service ends; its exit status (128 + N when signal N ended it)."""
        assert self.child is not None
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return EXIT_FAILURE
            if pid == self.child.pid:
                self.stopping.set()
                code = os.waitstatus_to_exitcode(status)
                self.child.returncode = code
                return code if code >= 0 else 128 - code


def _discovery(runner: Runner, supervisor: str, token: str, http_port: int, wyoming_port: int) -> None:
    if wait_ready(http_port, runner.stopping):
        announce(supervisor, token, f"tcp://{socket.gethostname()}:{wyoming_port}", stop=runner.stopping)


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the configuration, run the service and announce it; the service's exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args:
        log(f"takes no arguments (got {' '.join(args)}); its options come from {OPTIONS_PATH}")
        return EXIT_CONFIG
    if os.geteuid() != 0:
        log(f"must run as root (to read {OPTIONS_PATH} and start the service as uid {SERVICE_UID})")
        return EXIT_FAILURE
    supervisor = os.environ.get("SUPERVISOR_API") or DEFAULT_SUPERVISOR
    token = os.environ.get("SUPERVISOR_TOKEN") or os.environ.get("HASSIO_TOKEN") or ""
    try:
        options = read_options(OPTIONS_PATH)
        wyoming_port = _port("ADDON_WYOMING_PORT", WYOMING_PORT)
        http_port = _port("ADDON_HTTP_PORT", HTTP_PORT)
        _directory(RUNTIME_DIR, 0o750, 0, SERVICE_GID)
        _directory(MODELS_DIR, 0o750, SERVICE_UID, SERVICE_GID)
        token_file = ""
        if options["names_from_home_assistant"] and token:
            token_file = str(RUNTIME_DIR / TOKEN_NAME)
            _write(Path(token_file), token + "\n", 0o440)
        broker = None
        if options["mqtt"] and not options.get("mqtt_host"):
            if not token:
                raise OptionsError(
                    "mqtt: no mqtt_host is set, and without SUPERVISOR_TOKEN the Supervisor's MQTT service "
                    "cannot be asked"
                )
            try:
                broker = mqtt_service(supervisor, token)
            except SupervisorError as err:
                raise OptionsError(
                    f"mqtt: no mqtt_host is set and the Supervisor offers no MQTT broker ({err}): install the "
                    "Mosquitto broker add-on, or set mqtt_host"
                ) from None
            log(f"MQTT: the Supervisor's broker at {broker['host']}:{broker['port']}")
        config = service_config(
            options,
            supervisor=supervisor,
            token_file=token_file,
            broker=broker,
            wyoming_port=wyoming_port,
            http_port=http_port,
        )
        config_path = RUNTIME_DIR / CONFIG_NAME
        # JSON is YAML; the file may hold the MQTT password, so only root and the service's group read it.
        _write(config_path, json.dumps(config, indent=2) + "\n", 0o640)
    except OptionsError as err:
        log(f"invalid options: {err}")
        return EXIT_CONFIG
    except OSError as err:
        log(f"cannot prepare the service's files: {err}")
        return EXIT_FAILURE

    runner = Runner()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, runner.forward)
    log(f"starting edge-asr (model {options['model']}, Wyoming port {wyoming_port}, HTTP port {http_port})")
    try:
        runner.start(service_command(config_path), service_environment(os.environ))
    except OSError as err:
        log(f"cannot start edge-asr: {err}")
        return EXIT_FAILURE
    if token:
        threading.Thread(
            target=_discovery, args=(runner, supervisor, token, http_port, wyoming_port), daemon=True
        ).start()
    else:
        log("no SUPERVISOR_TOKEN: Wyoming discovery is not announced")
    code = runner.wait()
    if code == EXIT_CONFIG:
        table = ", ".join(f"{name} = {option.key}" for name, option in OPTIONS.items())
        log(f"edge-asr refused its configuration (the key it names above); the options set: {table}")
    log(f"edge-asr exited with status {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
