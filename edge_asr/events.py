"""What a session emits: frozen dataclasses for partials, finals and errors, and their JSON form."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Partial:
    """The running hypothesis: `stable` is committed and never changes, `text` adds the tentative tail."""

    text: str
    stable: str
    utterance: int
    asr_ms: int
    e2e_ms: int

    def to_json(self) -> str:
        """The WebSocket wire form."""
        return json.dumps(
            {
                "type": "partial",
                "text": self.text,
                "stable": self.stable,
                "asr_ms": self.asr_ms,
                "e2e_ms": self.e2e_ms,
                "utterance": self.utterance,
            }
        )


@dataclass(frozen=True)
class Final:
    """The committed transcript of one utterance; `start`/`end` are seconds of the session's audio."""

    text: str
    utterance: int
    asr_ms: int
    e2e_ms: int
    ttct_ms: int
    start: float
    end: float

    def to_json(self) -> str:
        """The WebSocket wire form."""
        return json.dumps(
            {
                "type": "final",
                "text": self.text,
                "asr_ms": self.asr_ms,
                "e2e_ms": self.e2e_ms,
                "ttct_ms": self.ttct_ms,
                "utterance": self.utterance,
                "start": round(self.start, 3),
                "end": round(self.end, 3),
            }
        )


@dataclass(frozen=True)
class SessionError:
    """A problem the client should know about; `code` is stable, `message` is for people."""

    code: str
    message: str

    def to_json(self) -> str:
        """The WebSocket wire form."""
        return json.dumps({"type": "error", "code": self.code, "message": self.message})


@dataclass(frozen=True)
class Done:
    """Everything before the client's end of audio is transcribed; its final, if any, came first.

    `utterances` counts the session's utterances so far.
    """

    utterances: int

    def to_json(self) -> str:
        """The WebSocket wire form."""
        return json.dumps({"type": "done", "utterances": self.utterances})


Event = Partial | Final | SessionError | Done


@dataclass(frozen=True)
class SessionInfo:
    """Who an event belongs to: the session, the adapter it came through, its site and language."""

    id: int
    source: str
    site: str
    language: str
