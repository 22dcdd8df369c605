"""The Home Assistant add-on (addon/): its Supervisor files, its run script against a stand-in Supervisor, and (marked
`image`) the add-on image built on the service image, run as the Supervisor would run it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import socket
import stat
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import edge_asr
from adapters.homeassistant import websocket_url
from edge_asr.config import (
    HttpSettings,
    LimitSettings,
    ModelSettings,
    MqttSettings,
    ServiceSettings,
    StreamSettings,
    build_settings,
)

from .speech import REPO

ADDON = REPO / "addon"
TOKEN = "supervisor-token-of-the-add-on-0123456789abcdef"
ARCHES = {"amd64", "aarch64"}
# The Supervisor's own patterns (supervisor/apps/options.py, apps/validate.py, apps/const.py).
RE_SCHEMA_ELEMENT = re.compile(
    r"^(?:"
    r"|bool"
    r"|email"
    r"|url"
    r"|port"
    r"|device(?:\((?P<filter>subsystem=[a-z]+)\))?"
    r"|str(?:\((?P<s_min>\d+)?,(?P<s_max>\d+)?\))?"
    r"|password(?:\((?P<p_min>\d+)?,(?P<p_max>\d+)?\))?"
    r"|int(?:\((?P<i_min>-?\d+)?,(?P<i_max>-?\d+)?\))?"
    r"|float(?:\((?P<f_min>-?\d*\.?\d+)?,(?P<f_max>-?\d*\.?\d+)?\))?"
    r"|match\((?P<match>.*)\)"
    r"|list\((?P<list>.+)\)"
    r")\??$"
)
RE_SLUG = re.compile(r"^[-_.A-Za-z0-9]+$")
RE_SERVICE = re.compile(r"^(?P<service>mqtt|mysql):(?P<rights>provide|want|need)$")
RE_DOCKER_IMAGE_BUILD = re.compile(r"^([a-zA-Z\-\.:\d{}]+/)*?([\-\w{}]+)/([\-\w{}]+)(:[\.\-\w{}]+)?$")
# What options.json holds for a Supervisor schema type: Python's type of the value after its validation.
KINDS = {"str": str, "password": str, "match": str, "list": str, "int": int, "port": int, "float": float, "bool": bool}


def load_run_script() -> ModuleType:
    """addon/run.py as a module, loaded by its path (the add-on folder is no package)."""
    spec = importlib.util.spec_from_file_location("edge_asr_addon_run", ADDON / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


run = load_run_script()


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def addon_config() -> dict[str, Any]:
    config = read_yaml(ADDON / "config.yaml")
    assert isinstance(config, dict)
    return config


def supervisor_validate(schema: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Options checked as the Supervisor checks them (AppOptions in supervisor/apps/options.py): each value of its
    schema type and range, unknown keys dropped, every option without `?` present. The result is what the Supervisor
    writes to /data/options.json. AssertionError names the first bad option."""
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key in schema:
            checked[key] = _validate_element(schema[key], value, key)
    for key, typ in schema.items():
        element = typ[0] if isinstance(typ, list) else typ
        assert key in checked or (isinstance(element, str) and element.endswith("?")), f"missing option {key}"
    return checked


def _validate_element(typ: Any, value: Any, key: str) -> Any:
    if isinstance(typ, list):
        assert isinstance(value, list), f"{key}: not a list"
        return [_validate_element(typ[0], item, key) for item in value]
    assert isinstance(typ, str), f"{key}: nested schemas are not used"
    assert value is not None, f"{key}: missing required option"
    match = RE_SCHEMA_ELEMENT.match(typ)
    assert match is not None, f"{key}: unknown type {typ}"
    low = next((match.group(g) for g in ("i_min", "f_min", "s_min", "p_min") if match.group(g)), None)
    high = next((match.group(g) for g in ("i_max", "f_max", "s_max", "p_max") if match.group(g)), None)
    base = typ.rstrip("?").partition("(")[0]
    result: Any
    measure: float
    if base in ("str", "password"):
        assert isinstance(value, (str, int, float)), f"{key}: not a string"
        assert not isinstance(value, bool), f"{key}: not a string"
        result, measure = str(value), len(str(value))
    elif base in ("int", "port"):
        assert not isinstance(value, bool), f"{key}: not an integer"
        assert int(value) == value, f"{key}: not an integer"
        result = measure = int(value)
        if base == "port":
            low, high = "1", "65535"
    elif base == "float":
        assert not isinstance(value, bool), f"{key}: not a number"
        result = measure = float(value)
    elif base == "bool":
        assert isinstance(value, bool), f"{key}: not a boolean"
        return value
    elif base == "match":
        assert re.match(match.group("match"), str(value)), f"{key}: {value!r} does not match"
        return str(value)
    elif base == "list":
        assert str(value) in match.group("list").split("|"), f"{key}: {value!r} is not one of the list"
        return str(value)
    else:
        raise AssertionError(f"{key}: type {typ} is not used by this add-on")
    assert low is None or measure >= float(low), f"{key}: {value!r} below {low}"
    assert high is None or measure <= float(high), f"{key}: {value!r} above {high}"
    return result


def every_option(token_file: str) -> tuple[dict[str, Any], str]:
    """Options with a value other than the default for each, as the Supervisor writes them; and the token file."""
    return {
        "model": "base.en",
        "language": "de",
        "beam_size": 3,
        "threads": 2,
        "vocabulary": ["Elowen", " Quillo fan ", ""],
        "names_from_home_assistant": True,
        "silence_ms": 600,
        "max_sessions": 3,
        "max_utterance_s": 40.0,
        "idle_timeout_s": 45.0,
        "mqtt": True,
        "mqtt_host": "broker.lan",
        "mqtt_port": 8883,
        "mqtt_username": "asr",
        "mqtt_password": "broker secret",
        "mqtt_topic_prefix": "voice",
        "mqtt_partials": False,
        "log_level": "debug",
    }, token_file


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "supervisor-token"
    path.write_text(TOKEN + "\n", encoding="utf-8")
    return str(path)


# --- The stand-in Supervisor -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A request the stand-in Supervisor received."""

    method: str
    path: str
    authorization: str
    body: Any


class StandInSupervisor:
    """The Supervisor's API as far as the add-on uses it, on a free loopback port: POST /discovery and
    GET /services/mqtt answer as api_process does ({"result": "ok", "data": ...}, or an error with its status);
    every request is recorded. `answers[(method, path)]` is a list of (status, body) given in turn, the last one
    again and again."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.answers: dict[tuple[str, str], list[tuple[int, Any]]] = {
            ("POST", "/discovery"): [(200, {"result": "ok", "data": {"uuid": "0123456789abcdef0123456789abcdef"}})],
            ("GET", "/services/mqtt"): [(400, {"result": "error", "message": "Service not enabled"})],
        }
        self.received = threading.Condition()
        # Core behind the Supervisor's proxy (/core/api/websocket), when set: a server on this loopback port.
        self.core_port = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/core/api/websocket" and stand_in.core_port:
                    stand_in.relay(self)
                else:
                    stand_in.handle(self, "GET")

            def do_POST(self) -> None:
                stand_in.handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        key = (method, handler.path)
        answers = self.answers.get(key, [(404, {"result": "error", "message": "not found"})])
        status, answer = answers.pop(0) if len(answers) > 1 else answers[0]
        with self.received:  # recorded before the answer: the client may look as soon as it has it
            self.requests.append(Request(method, handler.path, handler.headers.get("Authorization", ""), body))
            self.received.notify_all()
        # bytes: a broken Supervisor's answer, sent as it is.
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def relay(self, handler: BaseHTTPRequestHandler) -> None:
        """The Supervisor's WebSocket proxy of Core, as far as a test needs it: the upgrade request goes on to Core's
        /api/websocket, then the bytes flow both ways until one side closes. (The real proxy checks the add-on's token
        itself and speaks to Core with its own; here Core checks the add-on's token.)"""
        with self.received:
            self.requests.append(Request("GET", handler.path, "", None))
            self.received.notify_all()
        upstream = socket.create_connection(("127.0.0.1", self.core_port), timeout=10)
        upstream.settimeout(None)
        headers = "".join(f"{name}: {value}\r\n" for name, value in handler.headers.items() if name.lower() != "host")
        upstream.sendall(f"GET /api/websocket HTTP/1.1\r\nHost: 127.0.0.1:{self.core_port}\r\n{headers}\r\n".encode())
        client = handler.connection

        def pipe(source: socket.socket, target: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    target.sendall(data)
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        back.start()
        pipe(client, upstream)
        back.join(10)
        upstream.close()
        handler.close_connection = True

    def wait_for(self, method: str, path: str, timeout_s: float) -> list[Request]:
        """The requests to `path` once there is one; AssertionError after `timeout_s` without."""
        with self.received:
            self.received.wait_for(lambda: self.of(method, path), timeout_s)
            found = self.of(method, path)
        assert found, f"no {method} {path} within {timeout_s} s (got {self.requests})"
        return found

    def of(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if (r.method, r.path) == (method, path)]


@pytest.fixture
def supervisor() -> Iterator[StandInSupervisor]:
    stand_in = StandInSupervisor()
    stand_in.thread.start()
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


# --- Fast: the Supervisor's files ---------------------------------------------------------------------------------


@pytest.mark.fast
def test_the_defaults_validate_against_the_schema_and_every_option_is_mapped() -> None:
    config = addon_config()
    schema, options = config["schema"], config["options"]
    written = supervisor_validate(schema, options)

    assert set(schema) == set(run.OPTIONS), "every schema option has its configuration key in run.py, and no other"
    for name, typ in schema.items():
        element = typ[0] if isinstance(typ, list) else typ
        kind = list if isinstance(typ, list) else KINDS[element.rstrip("?").partition("(")[0]]
        option = run.OPTIONS[name]
        assert option.kind is kind, name
        assert option.required == (not element.endswith("?")), name
        assert name in options or not option.required, f"{name} is required but has no default"
        assert run.check_options(written)[name] == written[name] if name in written else True
    for name, typ in schema.items():
        assert isinstance(typ, list) or RE_SCHEMA_ELEMENT.match(typ), name


@pytest.mark.fast
def test_the_defaults_are_the_services_defaults() -> None:
    written = supervisor_validate(addon_config()["schema"], addon_config()["options"])
    config = run.service_config({**written, "names_from_home_assistant": False})
    settings = build_settings(config, environ={})

    model, stream, limits, mqtt = ModelSettings(), StreamSettings(), LimitSettings(), MqttSettings()
    assert (settings.model.name, settings.model.language) == (model.name, model.language)
    assert (settings.model.beam_size, settings.model.threads, settings.model.vocabulary) == (
        model.beam_size,
        model.threads,
        model.vocabulary,
    )
    assert settings.stream == stream
    assert settings.limits == limits
    assert (settings.mqtt.enabled, settings.mqtt.topic_prefix) == (mqtt.enabled, mqtt.topic_prefix)
    assert addon_config()["options"]["mqtt_partials"] is mqtt.partials
    assert settings.log_level == "INFO"
    # What the add-on sets itself: the container's fixed ports, models kept in /data.
    assert settings.wyoming.uri == "tcp://0.0.0.0:10300"
    assert (settings.http.host, settings.http.port) == ("0.0.0.0", HttpSettings().port)
    assert settings.model.download_dir == "/data/models"
    assert addon_config()["options"]["names_from_home_assistant"] is True


@pytest.mark.fast
def test_each_option_lands_on_its_key(token_file: str) -> None:
    options, token_path = every_option(token_file)
    config = run.service_config(run.check_options(options), supervisor="http://supervisor", token_file=token_path)
    settings = build_settings(json.loads(json.dumps(config)), environ={})  # as the service reads the JSON file

    assert settings.model.name == "base.en"
    assert settings.model.language == "de"
    assert settings.model.beam_size == 3
    assert settings.model.threads == 2
    assert settings.model.vocabulary == ("Elowen", "Quillo fan")
    assert settings.stream.silence_ms == 600
    assert settings.limits.max_sessions == 3
    assert settings.limits.max_utterance_s == 40.0
    assert settings.limits.idle_timeout_s == 45.0
    assert settings.mqtt.enabled
    assert (settings.mqtt.host, settings.mqtt.port) == ("broker.lan", 8883)
    assert (settings.mqtt.username, settings.mqtt.password) == ("asr", "broker secret")
    assert settings.mqtt.topic_prefix == "voice"
    assert not settings.mqtt.partials
    assert settings.log_level == "DEBUG"
    # Names from Home Assistant: the Supervisor's proxy of Core's WebSocket API, with the add-on's token.
    assert settings.homeassistant.url == "http://supervisor/core"
    assert websocket_url(settings.homeassistant.url) == "ws://supervisor/core/api/websocket"
    assert settings.homeassistant.token == TOKEN
    # A longer utterance than the service's 60 s buffer or 15 s window still makes a configuration it accepts.
    assert settings.stream.max_window_s == 15.0
    assert settings.limits.max_buffer_s == 80.0
    assert {f"{section}.{key}" for section, keys in config.items() if isinstance(keys, dict) for key in keys} >= {
        option.key for option in run.OPTIONS.values() if "." in option.key
    }


@pytest.mark.fast
@pytest.mark.parametrize("utterance_s", [2.0, 14.5, 59.0, 600.0])
def test_any_utterance_length_the_schema_allows_is_accepted(utterance_s: float) -> None:
    options = {**addon_config()["options"], "max_utterance_s": utterance_s, "names_from_home_assistant": False}
    settings = build_settings(run.service_config(run.check_options(options)), environ={})

    assert settings.limits.max_utterance_s == utterance_s
    assert settings.stream.max_window_s <= utterance_s < settings.limits.max_buffer_s


@pytest.mark.fast
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"beam_size": "3"}, "beam_size: expected int, got str"),
        ({"beam_size": True}, "beam_size: expected int, got bool"),
        ({"mqtt": "yes"}, "mqtt: expected bool, got str"),
        ({"vocabulary": ["Elowen", 3]}, "vocabulary: expected a list of strings"),
        ({"vocabulary": "Elowen"}, "vocabulary: expected list, got str"),
        ({"silence_ms": None}, "silence_ms: missing (it sets stream.silence_ms)"),
    ],
)
def test_options_of_the_wrong_type_are_refused_naming_the_option(change: dict[str, Any], message: str) -> None:
    options = {**addon_config()["options"], **change}
    with pytest.raises(run.OptionsError, match=re.escape(message)):
        run.check_options(options)


@pytest.mark.fast
def test_a_missing_or_broken_options_file_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(run.OptionsError, match=r"cannot read .*options\.json: No such file or directory"):
        run.read_options(tmp_path / "options.json")
    (tmp_path / "options.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(run.OptionsError, match=r"options\.json is not JSON"):
        run.read_options(tmp_path / "options.json")
    (tmp_path / "options.json").write_bytes(b'{"model": "\xff"}')  # not UTF-8
    with pytest.raises(run.OptionsError, match=r"options\.json is not JSON"):
        run.read_options(tmp_path / "options.json")
    (tmp_path / "options.json").write_text("[]", encoding="utf-8")
    with pytest.raises(run.OptionsError, match="must be a JSON object"):
        run.read_options(tmp_path / "options.json")


@pytest.mark.fast
def test_names_from_home_assistant_need_the_supervisors_token() -> None:
    options = run.check_options(addon_config()["options"])
    with pytest.raises(run.OptionsError, match="names_from_home_assistant: the Supervisor gave no token"):
        run.service_config(options, token_file="")


@pytest.mark.fast
def test_the_version_is_the_services_everywhere() -> None:
    version = edge_asr.__version__
    build = read_yaml(ADDON / "build.yaml")
    dockerfile = (ADDON / "Dockerfile").read_text(encoding="utf-8")
    default = re.search(r"^ARG BUILD_FROM=(\S+)$", dockerfile, re.MULTILINE)

    assert str(addon_config()["version"]) == version, "addon/config.yaml's version"
    assert set(build["build_from"]) == ARCHES
    for arch, image in build["build_from"].items():
        assert image == f"edgeasr/edge-asr:{version}", f"addon/build.yaml's build_from {arch}"
        assert RE_DOCKER_IMAGE_BUILD.match(image)
    assert default is not None, "addon/Dockerfile's ARG BUILD_FROM has a default"
    assert default.group(1) == f"edgeasr/edge-asr:{version}", "addon/Dockerfile's ARG BUILD_FROM"
    assert f"## {version}" in (ADDON / "CHANGELOG.md").read_text(encoding="utf-8"), "addon/CHANGELOG.md"


@pytest.mark.fast
def test_the_config_follows_the_supervisors_rules() -> None:
    config = addon_config()
    drain_s = ServiceSettings().drain_accept_s + ServiceSettings().drain_timeout_s

    assert {"name", "version", "slug", "description", "arch"} <= set(config)
    assert RE_SLUG.match(config["slug"])
    assert config["slug"] == "edge_asr"
    assert set(config["arch"]) == ARCHES
    assert config["init"] is False
    assert drain_s + 5 <= config["timeout"] <= 300, "the Supervisor must wait for the drain before killing"
    assert config["discovery"] == ["wyoming"]
    assert config["homeassistant_api"] is True
    assert all(RE_SERVICE.match(service) for service in config["services"])
    assert config["ports"] == {"10300/tcp": None, "8787/tcp": None}
    dockerfile = (ADDON / "Dockerfile").read_text(encoding="utf-8")
    # The service image's user is not root, the add-on's is: the run script reads /data/options.json as root.
    assert re.search(r"^USER root$", dockerfile, re.MULTILINE)
    # With the watchdog on, the Supervisor restarts an unhealthy add-on: busy (/health/ready 503) is not unhealthy.
    assert re.search(r"^HEALTHCHECK .*/health/live", dockerfile, re.MULTILINE | re.DOTALL)


@pytest.mark.fast
def test_the_translations_name_every_option_and_port() -> None:
    config, translations = addon_config(), read_yaml(ADDON / "translations" / "en.yaml")

    assert set(translations["configuration"]) == set(config["schema"])
    assert all(entry["name"] and entry["description"] for entry in translations["configuration"].values())
    assert set(translations["network"]) == set(config["ports"])
    docs = (ADDON / "DOCS.md").read_text(encoding="utf-8")
    for name, option in run.OPTIONS.items():
        assert f"`{name}`" in docs, f"DOCS.md names the option {name}"
        assert f"`{option.key}`" in docs, f"DOCS.md names the key of {name}"


@pytest.mark.fast
def test_the_repository_is_one_the_supervisor_can_add() -> None:
    repository = read_yaml(REPO / "repository.yaml")
    assert isinstance(repository["name"], str)
    assert repository["name"]
    # The store takes every config.{json,yaml,yml} outside hidden folders and rootfs for an add-on
    # (supervisor/store/data.py): this one only.
    found = []
    for directory, subdirectories, files in os.walk(REPO):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".") and name != "rootfs"]
        found += [Path(directory, name) for name in files if name in ("config.json", "config.yaml", "config.yml")]
    assert found == [ADDON / "config.yaml"]


# --- Fast: the run script and the stand-in Supervisor -------------------------------------------------------------


@pytest.mark.fast
def test_discovery_is_announced_with_the_token(supervisor: StandInSupervisor) -> None:
    assert run.announce(supervisor.url, TOKEN, "tcp://a0d7b954-edge-asr:10300")

    [request] = supervisor.of("POST", "/discovery")
    assert request.authorization == f"Bearer {TOKEN}"
    assert request.body == {"service": "wyoming", "config": {"uri": "tcp://a0d7b954-edge-asr:10300"}}


@pytest.mark.fast
def test_a_failed_announcement_is_retried_within_a_bound(supervisor: StandInSupervisor) -> None:
    error = (503, {"result": "error", "message": "System is not ready with state: setup"})
    supervisor.answers[("POST", "/discovery")][:0] = [error, error]

    assert run.announce(supervisor.url, TOKEN, "tcp://edge-asr:10300", attempts=4, first_s=0.01)
    assert len(supervisor.of("POST", "/discovery")) == 3

    supervisor.answers[("POST", "/discovery")] = [error]
    assert not run.announce(supervisor.url, TOKEN, "tcp://edge-asr:10300", attempts=3, first_s=0.01)
    assert len(supervisor.of("POST", "/discovery")) == 3 + 3


@pytest.mark.fast
def test_a_forbidden_announcement_is_not_retried(supervisor: StandInSupervisor) -> None:
    message = "Apps must list services they provide via discovery in their config!"
    supervisor.answers[("POST", "/discovery")] = [(403, {"result": "error", "message": message})]

    assert not run.announce(supervisor.url, TOKEN, "tcp://edge-asr:10300", attempts=5, first_s=0.01)
    assert len(supervisor.of("POST", "/discovery")) == 1


@pytest.mark.fast
def test_nothing_listening_is_no_announcement_and_no_exception() -> None:
    from edge_asr.bench.processes import free_port

    assert not run.announce(f"http://127.0.0.1:{free_port()}", TOKEN, "tcp://edge-asr:10300", attempts=2, first_s=0.01)


@pytest.mark.fast
@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe not JSON", b"[1, 2]", b'{"result": "ok", "data": "' + b"x" * (1024 * 1024) + b'"}'],
    ids=["not-json", "not-an-object", "too-large"],
)
def test_a_supervisor_that_answers_garbage_is_no_announcement_and_no_exception(
    supervisor: StandInSupervisor, body: bytes
) -> None:
    supervisor.answers[("POST", "/discovery")] = [(200, body)]

    assert not run.announce(supervisor.url, TOKEN, "tcp://edge-asr:10300", attempts=2, first_s=0.01)
    assert len(supervisor.of("POST", "/discovery")) == 2


@pytest.mark.fast
def test_a_supervisor_that_says_nothing_is_given_up_within_the_request_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run, "REQUEST_TIMEOUT_S", 0.3)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections (backlog), never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert not run.announce(url, TOKEN, "tcp://edge-asr:10300", attempts=2, first_s=0.01)
        with pytest.raises(run.SupervisorError, match="timed out"):
            run.mqtt_service(url, TOKEN, attempts=1, first_s=0.01)


@pytest.mark.fast
def test_mqtt_comes_from_the_supervisors_service(supervisor: StandInSupervisor) -> None:
    service = {
        "host": "core-mosquitto",
        "port": 1883,
        "ssl": False,
        "protocol": "3.1.1",
        "username": "addons",
        "password": "generated",
        "addon": "core_mosquitto",
    }
    supervisor.answers[("GET", "/services/mqtt")] = [(200, {"result": "ok", "data": service})]
    options = run.check_options({**addon_config()["options"], "mqtt": True, "names_from_home_assistant": False})

    broker = run.mqtt_service(supervisor.url, TOKEN)
    settings = build_settings(run.service_config(options, broker=broker), environ={})

    [request] = supervisor.of("GET", "/services/mqtt")
    assert request.authorization == f"Bearer {TOKEN}"
    assert settings.mqtt.enabled
    assert (settings.mqtt.host, settings.mqtt.port) == ("core-mosquitto", 1883)
    assert (settings.mqtt.username, settings.mqtt.password) == ("addons", "generated")
    assert (settings.mqtt.protocol, settings.mqtt.tls) == ("3.1.1", False)
    assert settings.mqtt.topic_prefix == "edge_asr"


@pytest.mark.fast
def test_no_mqtt_service_is_a_clear_error_after_some_patience(supervisor: StandInSupervisor) -> None:
    with pytest.raises(run.SupervisorError, match="HTTP 400 Service not enabled"):
        run.mqtt_service(supervisor.url, TOKEN, attempts=3, first_s=0.01)
    assert len(supervisor.of("GET", "/services/mqtt")) == 3

    refusal = {"result": "error", "message": "No access to mqtt service!"}
    supervisor.answers[("GET", "/services/mqtt")] = [(403, refusal)]
    with pytest.raises(run.SupervisorError, match="HTTP 403"):
        run.mqtt_service(supervisor.url, TOKEN, attempts=3, first_s=0.01)
    assert len(supervisor.of("GET", "/services/mqtt")) == 4


@pytest.mark.fast
def test_the_options_own_broker_wins_over_the_service(token_file: str) -> None:
    options, _ = every_option(token_file)
    broker = {"host": "core-mosquitto", "port": 1883, "username": "addons", "password": "generated"}
    config = run.service_config(run.check_options(options), token_file=token_file, broker=broker)

    assert config["mqtt"]["host"] == "broker.lan"
    assert config["mqtt"]["username"] == "asr"


@pytest.mark.fast
def test_the_service_gets_no_token_and_no_overriding_variables() -> None:
    env = run.service_environment(
        {
            "PATH": "/opt/edge-asr/bin:/usr/bin",
            "SUPERVISOR_TOKEN": TOKEN,
            "HASSIO_TOKEN": TOKEN,
            "EDGE_ASR_MODEL_DOWNLOAD_DIR": "/elsewhere",
            "WHISPER_MODEL": "large-v3",
            "TZ": "Europe/Berlin",
        }
    )

    assert env["PATH"] == "/opt/edge-asr/bin:/usr/bin"
    assert env["TZ"] == "Europe/Berlin"
    assert TOKEN not in env.values()
    assert not any(name.startswith("EDGE_ASR_") or name == "WHISPER_MODEL" for name in env)
    assert env["HF_HOME"].startswith("/data/models")


# --- Image: the add-on built on the service image, run as the Supervisor runs it -------------------------------------

ADDON_TAG = "localhost/edge-asr-addon:test"
ENTRYPOINT = ["/opt/edge-asr/bin/python", "/usr/lib/edge-asr-addon/run.py"]
SERVICE_UID = 10001
START_S = 180.0
CLIP = "cmd_piper_joe_03"


@pytest.fixture(scope="module")
def addon_image(service_image: str) -> str:
    """The add-on image, built from addon/ alone (the Supervisor's build context) on the service image."""
    from .image import build_image

    return build_image(ADDON, ADDON_TAG, {"BUILD_FROM": service_image})


@contextlib.contextmanager
def core_behind_the_proxy(supervisor: StandInSupervisor) -> Iterator[Any]:
    """A fake Home Assistant (tests/test_homeassistant.py) behind the stand-in's /core/api/websocket, taking the
    add-on's Supervisor token; it runs in an event loop of its own thread."""
    from .test_homeassistant import FakeHomeAssistant

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    core = FakeHomeAssistant()
    core.token = TOKEN
    asyncio.run_coroutine_threadsafe(core.start(), loop).result(10)
    supervisor.core_port = core.port
    try:
        yield core
    finally:
        asyncio.run_coroutine_threadsafe(core.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def service_process(http_port: int) -> int:
    """The pid of the add-on's `edge-asr serve` (the one whose environment names this test's HTTP port)."""
    marker = f"ADDON_HTTP_PORT={http_port}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmdline and marker in environ:
            return int(entry.name)
    raise AssertionError(f"no edge-asr serve process with {marker.decode()}")


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def wait_health(port: int, accept: Any, timeout_s: float = 30.0) -> dict[str, Any]:
    """/health once `accept` takes it; AssertionError with the last one after `timeout_s`."""
    import time

    from edge_asr.bench.processes import http_get

    deadline = time.monotonic() + timeout_s
    while True:
        _, health = http_get(f"http://127.0.0.1:{port}/health")
        if isinstance(health, dict) and accept(health):
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"/health did not get there within {timeout_s} s: {health}")
        time.sleep(0.2)


def component(health: Mapping[str, Any], name: str) -> str:
    return next((str(c["state"]) for c in health["components"] if c["name"] == name), "")


@pytest.mark.image
def test_the_addon_image_runs_the_service_as_the_supervisor_would(
    addon_image: str, supervisor: StandInSupervisor, tmp_path: Path
) -> None:
    from edge_asr.bench.processes import free_port, http_get, make_broker
    from edge_asr.bench.scoring import normalize
    from edge_asr.bench.wyoming_client import transcribe, transcript_text

    from .broker import subscribed
    from .image import image_config, process_ids, run_image
    from .speech import read_pcm, reference
    from .test_homeassistant import EXPECTED

    config = image_config(addon_image)
    assert config.user in ("root", "0", "0:0")
    assert list(config.entrypoint) == ENTRYPOINT
    assert not config.cmd

    data = tmp_path / "data"
    data.mkdir()
    # As the Supervisor writes it: every option, optional ones left out when unset; values other than the defaults.
    options = {
        **addon_config()["options"],
        "threads": 1,
        "vocabulary": ["Elowen", "Quillo fan"],
        "silence_ms": 500,
        "max_sessions": 3,
        "max_utterance_s": 20.0,
        "idle_timeout_s": 60.0,
        "mqtt": True,
        "mqtt_topic_prefix": "voice",
        "log_level": "debug",
    }
    (data / "options.json").write_text(json.dumps(options), encoding="utf-8")
    (data / "options.json").chmod(0o600)  # root's, as the Supervisor leaves it
    broker = make_broker(tmp_path)
    service = {"host": "127.0.0.1", "port": broker.port, "ssl": False, "protocol": "3.1.1"}
    supervisor.answers[("GET", "/services/mqtt")] = [
        (200, {"result": "ok", "data": {**service, "username": "addons", "password": "generated"}})
    ]
    wyoming_port, http_port = free_port(), free_port()
    env = {
        "SUPERVISOR_TOKEN": TOKEN,
        "SUPERVISOR_API": supervisor.url,
        "ADDON_WYOMING_PORT": str(wyoming_port),
        "ADDON_HTTP_PORT": str(http_port),
        # What the service would take over the options file: the run script keeps it from the service.
        "EDGE_ASR_STREAM_SILENCE_MS": "900",
    }
    with core_behind_the_proxy(supervisor) as core, subscribed(broker.port, topics=("voice/#",)) as subscriber:
        running = run_image(addon_image, user=config.user, env=env, volumes={data: "/data"})
        stopped = False
        try:
            running.wait_ready(http_port, START_S)

            # The service runs as its own user, without root's groups; the run script stays root.
            assert process_ids(running.pid()) == (0, 0)
            pid = service_process(http_port)
            fields = status_fields(pid)
            assert fields["Uid"].split() == [str(SERVICE_UID)] * 4
            assert fields["Gid"].split() == [str(SERVICE_UID)] * 4
            assert fields["Groups"] == ""
            # Its configuration: the options on their keys, in a file it may read and not change.
            root = Path(f"/proc/{pid}/root")
            written = root / "run/edge-asr/config.yaml"
            facts = written.stat()
            assert (facts.st_uid, facts.st_gid, stat.S_IMODE(facts.st_mode)) == (0, SERVICE_UID, 0o640)
            token = (root / "run/edge-asr/supervisor-token").stat()
            assert (token.st_uid, token.st_gid, stat.S_IMODE(token.st_mode)) == (0, SERVICE_UID, 0o440)
            settings = json.loads(written.read_text(encoding="utf-8"))
            assert settings["stream"]["silence_ms"] == 500
            assert settings["model"]["vocabulary"] == ["Elowen", "Quillo fan"]
            assert settings["limits"]["idle_timeout_s"] == 60.0
            assert settings["model"]["download_dir"] == "/data/models"
            models = (data / "models").stat()
            assert (models.st_uid, models.st_gid) == (SERVICE_UID, SERVICE_UID)
            assert b"EDGE_ASR_STREAM_SILENCE_MS=900" not in Path(f"/proc/{pid}/environ").read_bytes()
            assert TOKEN.encode() not in Path(f"/proc/{pid}/environ").read_bytes()

            # The options took effect: /health, and the names from Home Assistant through the Supervisor's proxy.
            health = wait_health(
                http_port,
                lambda h: component(h, "homeassistant").startswith("connected") and component(h, "mqtt") == "connected",
            )
            assert (health["max_sessions"], health["threads"], health["model"]) == (3, 1, "tiny.en")
            assert component(health, "homeassistant") == f"connected ({len(EXPECTED)} names)"
            assert supervisor.of("GET", "/core/api/websocket")
            assert core.paths[0] == "/api/websocket"

            # Discovery: announced once ready, with the token, for the Wyoming port.
            [announced] = supervisor.wait_for("POST", "/discovery", 30)
            assert announced.authorization == f"Bearer {TOKEN}"
            # The container's host name: the name Home Assistant reaches an add-on by on the Supervisor's network.
            hostname = running.exec([ENTRYPOINT[0], "-c", "import socket; print(socket.gethostname())"])
            assert hostname.returncode == 0, hostname.stderr
            assert announced.body == {
                "service": "wyoming",
                "config": {"uri": f"tcp://{hostname.stdout.strip()}:{wyoming_port}"},
            }
            [asked] = supervisor.of("GET", "/services/mqtt")
            assert asked.authorization == f"Bearer {TOKEN}"

            # A transcript over Wyoming, and its final on the broker the Supervisor named.
            # (Whisper's English normaliser, the bench's: with the names in its prompt the model may write "72".)
            received, _ = asyncio.run(transcribe(wyoming_port, read_pcm(CLIP)))
            assert normalize(transcript_text(received)) == normalize(reference(CLIP))
            final = subscriber.on("voice/default/final")
            assert normalize(final.json()["text"]) == normalize(reference(CLIP))
            assert subscriber.on("voice/status").payload == "online"
            status, _ = http_get(f"http://127.0.0.1:{http_port}/health/ready")
            assert status == 200

            code = running.stop(30)
            stopped = True
            assert code == 0, running.logs()
        finally:
            if not stopped:
                running.stop(30)
            broker.stop()
        logs = running.logs()
    assert " DEBUG " in logs
    assert "announced tcp://" in logs
    assert TOKEN not in logs
    assert "edge-asr exited with status 0" in logs


@pytest.mark.fast
def test_options_from_before_mqtt_partials_keep_the_partials(token_file: str) -> None:
    options, token_path = every_option(token_file)
    del options["mqtt_partials"]
    config = run.service_config(run.check_options(options), supervisor="http://supervisor", token_file=token_path)

    assert build_settings(json.loads(json.dumps(config)), environ={}).mqtt.partials
