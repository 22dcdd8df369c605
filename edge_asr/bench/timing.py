"""What a replay records (events, when each chunk left) and the latencies derived from it."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import StreamSettings
from ..events import Event, Final, Partial
from ..vad import VadGate
from .scoring import normalize


@dataclass(frozen=True)
class Received:
    """An event and the monotonic time the bench received it."""

    at: float
    event: Event


@dataclass(frozen=True)
class Playback:
    """One clip's replay: events received, when each chunk left, when the end signal left.

    `timed` is False when the events carry no server timings and no `revised` flag (Wyoming's have none; their
    asr/e2e/ttct are 0 placeholders and `revised` is False, which the report leaves out).
    """

    events: tuple[Received, ...]
    sent: tuple[tuple[float, float], ...]
    end_at: float
    timed: bool = True


def final_text(received: Sequence[Received]) -> str:
    """The clip's transcript: the text of all its finals, in order."""
    return " ".join(item.event.text for item in received if isinstance(item.event, Final))


def first_seen(received: Sequence[Received]) -> list[tuple[str, float]]:
    """Each normalised word of the final text and when a hypothesis first had it at its position.

    A hypothesis is the finals received so far followed by the newest partial (or final).
    """
    finals: list[str] = []
    hypotheses: list[tuple[float, list[str]]] = []
    for item in received:
        if not isinstance(item.event, (Partial, Final)):
            continue
        hypotheses.append((item.at, normalize(" ".join([*finals, item.event.text])).split()))
        if isinstance(item.event, Final):
            finals.append(item.event.text)
    words = normalize(" ".join(finals)).split()
    seen: list[tuple[str, float]] = []
    for position, word in enumerate(words):
        first = next(at for at, hypothesis in hypotheses if position < len(hypothesis) and hypothesis[position] == word)
        seen.append((word, first))
    return seen


def sent_at(sent: Sequence[tuple[float, float]], position_s: float) -> float:
    """When the chunk holding that audio position left; `sent` is (audio seconds sent, time) per chunk."""
    index = bisect.bisect_left([end for end, _ in sent], position_s - 1e-9)
    return sent[min(index, len(sent) - 1)][1]


def word_lags(playback: Playback, speech: tuple[float, float]) -> list[float]:
    """Seconds from each final word's estimated end of speaking to its first appearance at its position."""
    seen = first_seen(playback.events)
    start, end = speech
    return [
        at - sent_at(playback.sent, start + (index + 1) / len(seen) * (end - start))
        for index, (_word, at) in enumerate(seen)
    ]


def first_text_lag(playback: Playback, speech_start_s: float) -> float | None:
    """Seconds from the speech start to the first partial or final with text; None when there was none."""
    first = next(
        (item.at for item in playback.events if isinstance(item.event, (Partial, Final)) and item.event.text), None
    )
    return None if first is None else first - sent_at(playback.sent, speech_start_s)


def end_to_final(playback: Playback) -> float | None:
    """Seconds from the end signal to the clip's last final (0 when it came first); None without a final."""
    finals = [item.at for item in playback.events if isinstance(item.event, Final)]
    return max(0.0, finals[-1] - playback.end_at) if finals else None


def speech_span(pcm: bytes, stream: StreamSettings) -> tuple[float, float] | None:
    """Speech start and last voiced frame end (seconds) that `VadGate` finds in a clip; None without speech."""
    gate = VadGate.of(stream)
    starts = [change.at_s for change in gate.push(pcm) if change.speaking]
    return (starts[0], gate.last_voice_end_s) if starts else None
