"""The engine as the adapters see it: what they may ask of it and of a session, and its refusals.

Adapters depend on these protocols only, never on the engine's classes, so they can be tested against a
fake engine and the engine can change behind them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Protocol, TypeGuard

from .endpointing import Sensitivity
from .events import Event, Final, SessionError, SessionInfo
from .metrics import Metrics


class EngineRefusal(Exception):
    """A request the engine will not take; `REFUSAL_CODES` gives the error code every adapter sends."""


class EngineBusy(EngineRefusal):
    """All `limits.max_sessions` sessions are taken."""


class EngineNotReady(EngineRefusal):
    """The model is not loaded and warm yet."""


class EngineShuttingDown(EngineRefusal):
    """The service is stopping and takes no new sessions (another node should)."""


class UnsupportedLanguage(EngineRefusal):
    """A language the loaded model does not know."""


class InvalidSite(EngineRefusal):
    """A site that is not 1 to 64 letters, digits, '_' or '-', or not one of `sites.allowed`."""


class AudioFormatError(EngineRefusal):
    """Audio that is not whole s16le samples."""


# The one table of refusal → error code, the same on the WebSocket, Wyoming and MQTT.
REFUSAL_CODES: Mapping[type[EngineRefusal], str] = MappingProxyType(
    {
        EngineBusy: "busy",
        EngineNotReady: "not_ready",
        EngineShuttingDown: "shutting_down",
        UnsupportedLanguage: "unsupported_language",
        InvalidSite: "bad_config",
        AudioFormatError: "bad_audio",
    }
)


def refusal_error(refusal: EngineRefusal) -> SessionError:
    """The error event a client gets for a refusal."""
    return SessionError(REFUSAL_CODES[type(refusal)], str(refusal))


Listener = Callable[[SessionInfo, Event], None]
# What a client may send as its own vocabulary (names or terms) for one request.
MAX_REQUEST_NAMES = 200
MAX_REQUEST_NAME_CHARS = 100


def is_text(value: object) -> TypeGuard[str]:
    """Whether `value` is a string that is valid Unicode: JSON can carry a lone surrogate (an escape such as
    "\\ud800"), which no UTF-8 encoder, tokenizer or client can take."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def request_names(value: object, key: str) -> tuple[str, ...]:
    """A client's list of names (Wyoming `transcript_names`/`transcript_terms`, the WebSocket `vocabulary`),
    checked: a list of at most MAX_REQUEST_NAMES strings of at most MAX_REQUEST_NAME_CHARS; else ValueError."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(is_text(item) for item in value):
        raise ValueError(f"{key} must be a list of strings of valid Unicode text")
    if len(value) > MAX_REQUEST_NAMES:
        raise ValueError(f"{key} holds more than {MAX_REQUEST_NAMES} names")
    if any(len(item) > MAX_REQUEST_NAME_CHARS for item in value):
        raise ValueError(f"{key}: a name is longer than {MAX_REQUEST_NAME_CHARS} characters")
    return tuple(value)


@dataclass(frozen=True)
class SessionRequest:
    """What a client asks for when it opens a session. `language` and `site` default to `model.language` and
    `sites.default`; `peer` is the client's address, counted for `limits.max_sessions_per_address`; `names` and
    `terms` are the request's own vocabulary, which biases decoding before the configured one; a stream that does
    not `split_on_silence` is one utterance until `finish` (a Wyoming request), or, with `endpointing`, until the
    service hears the command end (`vad_sensitivity` scales the silences it waits for, as Home Assistant's does);
    `partials`: the client reads partials (without them, and with no listener that reads them, the session decodes
    only what its finals need)."""

    source: str
    language: str | None = None
    prompt: str = ""
    split_on_silence: bool = True
    site: str | None = None
    peer: str | None = None
    names: tuple[str, ...] = ()
    terms: tuple[str, ...] = ()
    endpointing: bool = False
    vad_sensitivity: Sensitivity = "default"
    partials: bool = True


@dataclass(frozen=True)
class ComponentState:
    """The state of a part outside the engine, such as the MQTT connection, for /health."""

    name: str
    state: str
    healthy: bool


@dataclass(frozen=True)
class Health:
    """What /health reports. `ready`: warm and well (what /health's status code says); `live`: the process and
    its decode scheduler work (not stuck, not failing); `accepting`: ready and a new session would be taken
    (not draining, a session slot free), what a balancer asks of /health/ready."""

    ready: bool
    live: bool
    accepting: bool
    status: str
    model: str
    threads: int
    workers: int
    languages: tuple[str, ...]
    sessions: int
    max_sessions: int
    uptime_s: float
    last_decode_s_ago: float | None
    decode_queue: int
    decodes: int
    components: tuple[ComponentState, ...]


class SpeechSession(Protocol):
    """One client's stream: feed audio, read events in order, finish."""

    @property
    def info(self) -> SessionInfo:
        """Who this session's events belong to: its number, source, site (a room or satellite, for listeners such
        as MQTT) and the language its speech is decoded as."""

    @property
    def has_open_utterance(self) -> bool:
        """Speech was heard whose final is not out yet."""

    def feed(self, pcm: bytes) -> None:
        """Add 16 kHz mono s16le audio; raises AudioFormatError for a partial sample."""

    async def room(self) -> None:
        """Wait until the session can take more from its client (less than `limits.max_buffer_s` of audio waits
        for a decode, fewer than `limits.max_queued_events` events wait for the client)."""

    async def finish(self) -> Final | None:
        """End of audio: wait for the open utterance's final (None when nothing was said); `Done` follows."""

    def set_prompt(self, prompt: str) -> None:
        """Text that comes before this stream's speech, passed to the decoder."""

    def set_site(self, site: str) -> None:
        """Move the session to another site; raises InvalidSite."""

    def set_language(self, language: str) -> None:
        """Switch the spoken language; raises UnsupportedLanguage."""

    def set_vocabulary(self, names: tuple[str, ...], terms: tuple[str, ...] = ()) -> None:
        """The client's own names (and terms) for later decodes, before the configured vocabulary."""

    def set_partials(self, wanted: bool) -> None:
        """Whether the client reads partials from now on."""

    def report_error(self, code: str, message: str) -> None:
        """Queue an error for the client, in order with the session's other events."""

    def events(self) -> AsyncIterator[Event]:
        """Events in order, until the session closes."""

    def close(self) -> None:
        """Release the session; decodes still running for it are dropped."""

    async def __aenter__(self) -> SpeechSession:
        """The session itself."""

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the session."""


class SpeechEngine(Protocol):
    """What adapters ask of the engine."""

    @property
    def metrics(self) -> Metrics:
        """The engine's Prometheus metrics."""

    @property
    def languages(self) -> tuple[str, ...]:
        """Languages the model speaks, known also while it loads (for Wyoming `describe`)."""

    def session(self, request: SessionRequest) -> SpeechSession:
        """Open a session on the request's terms, or raise an EngineRefusal."""

    def health(self) -> Health:
        """Model, sessions, uptime and decode facts."""

    def add_listener(self, listener: Listener, *, reads_partials: bool) -> None:
        """Call `listener` on the event loop with every event of every session, in order; while a listener
        `reads_partials`, every session decodes them."""

    def set_component(self, name: str, state: str, healthy: bool) -> None:
        """Record the state of a part outside the engine (e.g. the MQTT connection) for /health."""

    def set_names(self, source: str, names: tuple[str, ...]) -> None:
        """The household's names from a source outside the config (e.g. "homeassistant"), for new sessions."""
