"""`edge-asr bench --endpointing`: Wyoming satellites that never stop by themselves, so the server must end each
command; how soon after the speech ends the transcript comes, and how often it comes before (a command cut).

Each clip is played four ways: as it is (`short`); with 0.3 s and with 0.5 s of silence put between two of its words,
where the local model's word times and the quietest 10 ms between them say (`pause300`, `pause500`); and under room
noise at 5 dB SNR, a fan, mains hum or hiss in turn (`noise5`). After the clip the satellite goes on sending silence
(or the same noise) until the transcript comes or `--endpoint-wait` seconds have been sent, then closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import statistics
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from wyoming.asr import Transcript
from wyoming.audio import AudioChunk, AudioStart
from wyoming.error import Error

from ..agreement import join_words
from ..audio import SAMPLE_RATE, SAMPLE_WIDTH, pcm16_to_float
from ..config import Settings
from ..decoding import WhisperTranscriber
from ..model import ModelError
from ..transcript import Word
from .corpus import Clip, load_corpus
from .errors import BenchError
from .output import json_text, print_report
from .pacing import Replay, send_audio
from .room import (
    NOISE_KINDS,
    NoiseKind,
    Samples,
    mix,
    pcm_to_samples,
    quietest_point,
    room_noise,
    samples_to_pcm,
    speech_end_s,
    speech_rms,
    with_pause,
)
from .scoring import score_words
from .wyoming_client import WyomingClient

PAUSES_S = (0.3, 0.5)
NOISE_SNR_DB = 5.0
# A command in noise must end within this long of its speech.
NOISE_END_WITHIN_S = 1.5
# How far either side of Whisper's word times the quiet between two words is looked for: its times are off by tens
# of milliseconds, and further would find the closure of a stop inside a word.
_GAP_SEARCH_S = 0.04
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Trial:
    """One request: the clip as played (`pcm`, before the filler), where its speech ends, its filler's level (the
    noise under it, 0 for digital silence), and what the same model hears in it decoded whole."""

    clip: str
    kind: str
    reference: str
    pcm: bytes
    speech_end_s: float
    noise: NoiseKind
    noise_level: float
    whole_text: str = ""


@dataclass(frozen=True)
class TrialResult:
    """What the satellite got: the transcript's text (None: none came), speech end → transcript in seconds (negative:
    the command was cut), and an error the server sent."""

    clip: str
    kind: str
    reference: str
    text: str | None
    latency_s: float | None
    error: str | None = None
    whole_text: str = ""

    @property
    def cut(self) -> bool:
        """The transcript came before the speech ended."""
        return self.latency_s is not None and self.latency_s < 0


@dataclass(frozen=True)
class KindSummary:
    """The trials of one kind: latency percentiles over the transcripts that came after the speech, and rates."""

    kind: str
    trials: int
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    cut: float
    empty: float
    missing: float
    ended_within: float
    wer: float | None
    whole_wer: float | None
    no_speech_trials: int
    no_speech_with_text: int


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _pause_point(samples: Samples, words: Sequence[Word], rng: np.random.Generator) -> float | None:
    """A point between two words, chosen at random, where a pause goes in; None for a clip of fewer than two."""
    if len(words) < 2:
        return None
    index = int(rng.integers(1, len(words)))
    before, after = words[index - 1].end - _GAP_SEARCH_S, words[index].start + _GAP_SEARCH_S
    return quietest_point(samples, max(0.0, min(before, after)), max(before, after))


def make_trials(clips: Sequence[Clip], settings: Settings) -> list[Trial]:
    """Every clip as it is, with each pause, and in noise (the pauses where the local model hears word gaps), each
    with its whole-clip decode by the same model: the WER a transcript is held to."""
    try:
        transcriber = WhisperTranscriber(dataclasses.replace(settings.model, encoder_floor_s=30.0))
    except ModelError as err:
        raise BenchError(str(err)) from None
    trials: list[Trial] = []
    for index, clip in enumerate(clips):
        samples = pcm_to_samples(clip.read_pcm())
        end_s = speech_end_s(samples)
        trials.append(Trial(clip.name, "short", clip.reference, samples_to_pcm(samples), end_s, "hiss", 0.0))
        if not clip.has_words:
            continue
        rng = np.random.default_rng(_seed(clip.name))
        words = transcriber.decode(pcm16_to_float(clip.read_pcm()), "", settings.model.language).words
        point = _pause_point(samples, words, rng)
        for pause_s in PAUSES_S:
            if point is None or point >= end_s:
                continue
            paused = with_pause(samples, point, pause_s)
            kind = f"pause{round(pause_s * 1000)}"
            trials.append(Trial(clip.name, kind, clip.reference, samples_to_pcm(paused), end_s + pause_s, "hiss", 0.0))
        noise = NOISE_KINDS[index % len(NOISE_KINDS)]
        level = speech_rms(samples) / 10 ** (NOISE_SNR_DB / 20)
        noisy = mix(samples, room_noise(noise, len(samples), rng), NOISE_SNR_DB)
        trials.append(
            Trial(clip.name, f"noise{NOISE_SNR_DB:g}", clip.reference, samples_to_pcm(noisy), end_s, noise, level)
        )
    language = settings.model.language
    return [
        dataclasses.replace(
            trial, whole_text=join_words(transcriber.decode(pcm16_to_float(trial.pcm), "", language).words)
        )
        for trial in trials
    ]


def _filler(trial: Trial, seconds: float, rng: np.random.Generator) -> bytes:
    """What the satellite sends after the clip: digital silence, or more of the room's noise."""
    count = int(seconds * SAMPLE_RATE)
    if not trial.noise_level:
        return bytes(count * SAMPLE_WIDTH)
    return samples_to_pcm((trial.noise_level * room_noise(trial.noise, count, rng)).astype(np.float32))


async def play(uri: str, trial: Trial, language: str, wait_s: float) -> TrialResult:
    """One satellite request in real time, with no audio-stop: read until the transcript (or the server's close),
    stop sending then, and close."""
    filler_s = max(0.0, wait_s - len(trial.pcm) / (SAMPLE_RATE * SAMPLE_WIDTH))
    audio = trial.pcm + _filler(trial, filler_s, np.random.default_rng(_seed(trial.clip) + 1))
    sent: list[tuple[float, float]] = []
    async with WyomingClient(uri, CONNECT_TIMEOUT_S) as client:
        connection = client.connection
        await client.ask(language)
        await connection.write_event(AudioStart(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=1).event())

        async def chunk(pcm: bytes) -> None:
            await connection.write_event(
                AudioChunk(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=1, audio=pcm).event()
            )

        sender = asyncio.create_task(send_audio(audio, Replay(realtime=True, trailing_silence_s=0.0), chunk, sent))
        text: str | None = None
        error: str | None = None
        arrived = 0.0
        try:
            while (event := await asyncio.wait_for(connection.read_event(), wait_s + CONNECT_TIMEOUT_S)) is not None:
                if Transcript.is_type(event.type):
                    arrived, text = time.monotonic(), Transcript.from_event(event).text
                    break
                if Error.is_type(event.type):
                    error = Error.from_event(event).text
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
    latency = None
    if text is not None:
        spoken_at = next((at for position_s, at in sent if position_s >= trial.speech_end_s), None)
        # A transcript before the chunk with the speech's end was even sent cut the command.
        latency = arrived - spoken_at if spoken_at is not None else -1.0
    return TrialResult(trial.clip, trial.kind, trial.reference, text, latency, error, trial.whole_text)


def summarize_kind(kind: str, results: Sequence[TrialResult]) -> KindSummary:
    """The figures of one kind of trial."""
    spoken = [result for result in results if score_words(result.reference, "").reference_words]
    silent = [result for result in results if result not in spoken]
    late = sorted(result.latency_s for result in spoken if result.latency_s is not None and result.latency_s >= 0)
    errors = words = whole_errors = 0
    for result in spoken:
        whole_errors += score_words(result.reference, result.whole_text).errors
        if result.text is not None:
            score = score_words(result.reference, result.text)
            errors, words = errors + score.errors, words + score.reference_words
    count = len(spoken) or 1
    return KindSummary(
        kind=kind,
        trials=len(results),
        latency_p50_ms=round(statistics.median(late) * 1000) if late else None,
        latency_p90_ms=round(float(np.percentile(late, 90)) * 1000) if late else None,
        cut=sum(result.cut for result in spoken) / count,
        empty=sum(result.text is not None and not result.text.strip() for result in spoken) / count,
        missing=sum(result.text is None for result in spoken) / count,
        ended_within=sum(0 <= (result.latency_s or -1) <= NOISE_END_WITHIN_S for result in spoken) / count,
        wer=errors / words if words else None,
        whole_wer=whole_errors / sum(score_words(result.reference, "").reference_words for result in spoken)
        if spoken
        else None,
        no_speech_trials=len(silent),
        no_speech_with_text=sum(bool(result.text and result.text.strip()) for result in silent),
    )


def format_summaries(uri: str, summaries: Sequence[KindSummary]) -> str:
    """The report's table."""
    lines = [
        f"endpointing through {uri}: speech end → transcript, satellites that never send audio-stop",
        f"{'clips':10} {'n':>4} {'p50 ms':>7} {'p90 ms':>7} {'cut':>6} {'empty':>6} {'missing':>8}"
        f" {'≤1.5 s':>7} {'WER':>6} {'whole':>6}",
    ]
    for summary in summaries:
        lines.append(
            f"{summary.kind:10} {summary.trials:>4} {_ms(summary.latency_p50_ms):>7} {_ms(summary.latency_p90_ms):>7}"
            f" {summary.cut:>6.1%} {summary.empty:>6.1%} {summary.missing:>8.1%} {summary.ended_within:>7.1%}"
            f" {_percent(summary.wer):>6} {_percent(summary.whole_wer):>6}"
        )
    silent = sum(summary.no_speech_trials for summary in summaries)
    with_text = sum(summary.no_speech_with_text for summary in summaries)
    lines.append(f"clips without speech: {silent}, answered with text: {with_text}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


async def _play_all(uri: str, trials: Sequence[Trial], language: str, wait_s: float) -> list[TrialResult]:
    results: list[TrialResult] = []
    for number, trial in enumerate(trials, 1):
        try:
            result = await play(uri, trial, language, wait_s)
        except OSError as err:
            raise BenchError(f"{uri}: {err or type(err).__name__}") from None
        results.append(result)
        latency = "-" if result.latency_s is None else f"{result.latency_s * 1000:.0f} ms"
        print(f"[{number}/{len(trials)}] {trial.kind} {trial.clip}  {latency}  {result.text!r}", file=sys.stderr)
    return results


def run_endpointing(args: argparse.Namespace, settings: Settings) -> int:
    """Run the endpointing bench against `--wyoming`; 0 when it ran."""
    try:
        if not args.wyoming:
            raise BenchError("--endpointing needs --wyoming URI: the server whose endpointing is measured")
        clips = load_corpus(args.corpus, args.match, args.limit)
        trials = make_trials(clips, settings)
        results = asyncio.run(_play_all(args.wyoming, trials, settings.model.language, args.endpoint_wait))
    except BenchError as err:
        print(f"edge-asr bench: {err}", file=sys.stderr)
        return 1
    kinds = list(dict.fromkeys(trial.kind for trial in trials))
    summaries = [summarize_kind(kind, [result for result in results if result.kind == kind]) for kind in kinds]

    def as_json() -> str:
        return json_text(
            {
                "server": args.wyoming,
                "summaries": [dataclasses.asdict(summary) for summary in summaries],
                "trials": [dataclasses.asdict(result) for result in results],
            },
            4,
        )

    return 0 if print_report(format_summaries(args.wyoming, summaries), as_json, args.json) else 1
