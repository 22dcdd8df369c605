"""The bench's findings: per-clip results, corpus summaries per run, their medians, and the report as a table
and as JSON."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from ..events import Final, Partial, SessionError
from .corpus import Clip
from .nodes import NodeSessions, format_nodes
from .output import json_text
from .resources import Resources
from .scoring import normalize, percentile, ratio, score_names, score_words
from .timing import Playback, end_to_final, final_text, first_text_lag, word_lags


@dataclass(frozen=True)
class ClipResult:
    """One clip's streaming outcome; times in ms.

    `inserted_after_speech` and `lost_first_two` are classes of the word errors (see `WordScore`); `no_final`
    says the reference has words but no final with text came; `revised_finals` counts the finals that changed
    words the partials had shown as stable (None when the protocol does not say, as Wyoming's does not).
    `names_found` of `names_expected`: the vocabulary's names in the reference that the final text has (see
    `NameScore`; 0 of 0 without a vocabulary).
    """

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
    inserted_after_speech: int
    lost_first_two: int
    no_final: bool
    revised_finals: int | None
    names_found: int
    names_expected: int


@dataclass(frozen=True)
class OfflineClip:
    """One clip decoded whole."""

    name: str
    hypothesis: str
    word_errors: int
    decode_ms: float
    inserted_after_speech: int
    lost_first_two: int
    names_found: int
    names_expected: int


@dataclass(frozen=True)
class Latencies:
    """A streaming run's latency percentiles in ms, None where nothing was measured (in `RunMedians`, their
    medians across runs)."""

    word_lag_p50_ms: float | None
    word_lag_p90_ms: float | None
    end_to_final_p50_ms: float | None
    end_to_final_p90_ms: float | None
    ttct_p50_ms: float | None
    ttct_p90_ms: float | None
    e2e_partial_p50_ms: float | None
    e2e_final_p50_ms: float | None
    first_partial_p50_ms: float | None


# A dataclass's fields run from its last base to its first, then its own: `StreamingSummary` and `RunMedians` take
# their leading fields from a base after `Latencies`, so that the JSON report keeps its order of keys.
@dataclass(frozen=True)
class _CorpusWords:
    """`StreamingSummary`'s leading fields: the corpus and its word errors."""

    clips: int
    audio_s: float
    reference_words: int
    word_errors: int
    wer: float | None
    no_speech_clips: int
    hallucinations: int


@dataclass(frozen=True)
class StreamingSummary(Latencies, _CorpusWords):
    """The streaming run over the corpus; times in ms. `names_right` is `names_found` / `names_expected` (None
    when no reference holds a name of the vocabulary, or there is none)."""

    clip_errors: int
    inserted_after_speech: int
    lost_first_two: int
    no_final: int
    revised_finals: int | None
    names_found: int
    names_expected: int
    names_right: float | None


@dataclass(frozen=True)
class OfflineSummary:
    """Every clip decoded whole by the same model; `no_text` counts clips with reference words that got none;
    names as in `StreamingSummary`."""

    clips: int
    reference_words: int
    word_errors: int
    wer: float | None
    hallucinations: int
    decode_ms_mean: float
    cpu_s_per_audio_s: float | None
    inserted_after_speech: int
    lost_first_two: int
    no_text: int
    names_found: int
    names_expected: int
    names_right: float | None


@dataclass(frozen=True)
class RunResult:
    """One replay of the whole corpus: its summary, what the measured process used, and each clip."""

    streaming: StreamingSummary
    resources: Resources
    clips: tuple[ClipResult, ...]


@dataclass(frozen=True)
class _ScoreMedians:
    """`RunMedians`' leading fields: the medians of the word scores (see `_CorpusWords` for why a base)."""

    wer: float | None
    word_errors: float | None
    hallucinations: float | None
    inserted_after_speech: float | None
    lost_first_two: float | None
    no_final: float | None
    revised_finals: float | None
    names_found: float | None
    names_expected: float | None
    names_right: float | None


@dataclass(frozen=True)
class RunMedians(Latencies, _ScoreMedians):
    """The median across runs of each numeric column, taken over the runs that measured it.

    Each field is the median of the same-named field of the runs' `StreamingSummary` or `Resources`
    (WER is the median of the per-run WERs, not a WER of the pooled errors).
    """

    clip_errors: float | None
    cpu_s_per_audio_s: float | None
    peak_rss_mb: float | None
    start_to_ready_s: float | None
    idle_cpu_percent: float | None


@dataclass(frozen=True)
class Stability:
    """How alike the runs' final texts are: `share` of clips whose normalised final text is the same in every
    run (None for a single run, where there is nothing to compare) and the clips whose text differs."""

    share: float | None
    differing_clips: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    """Everything `edge-asr bench` found; `streaming`, `resources` and `clips` are those of the first run."""

    corpus: str
    transport: str
    protocol: str
    concurrency: int
    realtime: bool
    trailing_silence_s: float
    normalizer: str
    runs: tuple[RunResult, ...]
    median: RunMedians
    stability: Stability
    offline: OfflineSummary | None
    offline_clips: tuple[OfflineClip, ...]
    # With --nodes: the sessions each node behind the balancer opened during the runs.
    nodes: tuple[NodeSessions, ...] = ()

    @property
    def streaming(self) -> StreamingSummary:
        """The first run's summary."""
        return self.runs[0].streaming

    @property
    def resources(self) -> Resources:
        """What the measured process used in the first run."""
        return self.runs[0].resources

    @property
    def clips(self) -> tuple[ClipResult, ...]:
        """The first run's clips."""
        return self.runs[0].clips

    @property
    def clip_errors(self) -> int:
        """Clips that got an error, over all runs."""
        return sum(run.streaming.clip_errors for run in self.runs)


def clip_result(
    clip: Clip, playback: Playback, speech: tuple[float, float] | None, names: Sequence[str] = ()
) -> ClipResult:
    """Score one replay against its reference, and the vocabulary's `names` in it."""
    hypothesis = final_text(playback.events)
    score = score_words(clip.reference, hypothesis)
    named = score_names(clip.reference, hypothesis, names)
    events = [item.event for item in playback.events]
    timed = events if playback.timed else []
    finals = [event for event in events if isinstance(event, Final)]
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
        inserted_after_speech=score.inserted_after_speech,
        lost_first_two=score.lost_first_two,
        no_final=score.reference_words > 0 and not any(event.text.strip() for event in finals),
        revised_finals=sum(1 for event in finals if event.revised) if playback.timed else None,
        names_found=named.found,
        names_expected=named.expected,
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
    revised = [clip.revised_finals for clip in clips]
    names_found = sum(clip.names_found for clip in clips)
    names_expected = sum(clip.names_expected for clip in clips)
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
        inserted_after_speech=sum(clip.inserted_after_speech for clip in clips),
        lost_first_two=sum(clip.lost_first_two for clip in clips),
        no_final=sum(1 for clip in clips if clip.no_final),
        revised_finals=None if None in revised else sum(count for count in revised if count is not None),
        names_found=names_found,
        names_expected=names_expected,
        names_right=ratio(names_found, names_expected),
    )


_RESOURCE_FIELDS = frozenset(item.name for item in dataclasses.fields(Resources))


def median_of_runs(runs: Sequence[RunResult]) -> RunMedians:
    """The median of each numeric column across the runs (see `RunMedians`)."""

    def median(name: str) -> float | None:
        measured = [getattr(run.resources if name in _RESOURCE_FIELDS else run.streaming, name) for run in runs]
        values = [float(value) for value in measured if value is not None]
        return statistics.median(values) if values else None

    return RunMedians(**{item.name: median(item.name) for item in dataclasses.fields(RunMedians)})


def stability(runs: Sequence[RunResult]) -> Stability:
    """Which clips got the same final text, normalised as scored, in every run."""
    names = [clip.name for clip in runs[0].clips]
    differing = tuple(
        name for index, name in enumerate(names) if len({normalize(run.clips[index].hypothesis) for run in runs}) > 1
    )
    return Stability(1 - len(differing) / len(names) if len(runs) > 1 else None, differing)


def _cell(value: float | None, spec: str = ".0f", unit: str = "", missing: str = "n/a") -> str:
    return missing if value is None else f"{value:{spec}}{unit}"


def _pair(first: float | None, second: float | None) -> str:
    return "n/a" if first is None and second is None else f"{_cell(first)}/{_cell(second)}"


def _names(found: float | None, expected: float | None) -> str:
    """Names right as `names 34/48`; n/a when no reference holds a name of the vocabulary (or there is none)."""
    return "n/a" if found is None or not expected else f"names {found:g}/{expected:g}"


# Clips named in the table's stability line; the JSON report names them all.
_NAMED_DIFFERING_CLIPS = 10


def _run_row(
    label: str, clips: int, no_speech: int, s: StreamingSummary | RunMedians, r: Resources | RunMedians
) -> list[str]:
    """A streaming row: one run's summary and resources, or the medians across runs."""
    return [
        label,
        str(clips),
        _cell(s.wer, ".1%"),
        _names(s.names_found, s.names_expected),
        f"{_cell(s.hallucinations, 'g')}/{no_speech}",
        _cell(s.inserted_after_speech, "g"),
        _cell(s.lost_first_two, "g"),
        _cell(s.no_final, "g"),
        _cell(s.revised_finals, "g"),
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
    ]


def format_table(report: Report) -> str:
    """The report as a fixed-width text table: a streaming row per run (and their median when there are several),
    one row for the whole-clip decode when run, and how alike the runs' final texts are."""
    s, o = report.streaming, report.offline
    wyoming = report.protocol == "wyoming"
    headers = [
        "mode",
        "clips",
        "WER",
        "names right",
        "halluc",
        "ins after",
        "lost 1st 2",
        "no final",
        "revised",
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
    several = len(report.runs) > 1
    rows = [headers]
    for number, run in enumerate(report.runs, 1):
        label = f"streaming {number}" if several else "streaming"
        rows.append(_run_row(label, run.streaming.clips, s.no_speech_clips, run.streaming, run.resources))
    if several:
        rows.append(_run_row("median", s.clips, s.no_speech_clips, report.median, report.median))
    if o is not None:
        rows.append(
            ["offline", str(o.clips), _cell(o.wer, ".1%"), _names(o.names_found, o.names_expected)]
            + [f"{o.hallucinations}/{s.no_speech_clips}"]
            + [str(o.inserted_after_speech), str(o.lost_first_two), str(o.no_text)]
            + ["-"] * 6
            + [f"{o.decode_ms_mean:.0f}", _cell(o.cpu_s_per_audio_s, ".3f"), "-", "-", "-"]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    pacing = "real time" if report.realtime else "fast"
    title = (
        f"{report.corpus}: {s.clips} clips, {s.audio_s:.1f} s of audio, {report.transport}, {pacing},"
        f" concurrency {report.concurrency}, trailing silence {report.trailing_silence_s:g} s,"
        f" {report.normalizer} normaliser, {report.clip_errors} clip(s) with errors"
        + (f" over {len(report.runs)} runs" if several else "")
    )
    if report.nodes:
        attempted = sum(run.streaming.clips for run in report.runs)
        lines.append(format_nodes(report.nodes, report.protocol, attempted))
    share = report.stability.share
    if share is None:
        return "\n".join([title, *lines])
    differing = report.stability.differing_clips
    stable = f"same final text in {share:.0%} of clips across {len(report.runs)} runs"
    if differing:
        named = ", ".join(differing[:_NAMED_DIFFERING_CLIPS])
        more = len(differing) - _NAMED_DIFFERING_CLIPS
        stable += f"; differs: {named}" + (f" and {more} more" if more > 0 else "")
    return "\n".join([title, *lines, stable])


def report_json(report: Report) -> str:
    """The report as indented JSON (floats rounded to 4 decimals).

    Besides `runs`, `median` and `stability`, the first run's `streaming`, `resources` and `clips` are at the
    top level, where readers of single-run reports find them.
    """
    data = dataclasses.asdict(report) | dataclasses.asdict(report.runs[0])
    return json_text(data, 4)
