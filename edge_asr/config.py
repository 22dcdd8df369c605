"""Settings: frozen dataclasses layered from defaults, the YAML file, the environment and CLI flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import re
import ssl
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from .credentials import ConfigError as ConfigError
from .credentials import check_ssl, credential_path, secret

ENV_PREFIX = "EDGE_ASR_"
# Who may connect by default: this host, the private ranges of a home network (RFC 1918, link-local,
# IPv6 unique local) and the range overlay VPNs use; not the internet, should a port be forwarded by mistake.
HOME_NETWORKS = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "fe80::/10",
    "fc00::/7",
    "100.64.0.0/10",
)
# A site becomes an MQTT topic level and a Home Assistant entity id.
SITE_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_CONFIG_PATH = Path("config/edge-asr.yaml")
INSTALLED_CONFIG_PATH = Path("/etc/edge-asr/config.yaml")

_T = TypeVar("_T")
_S = TypeVar("_S", bound="_Section")
_LOGGER = logging.getLogger(__name__)


def _setting(default: Any, low: float | None = None, high: float | None = None, choices: tuple[Any, ...] = ()) -> Any:
    return field(default=default, metadata={"low": low, "high": high, "choices": choices})


# `model.language` or a client's language: the one the model hears in each utterance.
AUTO_LANGUAGE = "auto"


def default_threads() -> int:
    """Half the cores, at least one: leaves room for audio I/O and the adapters."""
    return max(1, (os.cpu_count() or 2) // 2)


class _Section:
    """A settings section: each key is checked against its bounds as it is read, the rest in `checked`."""

    def checked(self: _S, environ: Mapping[str, str], written: Mapping[str, str]) -> _S:
        """The section the service uses: checked, its credential files found ($CREDENTIALS_DIRECTORY) and read."""
        # `written` maps a moved key to the name the user gave it, so that a message names the key the user wrote.
        return self


@dataclass(frozen=True)
class ModelSettings(_Section):
    """Which Whisper model to load and how to run it."""

    name: str = "tiny.en"
    compute_type: str = _setting("int8", choices=("int8", "int8_float32", "float32", "int16", "default"))
    threads: int = _setting(0, low=0, high=256)
    workers: int = _setting(0, low=0, high=16)
    # A language code, or AUTO_LANGUAGE: each utterance in the language the model hears in all of it.
    language: str = "en"
    beam_size: int = _setting(1, low=1, high=10)
    encoder_floor_s: float = _setting(15.0, low=1.0, high=30.0)
    download_dir: str = ""
    warmup_s: float = _setting(0.5, low=0.0, high=5.0)
    # The household's own names (rooms, people, devices), for every session; a file has one per line and is
    # read again when it changes.
    vocabulary: tuple[str, ...] = ()
    vocabulary_file: str = ""

    @property
    def effective_threads(self) -> int:
        """Threads to use: the configured count, or half the cores when 0."""
        return self.threads or default_threads()

    @property
    def effective_workers(self) -> int:
        """Decodes that may run at once: the configured count, or as many as the cores hold."""
        return self.workers or max(1, (os.cpu_count() or 2) // self.effective_threads)

    def checked(self, environ: Mapping[str, str], written: Mapping[str, str]) -> ModelSettings:
        """A names file that is named must be there and be text."""
        # Only at start-up: later, a change is read and a file gone keeps the names it had.
        path = self.vocabulary_file
        if not path:
            return self
        try:
            with open(path, encoding="utf-8") as file:
                file.read()
        except OSError as err:
            raise ConfigError(f"model.vocabulary_file: cannot read {path}: {err.strerror or err}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"model.vocabulary_file: {path} is not UTF-8 text") from None
        return self


@dataclass(frozen=True)
class StreamSettings(_Section):
    """The streaming decoder: VAD, retranscribe cycle, window and prompt."""

    # The speech detector: Silero holds in a room's noise, where webrtcvad hears noise as speech; "auto" takes
    # Silero where the service ends a command by its silence (a Wyoming request with endpointing) and webrtcvad,
    # cheaper and as accurate in quiet, everywhere else.
    vad: str = _setting("auto", choices=("auto", "silero", "webrtc"))
    # Silero: the speech probability from which a frame is speech.
    vad_threshold: float = _setting(0.5, low=0.2, high=0.95)
    # webrtcvad: how readily a frame is not speech (0-3).
    vad_aggressiveness: int = _setting(2, low=0, high=3)
    silence_ms: int = _setting(350, low=90, high=10_000)
    cycle_ms: int = _setting(250, low=50, high=5_000)
    overlap_ms: int = _setting(150, low=0, high=1_000)
    commit_margin_ms: int = _setting(1000, low=0, high=5_000)
    final_silence_ms: int = _setting(60, low=30, high=2_000)
    preroll_ms: int = _setting(300, low=0, high=1_000)
    min_window_s: float = _setting(1.0, low=0.2, high=10.0)
    max_window_s: float = _setting(15.0, low=2.0, high=30.0)
    prompt_chars: int = _setting(200, low=0, high=800)
    # Characters of names in the decoder prompt, apart from prompt_chars: whole names only.
    names_chars: int = _setting(450, low=0, high=800)

    def checked(self, environ: Mapping[str, str], written: Mapping[str, str]) -> StreamSettings:
        """The window's bounds must be in order, and the overlap shorter than the smallest window."""
        if self.min_window_s > self.max_window_s:
            raise ConfigError("stream.min_window_s: must not exceed stream.max_window_s")
        if self.overlap_ms >= self.min_window_s * 1000:
            raise ConfigError("stream.overlap_ms: must be shorter than stream.min_window_s")
        return self


@dataclass(frozen=True)
class EndpointingSettings(_Section):
    """How a Wyoming request's voice command is ended by the service: the silence after a command the whole decode
    says is sure to end there, complete or unfinished, the decoder's confidence each needs, and the waits for no
    speech and a long command.
    """

    # A complete command waits only this long when the decoder gives its text's end at least `sure_end_probability`
    # and the voice fell at its end by at least `sure_pitch_fall_st` semitones; never longer than
    # `complete_silence_ms` (so lowering that one alone lowers both).
    sure_silence_ms: int = _setting(350, low=90, high=5_000)
    sure_end_probability: float = _setting(0.75, low=0.0, high=1.0)
    sure_pitch_fall_st: float = _setting(2.0, low=0.0, high=24.0)
    complete_silence_ms: int = _setting(600, low=90, high=5_000)
    unfinished_silence_ms: int = _setting(1000, low=90, high=10_000)
    # A command's last word the decoder is less sure of than this waits as an unfinished one ...
    min_word_probability: float = _setting(0.5, low=0.0, high=1.0)
    # ... and so does a command whose decoder gives its text's end a lower probability than this (0: not asked).
    min_end_probability: float = _setting(0.6, low=0.0, high=1.0)
    no_speech_s: float = _setting(8.0, low=1.0, high=600.0)
    max_command_s: float = _setting(15.0, low=1.0, high=600.0)

    def checked(self, environ: Mapping[str, str], written: Mapping[str, str]) -> EndpointingSettings:
        """A complete command waits no longer than an unfinished one."""
        if self.complete_silence_ms > self.unfinished_silence_ms:
            raise ConfigError("endpointing.complete_silence_ms: must not exceed endpointing.unfinished_silence_ms")
        return self


@dataclass(frozen=True)
class LimitSettings(_Section):
    """Hard limits, each enforced: sessions, message size, utterance length, waits and buffers."""

    max_sessions: int = _setting(8, low=1, high=1_000)
    max_frame_bytes: int = _setting(256 * 1024, low=320, high=16 * 1024 * 1024)
    # A longer utterance ends at its longest pause in the second half of this (its latest pause when none is
    # there), and the speech after that pause is the next utterance; only speech without any pause is cut here.
    max_utterance_s: float = _setting(15.0, low=1.0, high=600.0)
    idle_timeout_s: float = _setting(120.0, low=1.0, high=86_400.0)
    send_timeout_s: float = _setting(10.0, low=0.5, high=600.0)
    # A connection must complete its handshake (WebSocket) or send its first event (Wyoming) this soon.
    handshake_timeout_s: float = _setting(10.0, low=0.5, high=600.0)
    max_sessions_per_address: int = _setting(4, low=1, high=1_000)
    max_buffer_s: float = _setting(60.0, low=5.0, high=3_600.0)
    max_queued_events: int = _setting(256, low=8, high=100_000)

    def checked(self, environ: Mapping[str, str], written: Mapping[str, str]) -> LimitSettings:
        """A session's buffer must hold more than an utterance."""
        if self.max_buffer_s <= self.max_utterance_s:
            # An utterance may hold max_utterance_s that no decode wants (a long pause): the client would be stalled.
            raise ConfigError("limits.max_buffer_s: must be longer than limits.max_utterance_s")
        return self


@dataclass(frozen=True)
class HomeAssistantSettings(_Section):
    """Names fetched from Home Assistant: its entities exposed to Assist, their aliases, areas and floors."""

    url: str = ""
    token: str = field(default="", repr=False)
    token_file: str = ""
    refresh_s: float = _setting(600.0, low=10.0, high=86_400.0)

    def checked(self, environ: Mapping[str, str], written: Mapping[str, str]) -> HomeAssistantSettings:
        """Check the URL and read the token file when Home Assistant is named; return the settings the client uses."""
        if not self.url:
            return self
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise ConfigError(f"homeassistant.url: {self.url!r} is not a URL (e.g. http://homeassistant.local:8123)")
        token, token_file = secret("homeassistant.token_file", self.token, self.token_file, environ)
        if not token:
            raise ConfigError("homeassistant.token_file: Home Assistant needs a long-lived access token")
        return dataclasses.replace(self, token=token, token_file=token_file)


@dataclass(frozen=True)
class ServiceSettings(_Section):
    """The service's life: how it drains on SIGTERM and when it gives up on a failing model."""

    drain_accept_s: float = _setting(2.0, low=0.0, high=60.0)
    drain_timeout_s: float = _setting(10.0, low=0.0, high=600.0)
    max_decode_failures: int = _setting(5, low=1, high=10_000)


def _check_networks(key: str, networks: tuple[str, ...]) -> None:
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {network!r} is not a network (CIDR, e.g. 192.168.1.0/24)") from None


@dataclass(frozen=True)
class HttpSettings(_Section):
    """The WebSocket/HTTP adapter and who may use it."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = _setting(8787, low=0, high=65_535)
    # Web pages (origins) besides the service's own that may open the WebSocket from a browser.
    allowed_origins: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = HOME_NETWORKS
    # A shared secret for the WebSocket and /metrics; kept out of repr() and logs.
    token: str = field(default="", repr=False)
    token_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    max_connections: int = _setting(64, low=1, high=100_000)
    # Balancers whose forwarded headers (X-Forwarded-For, Forwarded) name the real client.
    trusted_proxies: tuple[str, ...] = ()

    def checked(self, environ: Mapping[str, str], written: Mapping[str, str]) -> HttpSettings:
        """Check who may connect, and an enabled listener's token and TLS files; return the settings it uses."""
        _check_networks("http.allowed_networks", self.allowed_networks)
        _check_networks("http.trusted_proxies", self.trusted_proxies)
        for origin in self.allowed_origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ConfigError(
                    f"http.allowed_origins: {origin!r} is not an origin (e.g. http://homeassistant.local:8123)"
                )
        if not self.enabled:
            return self
        token, token_file = secret("http.token_file", self.token, self.token_file, environ)
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("http.tls_cert_file: needs http.tls_key_file too (and the other way round)")
        cert_file, key_file = credential_path(self.tls_cert_file, environ), credential_path(self.tls_key_file, environ)
        if cert_file:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            check_ssl(
                "http.tls_key_file",
                key_file,
                "holds no unencrypted private key for http.tls_cert_file",
                lambda: context.load_cert_chain(cert_file, key_file, password=""),
            )
        return dataclasses.replace(
            self, token=token, token_file=token_file, tls_cert_file=cert_file, tls_key_file=key_file
        )


@dataclass(frozen=True)
class WyomingSettings(_Section):
    """The Wyoming adapter for Home Assistant and its voice satellites, and who may use it."""

    enabled: bool = True
    uri: str = "tcp://0.0.0.0:10300"
    # The service ends each request's command itself (`describe` says requires_external_vad: false).
    endpointing: bool = True
    # Committed words as transcript-chunk events while the speaker goes on (`describe` then says
    # supports_transcript_streaming). Home Assistant reads only the transcript: chunks cost decodes nobody reads.
    transcript_chunks: bool = False
    zeroconf: str = ""
    allowed_networks: tuple[str, ...] = HOME_NETWORKS
    max_connections: int = _setting(64, low=1, high=100_000)
    # Balancers whose PROXY protocol (v2) header names the real client.
    trusted_proxies: tuple[str, ...] = ()

    def checked(self, environ: Mapping[str, str], written: Mapping[str, str]) -> WyomingSettings:
        """Check the URI the adapter serves on and who may connect."""
        uri = urlsplit(self.uri)
        if uri.scheme not in ("tcp", "unix", "stdio"):
            raise ConfigError(f"wyoming.uri: {self.uri!r} must start with tcp://, unix:// or stdio://")
        try:
            port = uri.port
        except ValueError:
            port = None
        if uri.scheme == "tcp" and (not uri.hostname or port is None):
            raise ConfigError(f"wyoming.uri: {self.uri!r} needs a host and a port, e.g. tcp://0.0.0.0:10300")
        if uri.scheme == "unix" and not uri.path:
            raise ConfigError(f"wyoming.uri: {self.uri!r} needs a socket path, e.g. unix:///run/edge-asr.sock")
        if self.zeroconf and uri.scheme != "tcp":
            raise ConfigError("wyoming.zeroconf: announcing needs a tcp:// wyoming.uri")
        _check_networks("wyoming.allowed_networks", self.allowed_networks)
        _check_networks("wyoming.trusted_proxies", self.trusted_proxies)
        return self


def _check_names(key: str, names: tuple[str, ...]) -> None:
    """Each name becomes an MQTT topic level and a Home Assistant entity id, so must match SITE_PATTERN."""
    for name in names:
        if not SITE_PATTERN.fullmatch(name):
            raise ConfigError(f"{key}: {name!r} must be 1 to 64 letters, digits, '_' or '-'")


def _topic_part(key: str, value: str) -> str:
    """A topic prefix without its outer '/': MQTT wildcards or NUL in it would break every topic built on it."""
    part = value.strip("/")
    if not part or any(c in part for c in "+#\0"):
        raise ConfigError(f"{key}: {value!r} must be a non-empty topic without '+', '#' or NUL")
    return part


@dataclass(frozen=True)
class MqttSettings(_Section):
    """The MQTT adapter: every session's partials and finals, availability and Home Assistant discovery."""

    enabled: bool = False
    # Every session's partials on <prefix>/<site>/partial: while on, every session decodes partials.
    partials: bool = True
    host: str = "localhost"
    port: int = _setting(1883, low=1, high=65_535)
    protocol: str = _setting("5", choices=("5", "3.1.1"))
    # "" = edge-asr-<mqtt.node or host name>: nodes of one household must not share a client id (the broker would
    # disconnect one for the other).
    client_id: str = ""
    # Several nodes behind a balancer: their names (this node is `node`, by default its host name). Each
    # publishes <prefix>/node/<name>/status; entities are available while any node is.
    nodes: tuple[str, ...] = ()
    node: str = ""
    username: str = ""
    # Kept out of repr() so that logging the settings never logs the password.
    password: str = field(default="", repr=False)
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: int = _setting(60, low=5, high=3_600)
    topic_prefix: str = "edge_asr"
    discovery_prefix: str = "homeassistant"
    queue_size: int = _setting(1000, low=1, high=1_000_000)
    # How many sites get Home Assistant entities.
    max_sites: int = _setting(32, low=1, high=10_000)

    def checked(self, environ: Mapping[str, str], written: Mapping[str, str]) -> MqttSettings:
        """Check the node names and topic prefixes, and the files an enabled adapter reads; return what it uses."""
        _check_names("mqtt.nodes", self.nodes)
        mqtt = dataclasses.replace(
            self,
            topic_prefix=_topic_part("mqtt.topic_prefix", self.topic_prefix),
            discovery_prefix=_topic_part("mqtt.discovery_prefix", self.discovery_prefix),
        )
        if not mqtt.enabled:  # a disabled adapter's files need not exist
            return mqtt
        password, password_file = secret("mqtt.password_file", mqtt.password, mqtt.password_file, environ)
        mqtt = dataclasses.replace(mqtt, password=password, password_file=password_file)
        if mqtt.tls:
            mqtt = dataclasses.replace(
                mqtt,
                ca_file=credential_path(mqtt.ca_file, environ),
                cert_file=credential_path(mqtt.cert_file, environ),
                key_file=credential_path(mqtt.key_file, environ),
            )
            mqtt._check_tls()
        return mqtt

    def _check_tls(self) -> None:
        """Load the CA, client certificate and key as paho's tls_set will, so that a bad file stops start-up."""
        if self.key_file and not self.cert_file:  # paho would silently connect without a client certificate
            raise ConfigError("mqtt.key_file: needs mqtt.cert_file, the client certificate the key belongs to")
        if self.ca_file:
            check_ssl(
                "mqtt.ca_file",
                self.ca_file,
                "holds no CA certificate",
                lambda: ssl.create_default_context(cafile=self.ca_file),
            )
        if not self.cert_file:
            return
        # ssl has no public call that loads just a certificate: loading it as a trust anchor parses it, and tells a
        # bad certificate from a bad key, which load_cert_chain reports alike.
        check_ssl(
            "mqtt.cert_file",
            self.cert_file,
            "holds no certificate",
            lambda: ssl.create_default_context(cafile=self.cert_file),
        )
        # Without key_file the key is in cert_file, as paho reads it. The empty password refuses an encrypted key
        # (there is no setting for its passphrase) instead of OpenSSL prompting on the terminal.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.key_file:
            key, path, problem = "mqtt.key_file", self.key_file, "holds no unencrypted private key for mqtt.cert_file"
        else:
            key, path, problem = (
                "mqtt.cert_file",
                self.cert_file,
                "holds no unencrypted private key, and mqtt.key_file is empty",
            )
        check_ssl(
            key, path, problem, lambda: context.load_cert_chain(self.cert_file, self.key_file or None, password="")
        )


@dataclass(frozen=True)
class SiteSettings(_Section):
    """The sites clients may name, checked by the engine whether or not MQTT is enabled."""

    # The site of sessions whose client names none.
    default: str = "default"
    # The sites clients may name (empty: any valid site).
    allowed: tuple[str, ...] = ()

    def checked(self, environ: Mapping[str, str], written: Mapping[str, str]) -> SiteSettings:
        """Each site must be a valid name, and the default one of the allowed; messages name keys as the user wrote."""
        default_key = written.get("sites.default", "sites.default")
        allowed_key = written.get("sites.allowed", "sites.allowed")
        _check_names(default_key, (self.default,))
        _check_names(allowed_key, self.allowed)
        if self.allowed and self.default not in self.allowed:
            raise ConfigError(f"{default_key}: {self.default!r} is not one of {allowed_key}")
        return self


@dataclass(frozen=True)
class Settings:
    """Every setting of the service."""

    model: ModelSettings = field(default_factory=ModelSettings)
    stream: StreamSettings = field(default_factory=StreamSettings)
    endpointing: EndpointingSettings = field(default_factory=EndpointingSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    wyoming: WyomingSettings = field(default_factory=WyomingSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    sites: SiteSettings = field(default_factory=SiteSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    homeassistant: HomeAssistantSettings = field(default_factory=HomeAssistantSettings)
    log_level: str = "INFO"

    def checked(self, environ: Mapping[str, str], written: Mapping[str, str]) -> Settings:
        """Each section's own checks, then those across sections; return the settings the service uses."""
        sections = {name: getattr(self, name).checked(environ, written) for name in _SECTIONS}
        if self.stream.max_window_s > self.limits.max_utterance_s:
            raise ConfigError("stream.max_window_s: must not exceed limits.max_utterance_s")
        return dataclasses.replace(self, **sections)


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSettings,
    "stream": StreamSettings,
    "endpointing": EndpointingSettings,
    "limits": LimitSettings,
    "http": HttpSettings,
    "wyoming": WyomingSettings,
    "mqtt": MqttSettings,
    "sites": SiteSettings,
    "service": ServiceSettings,
    "homeassistant": HomeAssistantSettings,
}
# Keys that moved to another section, old → new: the old name still works from every layer and logs where the key
# went, so that no configuration a user wrote breaks.
MOVED_KEYS = {
    "mqtt.default_site": "sites.default",
    "mqtt.sites": "sites.allowed",
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TRUE = ("true", "yes", "on", "1")
_BOOLEANS = (*_TRUE, "false", "no", "off", "0")


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _BOOLEANS:
        return raw.strip().lower() in _TRUE
    raise ValueError(raw)


def _to_int(raw: Any) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError(raw)
    return int(raw)


def _to_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(raw)
    value = float(raw)
    if math.isnan(value):
        raise ValueError(raw)
    return value


def _to_str(raw: Any) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError(raw)
    return str(raw)


def _to_str_tuple(raw: Any) -> tuple[str, ...]:
    # A string is split at commas: that is how the environment and --set give a list (and YAML may too).
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)):
        raise ValueError(raw)
    return tuple(text for item in items if (text := _to_str(item).strip()))


_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _converter(kind: Any) -> tuple[str, Callable[[Any], Any]]:
    """What a field of type `kind` accepts (for messages) and the function that coerces a raw value to it.

    `X | None` takes YAML null as None; any other value, including an environment or --set string (even ""),
    is read as X. `tuple[str, ...]` takes a YAML list or a comma-separated string. Any other type is a TypeError,
    so that a new field type fails at import instead of being read as something it is not.
    """
    if kind in _SCALARS:
        return kind.__name__, _SCALARS[kind]
    args = typing.get_args(kind)
    # X | None is a types.UnionType; Optional[X] (and X | None from Python 3.14) a typing.Union.
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        expected, convert = _converter(args[0] if args[1] is type(None) else args[1])
        return f"{expected} or null", lambda raw: None if raw is None else convert(raw)
    if kind == tuple[str, ...]:
        return "a list of strings", _to_str_tuple
    raise TypeError(f"no converter for the field type {kind}")


@dataclass(frozen=True)
class _Key:
    """How one settings key is read: what it accepts, its converter, its bounds and whether its value is secret."""

    expected: str
    convert: Callable[[Any], Any]
    meta: Mapping[str, Any]
    secret: bool


def _section_keys(cls: type) -> dict[str, _Key]:
    """Each field of a settings dataclass as a _Key, from its real type; TypeError names a field of unknown type."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for item in dataclasses.fields(cls):
        try:
            expected, convert = _converter(hints[item.name])
        except TypeError as err:
            raise TypeError(f"{cls.__name__}.{item.name}: {err}") from None
        keys[item.name] = _Key(expected, convert, item.metadata, secret=not item.repr)
    return keys


# Resolved at import, so a field type _converter does not know stops the import, not the first config that sets it.
_SECTION_KEYS = {name: _section_keys(cls) for name, cls in _SECTIONS.items()}


def _convert(key: str, raw: Any, spec: _Key) -> Any:
    """Coerce one value to its field's type and check its bounds."""
    try:
        value = spec.convert(raw)
    except (TypeError, ValueError, OverflowError):
        shown = f"a {type(raw).__name__}" if spec.secret else repr(raw)  # a secret stays out of the log
        raise ConfigError(f"{key}: expected {spec.expected}, got {shown}") from None
    if value is None:
        return None
    low, high, choices = spec.meta.get("low"), spec.meta.get("high"), spec.meta.get("choices") or ()
    if low is not None and value < low:
        raise ConfigError(f"{key}: {value!r} is below the minimum {low}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: {value!r} is above the maximum {high}")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _build_section(
    name: str, cls: type[_T], keys: Mapping[str, _Key], values: Mapping[str, Any], written: Mapping[str, str] = {}
) -> _T:
    """The section from its values; `written` maps a moved key to the name the user gave it, for messages."""
    kwargs = {}
    for key, raw in values.items():
        if key not in keys:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(keys)})")
        kwargs[key] = _convert(written.get(f"{name}.{key}", f"{name}.{key}"), raw, keys[key])
    return cls(**kwargs)


def _section_values(name: str, value: Any) -> Mapping[str, Any]:
    """A section's keys; None is a section whose keys are all commented out."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: must be a mapping of keys, got {value!r}")
    return value


def _moved(layer: Mapping[str, Any], written: dict[str, str], used: dict[str, None]) -> Mapping[str, Any]:
    """`layer` with MOVED_KEYS' old names renamed; `written` notes the name that set each, `used` the old names."""
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        given = layer.get(old_section)
        target = layer.get(new_section)
        given_new = isinstance(target, Mapping) and new_key in target
        if given_new:
            written[new] = new
        if not isinstance(given, Mapping) or old_key not in given:
            continue
        target, value = _section_values(new_section, target), given[old_key]
        if given_new:
            spec = _SECTION_KEYS[new_section][new_key]
            if _convert(new, target[new_key], spec) != _convert(old, value, spec):
                raise ConfigError(
                    f"{old} and {new}: both set, to different values ({value!r} and {target[new_key]!r}); "
                    f"{old} is the old name of {new}: keep only {new}"
                )
        else:
            written[new] = old
        used[old] = None
        rest = {key: item for key, item in given.items() if key != old_key}
        layer = {**layer, old_section: rest, new_section: {**target, new_key: value}}
    return layer


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


def build_settings(*layers: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Validate merged layers (later wins) into Settings, reading the credential files of enabled adapters."""
    environ = os.environ if environ is None else environ
    # Moved keys are renamed in each layer before merging, so a later layer overrides an earlier one whichever
    # name each used; `written` keeps the name of the value that won, for the messages about it.
    written: dict[str, str] = {}
    used: dict[str, None] = {}
    merged = _merge([_moved(layer, written, used) for layer in layers])
    for old in used:
        new = MOVED_KEYS[old]
        _LOGGER.warning("%s moved to %s; the old name still works, but set %s instead", old, new, new)
    sections: dict[str, Any] = {}
    for key, value in merged.items():
        if key == "log_level":
            continue
        if key not in _SECTIONS:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(_SECTIONS)}, log_level)")
        sections[key] = _build_section(key, _SECTIONS[key], _SECTION_KEYS[key], _section_values(key, value), written)
    log_level = str(merged.get("log_level", "INFO")).upper()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level: {log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    return Settings(log_level=log_level, **sections).checked(environ, written)


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
    return build_settings(file_layer, env_overrides(environ), cli_layer or {}, environ=environ)
