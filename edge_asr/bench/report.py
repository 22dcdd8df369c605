"""The bench's findings: per-clip results, corpus summaries, and the report as a table and as JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..events import Final, Partial, SessionError
from .corpus import Clip
from .resources import Resources
from .scoring import percentile, ratio, score_words
from .timing import Playback, end_to_final, final_text, first_text_lag, word_lags


@dataclass(frozen=True)
class ClipResult:
    """One clip's streaming outcome; times in ms."""

    name: str
    reference: str
    hypothesis: str
    audio_s: float
    reference_words: int
    word_errors: int
    word_lag_ms: tuple[float, ...]
    first_partial_ms: float | None
    end_to_final_ms: float | None
    ttct_ms: tuple[int, ...]
    e2e_partial_ms: tuple[int, ...]
    e2e_final_ms: tuple[int, ...]
    errors: tuple[str, ...]


@dataclass(frozen=True)
class OfflineClip:
    """One clip decoded whole."""

    name: str
    hypothesis: str
    word_errors: int
    decode_ms: float


@dataclass(frozen=True)
class StreamingSummary:
    """The streaming run over the corpus; times in ms."""

    clips: int
    audio_s: float
    reference_words: int
    word_errors: int
    wer: float | None
    no_speech_clips: int
    hallucinations: int
    word_lag_p50_ms: float | None
    word_lag_p90_ms: float | None
    end_to_final_p50_ms: float | None
    end_to_final_p90_ms: float | None
    ttct_p50_ms: float | None
    ttct_p90_ms: float | None
    e2e_partial_p50_ms: float | None
    e2e_final_p50_ms: float | None
    first_partial_p50_ms: float | None
    clip_errors: int


@dataclass(frozen=True)
class OfflineSummary:
    """Every clip decoded whole by the same model."""

    clips: int
    reference_words: int
    word_errors: int
    wer: float | None
    hallucinations: int
    decode_ms_mean: float
    cpu_s_per_audio_s: float | None


@dataclass(frozen=True)
class Report:
    """Everything `edge-asr bench` found."""

    corpus: str
    transport: str
    protocol: str
    concurrency: int
    realtime: bool
    trailing_silence_s: float
    normalizer: str
    streaming: StreamingSummary
    resources: Resources
    offline: OfflineSummary | None
    clips: tuple[ClipResult, ...]
    offline_clips: tuple[OfflineClip, ...]


def clip_result(clip: Clip, playback: Playback, speech: tuple[float, float] | None) -> ClipResult:
    """Score one replay against its reference."""
    hypothesis = final_text(playback.events)
    score = score_words(clip.reference, hypothesis)
    events = [item.event for item in playback.events]
    timed = events if playback.timed else []
    return ClipResult(
        name=clip.name,
        reference=clip.reference,
        hypothesis=hypothesis,
        audio_s=clip.duration_s,
        reference_words=score.reference_words,
        word_errors=score.errors,
        word_lag_ms=tuple(1000 * lag for lag in word_lags(playback, speech)) if speech else (),
        first_partial_ms=_ms(first_text_lag(playback, speech[0])) if speech else None,
        end_to_final_ms=_ms(end_to_final(playback)),
        ttct_ms=tuple(event.ttct_ms for event in timed if isinstance(event, Final)),
        e2e_partial_ms=tuple(event.e2e_ms for event in timed if isinstance(event, Partial)),
        e2e_final_ms=tuple(event.e2e_ms for event in timed if isinstance(event, Final)),
        errors=tuple(f"{event.code}: {event.message}" for event in events if isinstance(event, SessionError)),
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def summarize(clips: Sequence[ClipResult]) -> StreamingSummary:
    """Corpus WER, hallucinations and latency percentiles of the streaming run."""
    lags = [lag for clip in clips for lag in clip.word_lag_ms]
    ends = [clip.end_to_final_ms for clip in clips if clip.end_to_final_ms is not None]
    ttct = [float(value) for clip in clips for value in clip.ttct_ms]
    firsts = [clip.first_partial_ms for clip in clips if clip.first_partial_ms is not None]
    words = sum(clip.reference_words for clip in clips)
    errors = sum(clip.word_errors for clip in clips)
    no_speech = [clip for clip in clips if not clip.reference.strip()]
    return StreamingSummary(
        clips=len(clips),
        audio_s=sum(clip.audio_s for clip in clips),
        reference_words=words,
        word_errors=errors,
        wer=ratio(errors, words),
        no_speech_clips=len(no_speech),
        hallucinations=sum(1 for clip in no_speech if clip.hypothesis.strip()),
        word_lag_p50_ms=percentile(lags, 50),
        word_lag_p90_ms=percentile(lags, 90),
        end_to_final_p50_ms=percentile(ends, 50),
        end_to_final_p90_ms=percentile(ends, 90),
        ttct_p50_ms=percentile(ttct, 50),
        ttct_p90_ms=percentile(ttct, 90),
        e2e_partial_p50_ms=percentile([float(v) for clip in clips for v in clip.e2e_partial_ms], 50),
        e2e_final_p50_ms=percentile([float(v) for clip in clips for v in clip.e2e_final_ms], 50),
        first_partial_p50_ms=percentile(firsts, 50),
        clip_errors=sum(1 for clip in clips if clip.errors),
    )


def _cell(value: float | None, spec: str = ".0f", unit: str = "", missing: str = "n/a") -> str:
    return missing if value is None else f"{value:{spec}}{unit}"


def _pair(first: float | None, second: float | None) -> str:
    return "n/a" if first is None and second is None else f"{_cell(first)}/{_cell(second)}"


def format_table(report: Report) -> str:
    """The report as a fixed-width text table: one row for streaming, one for offline when run."""
    s, r, o = report.streaming, report.resources, report.offline
    wyoming = report.protocol == "wyoming"
    headers = [
        "mode",
        "clips",
        "WER",
        "halluc",
        "word lag ms p50/p90",
        "audio-stop->transcript ms p50/p90" if wyoming else "end->final ms p50/p90",
        "ttct ms p50/p90",
        "e2e ms partial/final p50",
        "1st chunk ms p50" if wyoming else "1st partial ms p50",
        "decode ms",
        "CPU s/audio s",
        "peak RSS",
        "ready",
        "idle CPU",
    ]
    rows = [
        headers,
        [
            "streaming",
            str(s.clips),
            _cell(s.wer, ".1%"),
            f"{s.hallucinations}/{s.no_speech_clips}",
            _pair(s.word_lag_p50_ms, s.word_lag_p90_ms),
            _pair(s.end_to_final_p50_ms, s.end_to_final_p90_ms),
            _pair(s.ttct_p50_ms, s.ttct_p90_ms),
            _pair(s.e2e_partial_p50_ms, s.e2e_final_p50_ms),
            _cell(s.first_partial_p50_ms),
            "-",
            _cell(r.cpu_s_per_audio_s, ".3f"),
            _cell(r.peak_rss_mb, ".0f", " MB"),
            _cell(r.start_to_ready_s, ".2f", " s"),
            _cell(r.idle_cpu_percent, ".1f", " %"),
        ],
    ]
    if o is not None:
        rows.append(
            ["offline", str(o.clips), _cell(o.wer, ".1%"), f"{o.hallucinations}/{s.no_speech_clips}"]
            + ["-"] * 5
            + [f"{o.decode_ms_mean:.0f}", _cell(o.cpu_s_per_audio_s, ".3f"), "-", "-", "-"]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    pacing = "real time" if report.realtime else "fast"
    title = (
        f"{report.corpus}: {s.clips} clips, {s.audio_s:.1f} s of audio, {report.transport}, {pacing},"
        f" concurrency {report.concurrency}, trailing silence {report.trailing_silence_s:g} s,"
        f" {report.normalizer} normaliser, {s.clip_errors} clip(s) with errors"
    )
    return "\n".join([title, *lines])


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item) for item in value]
    return value


def report_json(report: Report) -> str:
    """The report as indented JSON (floats rounded to 4 decimals)."""
    return json.dumps(_rounded(dataclasses.asdict(report)), indent=2)
