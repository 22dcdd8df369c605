"""Unit tests for settings layering and validation in edge_asr.config."""

from __future__ import annotations

import logging
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_asr.api import InvalidSite, SessionRequest
from edge_asr.config import (
    ConfigError,
    HttpSettings,
    LimitSettings,
    ModelSettings,
    MqttSettings,
    ServiceSettings,
    Settings,
    SiteSettings,
    StreamSettings,
    WyomingSettings,
    _build_section,
    _converter,
    _section_keys,
    build_settings,
    env_overrides,
    load_settings,
    parse_assignments,
    read_yaml,
)
from edge_asr.engine import Engine

from .fakes import ScriptedTranscriber

pytestmark = pytest.mark.fast


def write(tmp_path: Path, text: str) -> Path:
    """A YAML config file with that text."""
    path = tmp_path / "edge-asr.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*layers: dict[str, Any]) -> str:
    """The message of the ConfigError that building these layers raises."""
    with pytest.raises(ConfigError) as caught:
        build_settings(*layers)
    return str(caught.value)


# --- defaults ------------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings(None, environ={})
    assert settings == Settings()
    assert settings.model.name == "tiny.en"
    assert settings.model.compute_type == "int8"
    assert settings.model.language == "en"
    assert settings.model.beam_size == 1
    assert settings.stream.silence_ms == 350
    assert settings.stream.cycle_ms == 250
    assert settings.stream.overlap_ms == 150
    assert settings.stream.prompt_chars == 200
    assert settings.http.enabled is True
    assert settings.http.port == 8787
    assert settings.log_level == "INFO"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.http.port = 1  # type: ignore[misc]


def test_effective_threads_and_workers_are_at_least_one() -> None:
    assert ModelSettings(threads=3).effective_threads == 3
    assert ModelSettings().effective_threads >= 1
    assert ModelSettings(workers=2).effective_workers == 2
    assert ModelSettings().effective_workers >= 1


# --- YAML file -----------------------------------------------------------------------------------


def test_yaml_file_overrides_defaults_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model:\n  name: base.en\n  threads: 2\nstream:\n  silence_ms: 500\nhttp:\n  enabled: no\nlog_level: debug\n",
    )
    settings = load_settings(path, environ={})
    assert settings.model.name == "base.en"
    assert settings.model.threads == 2
    assert settings.model.compute_type == "int8"
    assert settings.stream.silence_ms == 500
    assert settings.stream.cycle_ms == 250
    assert settings.http.enabled is False
    assert settings.http.port == 8787
    assert settings.log_level == "DEBUG"


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing set\n"), environ={}) == Settings()


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: 9100\n")
    settings = load_settings(None, environ={"EDGE_ASR_CONFIG": str(path)})
    assert settings.http.port == 9100


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_settings(missing, environ={})


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: 80\n  host: [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        read_yaml(path)
    message = str(caught.value)
    assert str(path) in message
    assert "YAML" in message
    assert "line" in message


@pytest.mark.parametrize("text", ["- model\n- stream\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping_names_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(path) in str(caught.value)
    assert "mapping" in str(caught.value)


def test_yaml_unknown_key_names_section_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "stream:\n  silense_ms: 300\n")
    with pytest.raises(ConfigError, match=r"stream\.silense_ms"):
        load_settings(path, environ={})


# --- environment -----------------------------------------------------------------------------


def test_env_overrides_port_threads_and_whisper_model() -> None:
    environ = {
        "EDGE_ASR_HTTP_PORT": "9000",
        "EDGE_ASR_MODEL_THREADS": "3",
        "WHISPER_MODEL": "small.en",
        "PATH": "/usr/bin",
        "HOME": "/root",
    }
    settings = load_settings(None, environ=environ)
    assert settings.http.port == 9000
    assert settings.model.threads == 3
    assert settings.model.name == "small.en"
    assert settings.stream == StreamSettings()


def test_env_bool_and_float_and_log_level() -> None:
    settings = load_settings(
        None,
        environ={
            "EDGE_ASR_HTTP_ENABLED": "false",
            "EDGE_ASR_STREAM_MIN_WINDOW_S": "1.5",
            "EDGE_ASR_LOG_LEVEL": "warning",
        },
    )
    assert settings.http.enabled is False
    assert settings.stream.min_window_s == 1.5
    assert settings.log_level == "WARNING"


def test_env_layer_shape() -> None:
    assert env_overrides({"EDGE_ASR_HTTP_PORT": "9000", "WHISPER_MODEL": "base.en", "OTHER": "x"}) == {
        "http": {"port": "9000"},
        "model": {"name": "base.en"},
    }
    assert env_overrides({}) == {}


def test_env_unknown_section_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="EDGE_ASR_MQQT_HOST"):
        env_overrides({"EDGE_ASR_MQQT_HOST": "broker"})


def test_env_unknown_key_names_section_and_key() -> None:
    with pytest.raises(ConfigError, match=r"http\.prot"):
        load_settings(None, environ={"EDGE_ASR_HTTP_PROT": "9000"})


def test_env_bad_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"http\.port"):
        load_settings(None, environ={"EDGE_ASR_HTTP_PORT": "eighty"})


# --- CLI --set -----------------------------------------------------------------------------------


def test_parse_assignments() -> None:
    layer = parse_assignments(["http.port=1234", "model.name=/models/a=b", "log_level=error"])
    assert layer == {"http": {"port": "1234"}, "model": {"name": "/models/a=b"}, "log_level": "error"}
    settings = build_settings(layer)
    assert settings.http.port == 1234
    assert settings.model.name == "/models/a=b"
    assert settings.log_level == "ERROR"


@pytest.mark.parametrize("item", ["http.port", "port=80", "=80"])
def test_malformed_assignment_names_the_item(item: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_assignments([item])
    assert item in str(caught.value)


def test_assignment_unknown_key_names_it() -> None:
    with pytest.raises(ConfigError, match=r"model\.thread\b"):
        build_settings(parse_assignments(["model.thread=2"]))


# --- layering ------------------------------------------------------------------------------------


def test_later_layers_win(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: 1000\n  host: 127.0.0.1\nmodel:\n  name: base.en\n")
    environ = {"EDGE_ASR_HTTP_PORT": "2000", "WHISPER_MODEL": "small.en"}
    cli = parse_assignments(["http.port=3000"])
    assert load_settings(path, environ={}).http.port == 1000
    assert load_settings(path, environ=environ).http.port == 2000
    settings = load_settings(path, environ=environ, cli_layer=cli)
    assert settings.http.port == 3000
    # Keys a later layer does not set survive from earlier ones, section by section.
    assert settings.http.host == "127.0.0.1"
    assert settings.model.name == "small.en"


def test_later_layer_can_fix_an_earlier_bad_value() -> None:
    assert build_settings({"http": {"port": "x"}}, {"http": {"port": 80}}).http.port == 80


# --- validation: every error names the key --------------------------------------------------------


def test_unknown_section_names_it() -> None:
    message = config_error({"mqqt": {"host": "x"}})
    assert message.startswith("mqqt")
    assert "unknown section" in message


def test_unknown_key_names_section_and_key() -> None:
    message = config_error({"stream": {"cycle": 100}})
    assert message.startswith("stream.cycle")
    assert "unknown key" in message


def test_section_that_is_not_a_mapping_names_it() -> None:
    assert config_error({"http": 8080}).startswith("http")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("http", "port", "eighty"),
        ("http", "port", 80.5),
        ("http", "port", True),
        ("http", "enabled", "maybe"),
        ("http", "enabled", 2),
        ("stream", "min_window_s", "soon"),
        ("stream", "min_window_s", False),
        ("model", "name", ["tiny.en"]),
        ("model", "name", None),
        ("model", "threads", "2.5"),
    ],
)
def test_bad_type_names_the_key(section: str, key: str, value: Any) -> None:
    message = config_error({section: {key: value}})
    assert message.startswith(f"{section}.{key}:")
    assert "expected" in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("http", "port", 70000),
        ("http", "port", -1),
        ("stream", "silence_ms", 10),
        ("stream", "vad_aggressiveness", 4),
        ("stream", "max_window_s", 31.0),
        ("model", "beam_size", 0),
        ("limits", "max_utterance_s", "inf"),
        ("limits", "max_sessions", 0),
    ],
)
def test_out_of_range_names_the_key(section: str, key: str, value: Any) -> None:
    message = config_error({section: {key: value}})
    assert message.startswith(f"{section}.{key}:")
    assert "minimum" in message or "maximum" in message


@pytest.mark.parametrize(
    ("section", "key", "value"), [("limits", "max_utterance_s", math.nan), ("stream", "min_window_s", "nan")]
)
def test_nan_is_rejected_and_names_the_key(section: str, key: str, value: Any) -> None:
    """A float setting of NaN is not a number in range."""
    message = config_error({section: {key: value}})
    assert message.startswith(f"{section}.{key}:")


def test_yaml_nan_is_rejected(tmp_path: Path) -> None:
    """Same bug as above, through the YAML file: fails."""
    path = write(tmp_path, "limits:\n  max_utterance_s: .nan\n")
    with pytest.raises(ConfigError, match=r"limits\.max_utterance_s"):
        load_settings(path, environ={})


def test_bad_choice_names_the_key() -> None:
    message = config_error({"model": {"compute_type": "fp8"}})
    assert message.startswith("model.compute_type:")
    assert "int8" in message


def test_bad_log_level_names_the_key() -> None:
    assert config_error({"log_level": "loud"}).startswith("log_level:")


def test_valid_values_at_the_bounds_are_accepted() -> None:
    settings = build_settings(
        {"http": {"port": 65535}, "stream": {"silence_ms": 90, "vad_aggressiveness": 0}, "model": {"beam_size": 10}}
    )
    assert settings.http == HttpSettings(port=65535)
    assert settings.stream.silence_ms == 90
    assert settings.stream.vad_aggressiveness == 0
    assert settings.model.beam_size == 10


def test_numbers_given_as_strings_and_integral_floats_are_converted() -> None:
    settings = build_settings({"http": {"port": "8080"}, "limits": {"max_utterance_s": 20}, "model": {"threads": 4.0}})
    assert settings.http.port == 8080
    assert type(settings.http.port) is int
    assert settings.limits == LimitSettings(max_utterance_s=20.0)
    assert type(settings.limits.max_utterance_s) is float
    assert settings.model.threads == 4
    assert type(settings.model.threads) is int


# --- cross-field checks ------------------------------------------------------------------------


def test_min_window_above_max_window_is_rejected() -> None:
    message = config_error({"stream": {"min_window_s": 5.0, "max_window_s": 3.0}})
    assert message.startswith("stream.min_window_s:")
    assert "max_window_s" in message


def test_max_window_above_max_utterance_is_rejected() -> None:
    message = config_error({"stream": {"max_window_s": 20.0}, "limits": {"max_utterance_s": 10.0}})
    assert message.startswith("stream.max_window_s:")
    assert "max_utterance_s" in message


@pytest.mark.parametrize(("buffer_s", "utterance_s"), [(60.0, 120.0), (30.0, 30.0)])
def test_a_buffer_no_longer_than_an_utterance_is_rejected(buffer_s: float, utterance_s: float) -> None:
    message = config_error({"limits": {"max_buffer_s": buffer_s, "max_utterance_s": utterance_s}})
    assert message.startswith("limits.max_buffer_s:")
    assert "max_utterance_s" in message


def test_a_vocabulary_file_that_is_not_there_or_not_text_stops_start_up(tmp_path: Path) -> None:
    missing = config_error({"model": {"vocabulary_file": str(tmp_path / "names.txt")}})
    (tmp_path / "names.bin").write_bytes(b"\xff\xfe\x00names")
    binary = config_error({"model": {"vocabulary_file": str(tmp_path / "names.bin")}})
    (tmp_path / "names.txt").write_text("Elowen\n", encoding="utf-8")

    assert missing.startswith("model.vocabulary_file: cannot read")
    assert binary.startswith("model.vocabulary_file:")
    assert "UTF-8" in binary
    assert build_settings({"model": {"vocabulary_file": str(tmp_path / "names.txt")}}).model.vocabulary_file


def test_overlap_not_shorter_than_min_window_is_rejected() -> None:
    message = config_error({"stream": {"overlap_ms": 500, "min_window_s": 0.5}})
    assert message.startswith("stream.overlap_ms:")


def test_cross_field_check_sees_values_from_different_layers(tmp_path: Path) -> None:
    path = write(tmp_path, "stream:\n  max_window_s: 3\n")
    with pytest.raises(ConfigError, match=r"stream\.min_window_s"):
        load_settings(path, environ={"EDGE_ASR_STREAM_MIN_WINDOW_S": "5"})
    equal = load_settings(path, environ={"EDGE_ASR_STREAM_MIN_WINDOW_S": "3"})
    assert equal.stream.min_window_s == equal.stream.max_window_s == 3.0


def test_mqtt_settings_are_checked_by_name() -> None:
    assert build_settings({"mqtt": {"enabled": "true", "port": "8883"}}).mqtt.port == 8883
    assert config_error({"mqtt": {"protocol": "4"}}).startswith("mqtt.protocol:")
    assert config_error({"mqtt": {"queue_size": 0}}).startswith("mqtt.queue_size:")


def test_wyoming_uri_is_checked() -> None:
    assert build_settings({"wyoming": {"uri": "unix:///run/edge-asr.sock"}}).wyoming.uri.startswith("unix://")
    assert config_error({"wyoming": {"uri": "http://x:1"}}).startswith("wyoming.uri:")
    assert config_error({"wyoming": {"uri": "tcp://0.0.0.0"}}).startswith("wyoming.uri:")
    assert config_error({"wyoming": {"uri": "stdio://", "zeroconf": "edge-asr"}}).startswith("wyoming.zeroconf:")


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"http": {"allowed_networks": ["lan"]}}, "http.allowed_networks: 'lan' is not a network"),
        ({"http": {"trusted_proxies": ["10.0.0.1/33"]}}, "http.trusted_proxies: '10.0.0.1/33' is not a network"),
        ({"wyoming": {"allowed_networks": ["home"]}}, "wyoming.allowed_networks: 'home' is not a network"),
        ({"wyoming": {"trusted_proxies": ["10.0.0.300"]}}, "wyoming.trusted_proxies: '10.0.0.300' is not a network"),
    ],
)
def test_networks_are_checked_by_name(layer: dict[str, Any], message: str) -> None:
    assert config_error(layer) == f"{message} (CIDR, e.g. 192.168.1.0/24)"


@pytest.mark.parametrize("origin", ["hub.local", "ftp://hub.local", "http://hub.local/page"])
def test_an_allowed_origin_must_be_an_origin(origin: str) -> None:
    assert config_error({"http": {"allowed_origins": [origin]}}) == (
        f"http.allowed_origins: {origin!r} is not an origin (e.g. http://homeassistant.local:8123)"
    )
    assert build_settings({"http": {"allowed_origins": ["https://hub.local:8123/"]}}).http.allowed_origins


def test_node_names_are_checked_like_sites() -> None:
    assert config_error({"mqtt": {"nodes": ["node_a", "node b"]}}) == (
        "mqtt.nodes: 'node b' must be 1 to 64 letters, digits, '_' or '-'"
    )


def test_home_assistant_needs_a_url_and_a_token_only_when_named(tmp_path: Path) -> None:
    url = "http://homeassistant.local:8123"
    assert build_settings({"homeassistant": {"token_file": str(tmp_path / "nope")}}).homeassistant.url == ""
    assert config_error({"homeassistant": {"url": "homeassistant.local"}}) == (
        "homeassistant.url: 'homeassistant.local' is not a URL (e.g. http://homeassistant.local:8123)"
    )
    assert config_error({"homeassistant": {"url": url}}) == (
        "homeassistant.token_file: Home Assistant needs a long-lived access token"
    )
    assert build_settings({"homeassistant": {"url": url, "token": "inline"}}).homeassistant.token == "inline"


def test_a_section_checks_itself_naming_keys_as_the_user_wrote_them() -> None:
    written = {"sites.default": "mqtt.default_site", "sites.allowed": "mqtt.sites"}
    with pytest.raises(ConfigError, match=r"^mqtt\.default_site: 'attic' is not one of mqtt\.sites$"):
        SiteSettings(default="attic", allowed=("hall",)).checked({}, written)
    with pytest.raises(ConfigError, match=r"^wyoming\.uri: "):
        WyomingSettings(uri="http://x:1").checked({}, {})
    assert ServiceSettings().checked({}, {}) == ServiceSettings()


# --- sites, and the keys that moved there from mqtt ----------------------------------------------


def moves(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings edge_asr.config logged about moved keys."""
    return [r.getMessage() for r in caplog.records if r.name == "edge_asr.config" and r.levelno == logging.WARNING]


def test_sites_section_defaults_and_new_keys(caplog: pytest.LogCaptureFixture) -> None:
    assert Settings().sites == SiteSettings(default="default", allowed=())
    sites = build_settings({"sites": {"default": "hall", "allowed": ["hall", "kitchen"]}}).sites
    assert sites == SiteSettings(default="hall", allowed=("hall", "kitchen"))
    environ = {"EDGE_ASR_SITES_ALLOWED": "hall, default"}
    assert load_settings(None, environ=environ).sites.allowed == ("hall", "default")
    assert build_settings(parse_assignments(["sites.default=attic"])).sites.default == "attic"
    assert moves(caplog) == []


OLD_SITES = {"mqtt": {"sites": ["hall", "kitchen"], "default_site": "hall"}}
NEW_SITES = SiteSettings(default="hall", allowed=("hall", "kitchen"))
MOVE_MESSAGES = [
    "mqtt.default_site moved to sites.default; the old name still works, but set sites.default instead",
    "mqtt.sites moved to sites.allowed; the old name still works, but set sites.allowed instead",
]


def test_old_site_keys_in_the_file_land_on_the_new_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "mqtt:\n  port: 1884\n  sites: [hall, kitchen]\n  default_site: hall\n")
    settings = load_settings(path, environ={})
    assert settings.sites == NEW_SITES
    assert settings.mqtt.port == 1884  # the rest of the section is untouched
    assert sorted(moves(caplog)) == MOVE_MESSAGES


def test_old_site_variables_land_on_the_new_keys(caplog: pytest.LogCaptureFixture) -> None:
    environ = {"EDGE_ASR_MQTT_SITES": "hall,kitchen", "EDGE_ASR_MQTT_DEFAULT_SITE": "hall"}
    assert env_overrides(environ) == {"mqtt": {"sites": "hall,kitchen", "default_site": "hall"}}
    assert load_settings(None, environ=environ).sites == NEW_SITES
    assert sorted(moves(caplog)) == MOVE_MESSAGES


def test_old_site_assignments_land_on_the_new_keys(caplog: pytest.LogCaptureFixture) -> None:
    cli = parse_assignments(["mqtt.sites=hall,kitchen", "mqtt.default_site=hall"])
    assert load_settings(None, environ={}, cli_layer=cli).sites == NEW_SITES
    assert sorted(moves(caplog)) == MOVE_MESSAGES


def test_an_old_key_used_in_several_layers_logs_its_move_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "mqtt:\n  default_site: hall\n")
    cli = parse_assignments(["mqtt.default_site=attic"])
    settings = load_settings(path, environ={"EDGE_ASR_MQTT_DEFAULT_SITE": "kitchen"}, cli_layer=cli)
    assert settings.sites.default == "attic"
    assert moves(caplog) == [MOVE_MESSAGES[0]]


def test_a_later_layer_overrides_whichever_name_each_used(tmp_path: Path) -> None:
    # The shipped file names the new key; an old name set for it in the environment or by --set still wins.
    path = write(tmp_path, "sites:\n  default: default\n  allowed: []\n")
    environ = {"EDGE_ASR_MQTT_SITES": "hall"}
    cli = parse_assignments(["mqtt.default_site=hall"])
    assert load_settings(path, environ=environ, cli_layer=cli).sites == SiteSettings(default="hall", allowed=("hall",))
    file_then_env = load_settings(write(tmp_path, "mqtt:\n  sites: [hall]\n"), environ={"EDGE_ASR_SITES_ALLOWED": ""})
    assert file_then_env.sites.allowed == ()


def test_old_and_new_name_with_different_values_is_an_error_naming_both() -> None:
    message = config_error({"mqtt": {"sites": ["hall"]}, "sites": {"allowed": ["kitchen"]}})
    assert message.startswith("mqtt.sites and sites.allowed: both set, to different values")
    assert "keep only sites.allowed" in message
    environ = {"EDGE_ASR_MQTT_DEFAULT_SITE": "hall", "EDGE_ASR_SITES_DEFAULT": "attic"}
    with pytest.raises(ConfigError, match=r"^mqtt\.default_site and sites\.default: both set"):
        load_settings(None, environ=environ)


def test_old_and_new_name_with_the_same_value_is_accepted(caplog: pytest.LogCaptureFixture) -> None:
    cli = parse_assignments(["mqtt.sites=hall,default", "sites.allowed=hall, default"])
    assert build_settings(cli).sites.allowed == ("hall", "default")
    assert moves(caplog) == [MOVE_MESSAGES[1]]


@pytest.mark.parametrize(
    ("layer", "start"),
    [
        ({"sites": {"default": "a/b"}}, "sites.default: 'a/b' must be 1 to 64"),
        ({"mqtt": {"default_site": "a/b"}}, "mqtt.default_site: 'a/b' must be 1 to 64"),
        ({"sites": {"allowed": ["hall", "x" * 65]}, "mqtt": {"default_site": "hall"}}, "sites.allowed: 'xxx"),
        ({"mqtt": {"sites": "hall,+"}, "sites": {"default": "hall"}}, "mqtt.sites: '+' must be 1 to 64"),
        ({"sites": {"allowed": ["hall"]}}, "sites.default: 'default' is not one of sites.allowed"),
        ({"mqtt": {"sites": ["hall"]}}, "sites.default: 'default' is not one of mqtt.sites"),
        ({"mqtt": {"sites": ["hall"], "default_site": "attic"}}, "mqtt.default_site: 'attic' is not one of mqtt.sites"),
        ({"mqtt": {"sites": 3}}, "mqtt.sites: expected a list of strings, got 3"),
        ({"sites": {"default": ["hall"]}}, "sites.default: expected str, got ['hall']"),
    ],
)
def test_site_errors_name_the_key_the_user_wrote(layer: dict[str, Any], start: str) -> None:
    assert config_error(layer).startswith(start)


def test_a_later_layer_decides_which_name_a_message_gives() -> None:
    message = config_error({"mqtt": {"default_site": "a/b"}}, {"sites": {"default": "b/c"}})
    assert message.startswith("sites.default: 'b/c'")
    message = config_error({"sites": {"default": "a/b"}}, {"mqtt": {"default_site": "b/c"}})
    assert message.startswith("mqtt.default_site: 'b/c'")


def test_the_sites_section_must_be_a_mapping_when_an_old_key_moves_into_it() -> None:
    assert config_error({"mqtt": {"sites": ["hall"]}, "sites": 3}).startswith("sites: must be a mapping of keys")
    assert build_settings({"mqtt": {"default_site": "hall"}, "sites": None}).sites.default == "hall"


def test_moved_keys_are_not_mqtt_keys_any_more() -> None:
    assert not hasattr(MqttSettings(), "sites")
    assert not hasattr(MqttSettings(), "default_site")
    assert "sites" not in config_error({"mqtt": {"site": "x"}}).partition("known:")[2].split(", ")


async def test_the_engine_checks_sites_from_an_old_key_with_mqtt_disabled() -> None:
    settings = build_settings({"model": {"threads": 1, "workers": 1}, "mqtt": {"enabled": False, **OLD_SITES["mqtt"]}})
    engine = Engine(settings, ScriptedTranscriber)
    await engine.start()
    try:
        with pytest.raises(InvalidSite, match=r"^site 'attic' is not one of sites\.allowed$"):
            engine.session(SessionRequest("test", site="attic"))
        async with engine.session(SessionRequest("test")) as session:
            assert session.info.site == "hall"
    finally:
        await engine.stop()


# --- MQTT: topics and the files the adapter reads -------------------------------------------------


@pytest.mark.parametrize("key", ["topic_prefix", "discovery_prefix"])
@pytest.mark.parametrize("value", ["", "///", "home/+/asr", "asr/#", "asr\0x"])
def test_bad_topic_prefix_names_the_key_even_when_mqtt_is_disabled(key: str, value: str) -> None:
    message = config_error({"mqtt": {"enabled": False, key: value}})
    assert message.startswith(f"mqtt.{key}: {value!r} ")
    assert "'+', '#' or NUL" in message


def test_topic_prefixes_lose_their_outer_slashes() -> None:
    mqtt = build_settings({"mqtt": {"topic_prefix": "/home/asr/", "discovery_prefix": "ha/"}}).mqtt
    assert (mqtt.topic_prefix, mqtt.discovery_prefix) == ("home/asr", "ha")


def mqtt_error(tmp_path: Path, environ: dict[str, str] | None = None, **mqtt: Any) -> str:
    """The message of the ConfigError that an enabled MQTT section with these keys raises."""
    with pytest.raises(ConfigError) as caught:
        build_settings({"mqtt": {"enabled": True, **mqtt}}, environ=environ or {})
    return str(caught.value)


def enabled_mqtt(environ: dict[str, str] | None = None, **mqtt: Any) -> MqttSettings:
    """The MQTT settings an enabled section with these keys gives."""
    return build_settings({"mqtt": {"enabled": True, **mqtt}}, environ=environ or {}).mqtt


def test_missing_password_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert mqtt_error(tmp_path, password_file=str(missing)) == (
        f"mqtt.password_file: cannot read {missing}: No such file or directory"
    )


@pytest.mark.parametrize("text", ["", "\n", "   \nsecret on the second line\n"])
def test_empty_password_file_names_the_key(tmp_path: Path, text: str) -> None:
    path = tmp_path / "password"
    path.write_text(text, encoding="utf-8")
    message = mqtt_error(tmp_path, password_file=str(path))
    assert message.startswith(f"mqtt.password_file: {path} is empty")


def test_password_file_that_is_not_text_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_bytes(b"\xff\xfe\x00binary\n")
    assert mqtt_error(tmp_path, password_file=str(path)).startswith("mqtt.password_file:")


def test_password_is_read_from_the_first_line_of_the_file_and_wins(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("  s3cret-from-file \r\nsecond line\n", encoding="utf-8")
    settings = build_settings(
        {"mqtt": {"enabled": True, "password": "inline-pass", "password_file": str(path)}}, environ={}
    )
    assert settings.mqtt.password == "s3cret-from-file"
    assert settings.mqtt.password_file == str(path)


def test_the_password_is_not_in_the_repr(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("s3cret-from-file\n", encoding="utf-8")
    from_file = build_settings({"mqtt": {"enabled": True, "password_file": str(path)}}, environ={})
    inline = build_settings({"mqtt": {"password": "inline-pass"}})
    assert from_file.mqtt.password == "s3cret-from-file"
    assert inline.mqtt.password == "inline-pass"
    for text in (repr(from_file), str(from_file), repr(inline)):
        assert "s3cret-from-file" not in text
        assert "inline-pass" not in text
    assert "password_file=" in repr(from_file)  # the repr itself still shows the other MQTT keys


def test_a_bad_password_value_is_not_echoed() -> None:
    message = config_error({"mqtt": {"password": ["hunter2"]}})
    assert message.startswith("mqtt.password: expected str")
    assert "hunter2" not in message


def test_a_disabled_adapters_files_are_not_read(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    mqtt = build_settings(
        {"mqtt": {"password_file": missing, "tls": True, "ca_file": missing, "key_file": missing}}, environ={}
    ).mqtt
    assert mqtt.password == ""
    assert mqtt.ca_file == missing


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its unencrypted key, made by `openssl req`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=test", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate and its key (made once: RSA key generation takes a moment)."""
    return make_cert(tmp_path_factory.mktemp("tls"), "client")


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key that belongs to no certificate of cert_pair."""
    return make_cert(tmp_path_factory.mktemp("other"), "other")[1]


def test_a_real_certificate_and_key_are_accepted(cert_pair: tuple[Path, Path]) -> None:
    cert, key = cert_pair
    mqtt = enabled_mqtt(tls=True, ca_file=str(cert), cert_file=str(cert), key_file=str(key))
    assert (mqtt.ca_file, mqtt.cert_file, mqtt.key_file) == (str(cert), str(cert), str(key))


def test_a_key_inside_the_certificate_file_is_accepted(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    cert, key = cert_pair
    both = tmp_path / "both.pem"
    both.write_text(cert.read_text() + key.read_text())
    assert enabled_mqtt(tls=True, cert_file=str(both)).cert_file == str(both)


def test_bad_ca_file_names_the_key(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    message = mqtt_error(tmp_path, tls=True, ca_file=str(garbage))
    assert message.startswith(f"mqtt.ca_file: {garbage} holds no CA certificate")
    missing = tmp_path / "nope.pem"
    assert mqtt_error(tmp_path, tls=True, ca_file=str(missing)) == (
        f"mqtt.ca_file: cannot read {missing}: No such file or directory"
    )


def test_bad_tls_files_are_only_checked_with_tls_on(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    assert enabled_mqtt(tls=False, ca_file=missing, cert_file=missing).ca_file == missing


def test_certificate_problems_name_the_right_key(tmp_path: Path, cert_pair: tuple[Path, Path], other_key: Path) -> None:
    cert, key = cert_pair
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    missing = tmp_path / "nope.pem"
    assert mqtt_error(tmp_path, tls=True, cert_file=str(garbage), key_file=str(key)).startswith(
        f"mqtt.cert_file: {garbage} holds no certificate"
    )
    assert mqtt_error(tmp_path, tls=True, cert_file=str(missing), key_file=str(key)).startswith(
        f"mqtt.cert_file: cannot read {missing}"
    )
    assert mqtt_error(tmp_path, tls=True, cert_file=str(cert), key_file=str(garbage)).startswith(
        f"mqtt.key_file: {garbage} holds no unencrypted private key"
    )
    assert mqtt_error(tmp_path, tls=True, cert_file=str(cert), key_file=str(missing)).startswith(
        f"mqtt.key_file: cannot read {missing}"
    )
    mismatch = mqtt_error(tmp_path, tls=True, cert_file=str(cert), key_file=str(other_key))
    assert mismatch.startswith(f"mqtt.key_file: {other_key} holds no unencrypted private key for mqtt.cert_file")
    assert "mismatch" in mismatch


def test_certificate_without_a_key_is_refused(cert_pair: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = cert_pair
    assert mqtt_error(tmp_path, tls=True, cert_file=str(cert)).startswith(
        f"mqtt.cert_file: {cert} holds no unencrypted private key"
    )
    assert mqtt_error(tmp_path, tls=True, key_file=str(key)).startswith("mqtt.key_file: needs mqtt.cert_file")


def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    cert, key = cert_pair
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:abcd", "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )
    assert mqtt_error(tmp_path, tls=True, cert_file=str(cert), key_file=str(encrypted)).startswith(
        f"mqtt.key_file: {encrypted} holds no unencrypted private key"
    )


def test_relative_credential_files_are_looked_up_in_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials, workdir = tmp_path / "credentials", tmp_path / "work"
    make_cert(credentials, "client")
    workdir.mkdir()
    (credentials / "mqtt-password").write_text("from-credentials\n")
    (workdir / "mqtt-password").write_text("from-workdir\n")
    monkeypatch.chdir(workdir)
    keys = {"password_file": "mqtt-password", "tls": True, "cert_file": "client-cert.pem", "key_file": "client-key.pem"}
    mqtt = enabled_mqtt({"CREDENTIALS_DIRECTORY": str(credentials)}, **keys)
    assert mqtt.password == "from-credentials"
    assert mqtt.password_file == str(credentials / "mqtt-password")
    assert (mqtt.cert_file, mqtt.key_file) == (
        str(credentials / "client-cert.pem"),
        str(credentials / "client-key.pem"),
    )
    # Without systemd's credentials a relative path is relative to the working directory.
    assert enabled_mqtt({}, password_file="mqtt-password").password == "from-workdir"
    # An absolute path is never redirected.
    absolute = str(workdir / "mqtt-password")
    assert enabled_mqtt({"CREDENTIALS_DIRECTORY": str(credentials)}, password_file=absolute).password == "from-workdir"
    # A credential that is not there is not looked for elsewhere.
    assert mqtt_error(tmp_path, {"CREDENTIALS_DIRECTORY": str(workdir)}, tls=True, cert_file="client-cert.pem") == (
        f"mqtt.cert_file: cannot read {workdir / 'client-cert.pem'}: No such file or directory"
    )


def test_load_settings_passes_its_environment_on(tmp_path: Path) -> None:
    (tmp_path / "mqtt-password").write_text("from-credentials\n")
    environ = {
        "EDGE_ASR_MQTT_ENABLED": "yes",
        "EDGE_ASR_MQTT_PASSWORD_FILE": "mqtt-password",
        "CREDENTIALS_DIRECTORY": str(tmp_path),
    }
    assert load_settings(None, environ=environ).mqtt.password == "from-credentials"


# --- HTTP and Home Assistant: the files they read -------------------------------------------------


def test_the_http_token_and_tls_files_are_looked_up_in_the_credentials_directory(
    tmp_path: Path, cert_pair: tuple[Path, Path]
) -> None:
    for source in cert_pair:
        (tmp_path / source.name).write_bytes(source.read_bytes())
    (tmp_path / "http-token").write_text("from-credentials\n")
    cert, key = (source.name for source in cert_pair)
    layer = {"http": {"token_file": "http-token", "tls_cert_file": cert, "tls_key_file": key}}
    http = build_settings(layer, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}).http
    assert http.token == "from-credentials"
    assert (http.token_file, http.tls_cert_file, http.tls_key_file) == (
        str(tmp_path / "http-token"),
        str(tmp_path / cert),
        str(tmp_path / key),
    )


def test_http_tls_problems_name_the_key(tmp_path: Path, cert_pair: tuple[Path, Path], other_key: Path) -> None:
    cert, key = cert_pair
    assert config_error({"http": {"tls_key_file": str(key)}}) == (
        "http.tls_cert_file: needs http.tls_key_file too (and the other way round)"
    )
    mismatch = config_error({"http": {"tls_cert_file": str(cert), "tls_key_file": str(other_key)}})
    assert mismatch.startswith(
        f"http.tls_key_file: {other_key} holds no unencrypted private key for http.tls_cert_file"
    )
    missing = tmp_path / "nope"
    assert config_error({"http": {"token_file": str(missing)}}) == (
        f"http.token_file: cannot read {missing}: No such file or directory"
    )


def test_a_disabled_listeners_files_are_not_read(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    http = build_settings({"http": {"enabled": False, "token_file": missing, "tls_key_file": missing}}).http
    assert (http.token, http.token_file) == ("", missing)


def test_the_home_assistant_token_is_read_from_the_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "ha-token").write_text("from-credentials\n")
    layer = {"homeassistant": {"url": "http://homeassistant.local:8123", "token_file": "ha-token"}}
    homeassistant = build_settings(layer, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}).homeassistant
    assert (homeassistant.token, homeassistant.token_file) == ("from-credentials", str(tmp_path / "ha-token"))


# --- field types -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A section with the field types no real setting uses yet."""

    limit: int | None = field(default=None, metadata={"low": 1, "high": 10})
    names: tuple[str, ...] = ()


def sample(values: dict[str, Any]) -> Sample:
    """Sample built from raw values the way a real section is."""
    return _build_section("sample", Sample, _section_keys(Sample), values)


def test_optional_int_takes_null_and_numbers() -> None:
    assert sample({"limit": None}).limit is None
    assert sample({"limit": 7}).limit == 7
    assert sample({"limit": " 7 "}).limit == 7
    assert sample({}).limit is None


@pytest.mark.parametrize(
    ("raw", "words"), [("", "expected int or null"), ("x", "expected int or null"), (11, "maximum")]
)
def test_optional_int_rejects_non_numbers_and_keeps_its_bounds(raw: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=r"^sample\.limit: ") as caught:
        sample({"limit": raw})
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (["a", " b ", "", "c"], ("a", "b", "c")),
        ("a, b,,c ,", ("a", "b", "c")),  # as the environment or --set give it
        ("http://x:1", ("http://x:1",)),
        ("", ()),
        ([], ()),
        ([10, "192.168.0.0/16"], ("10", "192.168.0.0/16")),
    ],
)
def test_string_tuple_takes_a_list_or_a_comma_separated_string(raw: Any, expected: tuple[str, ...]) -> None:
    assert sample({"names": raw}).names == expected


@pytest.mark.parametrize("raw", [None, True, 3, {"a": "b"}, ["a", ["b"]], ["a", None], [False]])
def test_string_tuple_rejects_other_values(raw: Any) -> None:
    with pytest.raises(ConfigError, match=r"^sample\.names: expected a list of strings, got "):
        sample({"names": raw})


@pytest.mark.parametrize("kind", [dict[str, int], list[str], int | str, tuple[str, int], tuple[int, ...], bytes, Any])
def test_an_unknown_field_type_fails_loudly(kind: Any) -> None:
    with pytest.raises(TypeError, match="no converter"):
        _converter(kind)


def test_an_unknown_field_type_names_the_field() -> None:
    @dataclass(frozen=True)
    class Bad:
        """A section with a field type the converter does not know."""

        weights: dict[str, int] = field(default_factory=dict)

    with pytest.raises(TypeError, match=r"^Bad\.weights: no converter for the field type dict\[str, int\]"):
        _section_keys(Bad)
