"""Settings: frozen dataclasses layered from defaults, the YAML file, the environment and CLI flags."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ENV_PREFIX = "EDGE_ASR_"
DEFAULT_CONFIG_PATH = Path("config/edge-asr.yaml")
INSTALLED_CONFIG_PATH = Path("/etc/edge-asr/config.yaml")


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""


def _setting(default: Any, low: float | None = None, high: float | None = None, choices: tuple[Any, ...] = ()) -> Any:
    return field(default=default, metadata={"low": low, "high": high, "choices": choices})


def default_threads() -> int:
    """Half the cores, at least one: leaves room for audio I/O and the adapters."""
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass(frozen=True)
class ModelSettings:
    """Which Whisper model to load and how to run it."""

    name: str = "tiny.en"
    compute_type: str = _setting("int8", choices=("int8", "int8_float32", "float32", "int16", "default"))
    threads: int = _setting(0, low=0, high=256)
    workers: int = _setting(0, low=0, high=16)
    language: str = "en"
    beam_size: int = _setting(1, low=1, high=10)
    encoder_floor_s: float = _setting(15.0, low=1.0, high=30.0)
    download_dir: str = ""
    warmup_s: float = _setting(0.5, low=0.0, high=5.0)

    @property
    def effective_threads(self) -> int:
        """Threads to use: the configured count, or half the cores when 0."""
        return self.threads or default_threads()

    @property
    def effective_workers(self) -> int:
        """Decodes that may run at once: the configured count, or as many as the cores hold."""
        return self.workers or max(1, (os.cpu_count() or 2) // self.effective_threads)


@dataclass(frozen=True)
class StreamSettings:
    """The streaming decoder: VAD, retranscribe cycle, window and prompt."""

    vad_aggressiveness: int = _setting(2, low=0, high=3)
    silence_ms: int = _setting(350, low=90, high=10_000)
    cycle_ms: int = _setting(250, low=50, high=5_000)
    overlap_ms: int = _setting(150, low=0, high=1_000)
    commit_margin_ms: int = _setting(1000, low=0, high=5_000)
    preroll_ms: int = _setting(300, low=0, high=1_000)
    min_window_s: float = _setting(1.0, low=0.2, high=10.0)
    max_window_s: float = _setting(15.0, low=2.0, high=30.0)
    prompt_chars: int = _setting(200, low=0, high=800)


@dataclass(frozen=True)
class LimitSettings:
    """Hard limits, each enforced: sessions, message size, utterance length."""

    max_sessions: int = _setting(8, low=1, high=1_000)
    max_frame_bytes: int = _setting(256 * 1024, low=320, high=16 * 1024 * 1024)
    max_utterance_s: float = _setting(30.0, low=1.0, high=600.0)
    idle_timeout_s: float = _setting(120.0, low=1.0, high=86_400.0)


@dataclass(frozen=True)
class HttpSettings:
    """The WebSocket/HTTP adapter."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = _setting(8787, low=0, high=65_535)


@dataclass(frozen=True)
class WyomingSettings:
    """The Wyoming adapter for Home Assistant and its voice satellites."""

    enabled: bool = True
    uri: str = "tcp://0.0.0.0:10300"
    zeroconf: str = ""


@dataclass(frozen=True)
class MqttSettings:
    """The MQTT adapter: every session's partials and finals, availability and Home Assistant discovery."""

    enabled: bool = False
    host: str = "localhost"
    port: int = _setting(1883, low=1, high=65_535)
    protocol: str = _setting("5", choices=("5", "3.1.1"))
    client_id: str = "edge-asr"
    username: str = ""
    password: str = ""
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: int = _setting(60, low=5, high=3_600)
    topic_prefix: str = "edge_asr"
    discovery_prefix: str = "homeassistant"
    default_site: str = "default"
    queue_size: int = _setting(1000, low=1, high=1_000_000)


@dataclass(frozen=True)
class Settings:
    """Every setting of the service."""

    model: ModelSettings = field(default_factory=ModelSettings)
    stream: StreamSettings = field(default_factory=StreamSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    wyoming: WyomingSettings = field(default_factory=WyomingSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    log_level: str = "INFO"


_SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "stream": StreamSettings,
    "limits": LimitSettings,
    "http": HttpSettings,
    "wyoming": WyomingSettings,
    "mqtt": MqttSettings,
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _convert(key: str, raw: Any, kind: type, meta: Mapping[str, Any]) -> Any:
    """Coerce one value to its field's type and check its bounds."""
    try:
        if kind is bool:
            if isinstance(raw, str):
                lowered = raw.strip().lower()
                if lowered not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                    raise ValueError(raw)
                value: Any = lowered in ("true", "yes", "on", "1")
            elif isinstance(raw, bool):
                value = raw
            else:
                raise ValueError(raw)
        elif kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            value = int(raw)
        elif kind is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            value = float(raw)
            if math.isnan(value):
                raise ValueError(raw)
        else:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError(raw)
            value = str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {raw!r}") from None
    low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices") or ()
    if low is not None and value < low:
        raise ConfigError(f"{key}: {value!r} is below the minimum {low}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: {value!r} is above the maximum {high}")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _build_section(name: str, values: Mapping[str, Any]) -> Any:
    cls = _SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
        kind = {"int": int, "float": float, "bool": bool, "str": str}[str(fields[key].type)]
        kwargs[key] = _convert(f"{name}.{key}", raw, kind, fields[key].metadata)
    return cls(**kwargs)


def _merge(layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            elif isinstance(value, Mapping):
                merged[key] = dict(value)
            else:
                merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    """Read the YAML file; a missing or malformed file is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`EDGE_ASR_SECTION_KEY=value` (and `WHISPER_MODEL`, as wyoming-faster-whisper reads it)."""
    layer: dict[str, Any] = {}
    if environ.get("WHISPER_MODEL"):
        layer.setdefault("model", {})["name"] = environ["WHISPER_MODEL"]
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var == f"{ENV_PREFIX}CONFIG":
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        if rest == "log_level":
            layer["log_level"] = value
            continue
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(f"{var}: unknown setting (expected {ENV_PREFIX}<SECTION>_<KEY>)")
        layer.setdefault(section, {})[rest[len(section) + 1 :]] = value
    return layer


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """CLI `--set section.key=value` pairs as a layer."""
    layer: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected section.key=value")
        section, dot, name = key.strip().partition(".")
        if not dot:
            if section == "log_level":
                layer["log_level"] = value
                continue
            raise ConfigError(f"--set {item}: expected section.key=value")
        layer.setdefault(section, {})[name] = value
    return layer


def build_settings(*layers: Mapping[str, Any]) -> Settings:
    """Validate merged layers (later wins) into Settings."""
    merged = _merge(list(layers))
    sections: dict[str, Any] = {}
    for key, value in merged.items():
        if key == "log_level":
            continue
        if key not in _SECTIONS:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(_SECTIONS)}, log_level)")
        if value is None:  # a section whose keys are all commented out
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be a mapping of keys, got {value!r}")
        sections[key] = _build_section(key, value)
    log_level = str(merged.get("log_level", "INFO")).upper()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level: {log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    settings = Settings(log_level=log_level, **sections)
    if settings.stream.min_window_s > settings.stream.max_window_s:
        raise ConfigError("stream.min_window_s: must not exceed stream.max_window_s")
    if settings.stream.max_window_s > settings.limits.max_utterance_s:
        raise ConfigError("stream.max_window_s: must not exceed limits.max_utterance_s")
    if settings.stream.overlap_ms >= settings.stream.min_window_s * 1000:
        raise ConfigError("stream.overlap_ms: must be shorter than stream.min_window_s")
    _check_wyoming_uri(settings.wyoming)
    return settings


def _check_wyoming_uri(wyoming: WyomingSettings) -> None:
    uri = urlsplit(wyoming.uri)
    if uri.scheme not in ("tcp", "unix", "stdio"):
        raise ConfigError(f"wyoming.uri: {wyoming.uri!r} must start with tcp://, unix:// or stdio://")
    try:
        port = uri.port
    except ValueError:
        port = None
    if uri.scheme == "tcp" and (not uri.hostname or port is None):
        raise ConfigError(f"wyoming.uri: {wyoming.uri!r} needs a host and a port, e.g. tcp://0.0.0.0:10300")
    if uri.scheme == "unix" and not uri.path:
        raise ConfigError(f"wyoming.uri: {wyoming.uri!r} needs a socket path, e.g. unix:///run/edge-asr.sock")
    if wyoming.zeroconf and uri.scheme != "tcp":
        raise ConfigError("wyoming.zeroconf: announcing needs a tcp:// wyoming.uri")


def load_settings(
    config_path: Path | None,
    environ: Mapping[str, str] | None = None,
    cli_layer: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults ← YAML file ← environment ← CLI; the file is optional only when not named."""
    environ = os.environ if environ is None else environ
    if config_path is None and environ.get(f"{ENV_PREFIX}CONFIG"):
        config_path = Path(environ[f"{ENV_PREFIX}CONFIG"])
    file_layer = read_yaml(config_path) if config_path is not None else {}
    return build_settings(file_layer, env_overrides(environ), cli_layer or {})
