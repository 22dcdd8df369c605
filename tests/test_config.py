"""Unit tests for settings layering and validation in edge_asr.config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from edge_asr.config import (
    ConfigError,
    HttpSettings,
    LimitSettings,
    ModelSettings,
    Settings,
    StreamSettings,
    build_settings,
    env_overrides,
    load_settings,
    parse_assignments,
    read_yaml,
)


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
    assert settings.http.port == 8080 and type(settings.http.port) is int
    assert settings.limits == LimitSettings(max_utterance_s=20.0)
    assert type(settings.limits.max_utterance_s) is float
    assert settings.model.threads == 4 and type(settings.model.threads) is int


# --- cross-field checks ------------------------------------------------------------------------


def test_min_window_above_max_window_is_rejected() -> None:
    message = config_error({"stream": {"min_window_s": 5.0, "max_window_s": 3.0}})
    assert message.startswith("stream.min_window_s:")
    assert "max_window_s" in message


def test_max_window_above_max_utterance_is_rejected() -> None:
    message = config_error({"stream": {"max_window_s": 20.0}, "limits": {"max_utterance_s": 10.0}})
    assert message.startswith("stream.max_window_s:")
    assert "max_utterance_s" in message


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
