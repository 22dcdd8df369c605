"""What a session emits, as frozen dataclasses that own their wire form (`to_dict`/`from_dict`) both ways.

The WebSocket sends `to_json()`; MQTT adds the session's facts to `to_dict()`; clients such as the bench
read messages back with `message_from_dict`. One shape per message, wherever it travels.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, get_type_hints

from .agreement import normalise

_M = TypeVar("_M", bound="Message")
# Wire floats (seconds of audio) are rounded to the millisecond.
_FLOAT_DIGITS = 3


class Message:
    """Base of the wire messages: a frozen dataclass with a `type` tag and typed fields."""

    # The wire's "type" tag.
    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The message as a JSON-ready dict, `type` first."""
        out: dict[str, Any] = {"type": self.kind}
        for item in dataclasses.fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            value = getattr(self, item.name)
            out[item.name] = round(value, _FLOAT_DIGITS) if isinstance(value, float) else value
        return out

    def to_json(self) -> str:
        """The message as one JSON text (the WebSocket form)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls: type[_M], data: Mapping[str, Any]) -> _M:
        """Read a message back; ValueError names the first missing or ill-typed field. Unknown keys are ignored."""
        if data.get("type") != cls.kind:
            raise ValueError(f"expected a {cls.kind!r} message, got type {data.get('type')!r}")
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):  # type: ignore[arg-type]
            if item.name not in data:
                if item.default is not dataclasses.MISSING:
                    continue
                raise ValueError(f"{cls.kind} message without {item.name!r}")
            values[item.name] = _typed(f"{cls.kind}.{item.name}", data[item.name], hints[item.name])
        return cls(**values)


def _typed(name: str, value: Any, kind: type) -> Any:
    """`value` if it is of `kind` (an int is a float; a bool is neither), else ValueError."""
    if isinstance(value, bool) != (kind is bool):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}")
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class Ready(Message):
    """Sent once on connect: the session's number and what audio it takes."""

    kind: ClassVar[str] = "ready"
    session: int
    sample_rate: int
    language: str
    max_frame_bytes: int


@dataclass(frozen=True)
class Partial(Message):
    """The running hypothesis: `stable` is committed and never changes, `text` adds the tentative tail."""

    kind: ClassVar[str] = "partial"
    text: str
    stable: str
    utterance: int
    asr_ms: int
    e2e_ms: int


@dataclass(frozen=True)
class Final(Message):
    """The transcript of one utterance, from a decode of all of it; `start`/`end` are seconds of the session's
    audio. It is authoritative: `revised` says it changed words the partials had shown as `stable`. `language` is
    the language it was decoded as: the session's, or the one the model heard (a session in `auto`)."""

    kind: ClassVar[str] = "final"
    text: str
    utterance: int
    asr_ms: int
    e2e_ms: int
    ttct_ms: int
    start: float
    end: float
    revised: bool = False
    language: str = ""


@dataclass(frozen=True)
class SessionError(Message):
    """A problem the client should know about; `code` is stable, `message` is for people."""

    kind: ClassVar[str] = "error"
    code: str
    message: str


# Client text quoted in an error message is cut to this many characters: a client cannot make its errors big.
MAX_QUOTE_CHARS = 64


def quoted(value: object) -> str:
    """A client's value for an error message: repr'd (so always printable) and cut short."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTE_CHARS else f"{text[:MAX_QUOTE_CHARS]}..."


@dataclass(frozen=True)
class Done(Message):
    """Everything before the client's end of audio is transcribed; its final, if any, came first.

    `utterances` counts the session's utterances so far.
    """

    kind: ClassVar[str] = "done"
    utterances: int


Event = Partial | Final | SessionError | Done


def words_after(text: str, stable: str) -> str | None:
    """The words of `text` that follow the words of `stable` when `text` begins with them, compared without case
    or punctuation (a final that only re-punctuates committed text still extends it); None when it does not."""
    expected = [word for word in map(normalise, stable.split()) if word]
    words = text.split()
    matched = 0
    for index, word in enumerate(words):
        if matched == len(expected):
            return " ".join(words[index:])
        if normalise(word):
            if normalise(word) != expected[matched]:
                return None
            matched += 1
    return "" if matched == len(expected) else None


_MESSAGES: dict[str, type[Message]] = {message.kind: message for message in (Ready, Partial, Final, SessionError, Done)}


def message_from_dict(data: Any) -> Message:
    """Any wire message read back from its dict; ValueError for an unknown type or a malformed message."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a message must be a JSON object, got {type(data).__name__}")
    name = data.get("type")
    kind = _MESSAGES.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"unknown message type {name!r}")
    return kind.from_dict(data)


@dataclass(frozen=True)
class SessionInfo:
    """Who an event belongs to: the session, the adapter it came through, its site and language."""

    id: int
    source: str
    site: str
    language: str
    # The household's names in force: how many, and a digest that tells vocabularies apart (names are personal).
    vocabulary_names: int = 0
    vocabulary_digest: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The facts listeners add to an event's dict (MQTT payloads)."""
        return {
            "session": self.id,
            "adapter": self.source,
            "site": self.site,
            "language": self.language,
            "vocabulary_names": self.vocabulary_names,
            "vocabulary_digest": self.vocabulary_digest,
        }
