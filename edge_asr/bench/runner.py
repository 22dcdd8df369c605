"""Running the corpus: replayed as live speech through a transport, and decoded whole for the offline row."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Iterator, Sequence

import psutil

from ..agreement import join_words
from ..audio import pcm16_to_float
from ..config import Settings
from ..decoding import WhisperTranscriber
from ..engine import Engine
from ..events import SessionError
from ..model import ModelError
from ..transcript import Word
from ..vocabulary import NamesInPrompt, NameSpeller, names_prompt
from .corpus import Clip
from .errors import BenchError
from .pacing import Replay
from .report import OfflineClip, OfflineSummary
from .resources import Resources, cpu_seconds, measure
from .scoring import WordScore, ratio, score_names, score_words
from .timing import Playback, final_text
from .transports import EngineTransport, Transport, WebSocketTransport, WyomingTransport

_LOGGER = logging.getLogger(__name__)


def _progress(label: str, done: int, total: int, clip: Clip, hypothesis: str, score: WordScore) -> None:
    """A line on stderr per clip: its name, its WER (or whether a no-speech clip stayed silent) and its text."""
    if score.reference_words:
        verdict = f"WER {score.errors / score.reference_words:4.0%}"
    else:
        verdict = "HALLUCINATED" if hypothesis.strip() else "no speech"
    print(
        f"{label}[{done:>{len(str(total))}}/{total}] {clip.name}  {verdict}  {hypothesis!r}",
        file=sys.stderr,
        flush=True,
    )


async def _replay_all(clips: Sequence[Clip], transport: Transport, concurrency: int, label: str) -> list[Playback]:
    """Play every clip with `concurrency` speakers taking clips from one queue; results in clip order."""
    queue: Iterator[tuple[int, Clip]] = iter(enumerate(clips))
    playbacks: dict[int, Playback] = {}

    async def speaker() -> None:
        for index, clip in queue:
            playback = await transport.play(clip.read_pcm())
            playbacks[index] = playback
            hypothesis = final_text(playback.events)
            _progress(label, len(playbacks), len(clips), clip, hypothesis, score_words(clip.reference, hypothesis))
            for item in playback.events:
                if isinstance(item.event, SessionError):
                    print(f"    error {item.event.code}: {item.event.message}", file=sys.stderr, flush=True)

    tasks = [asyncio.create_task(speaker()) for _ in range(min(concurrency, len(clips)))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return [playbacks[index] for index in range(len(clips))]


async def replay_corpus(
    args: argparse.Namespace,
    settings: Settings,
    clips: Sequence[Clip],
    label: str = "",
    names: tuple[str, ...] = (),
) -> tuple[list[Playback], Resources]:
    """Replay the corpus once through the chosen transport (in-process: a new engine), every request carrying
    the household's `names`, measuring the serving process; `label` prefixes the progress lines."""
    replay = Replay(realtime=not args.fast, trailing_silence_s=args.trailing_silence, names=names)
    replay_all = functools.partial(_replay_all, clips, concurrency=args.concurrency, label=label)
    audio_s = sum(clip.duration_s for clip in clips)
    if args.url or args.wyoming:
        transport: Transport = (
            WebSocketTransport(args.url, replay)
            if args.url
            else WyomingTransport(args.wyoming, settings.model.language, replay)
        )
        if args.pid is None:
            return await replay_all(transport), Resources(None, None, None, None)
        try:
            return await measure(psutil.Process(args.pid), functools.partial(replay_all, transport), audio_s)
        except psutil.Error as err:
            raise BenchError(f"--pid {args.pid}: {err}") from None
    if args.concurrency > settings.limits.max_sessions:
        raise BenchError(
            f"--concurrency {args.concurrency} exceeds limits.max_sessions ({settings.limits.max_sessions})"
        )
    started = time.monotonic()
    engine = Engine(settings)
    try:
        try:
            await engine.start()
        except ModelError as err:
            raise BenchError(str(err)) from None
        ready_s = time.monotonic() - started
        _LOGGER.info("Engine ready in %.2f s", ready_s)
        transport = EngineTransport(engine, replay)
        return await measure(psutil.Process(), functools.partial(replay_all, transport), audio_s, ready_s)
    finally:
        await engine.stop()


def decode_whole(
    clips: Sequence[Clip], settings: Settings, names: tuple[str, ...] = ()
) -> tuple[list[OfflineClip], OfflineSummary]:
    """Decode every clip whole with the same model, padded to 30 s as Whisper was trained, with no prompt but the
    household's `names`, which it uses as the service's finals do (decoded without them first, names let in
    only where that was unsure, and spelled as the service spells them).

    The baseline is the standard whole-utterance decode (what a non-streaming server does), whatever
    `model.encoder_floor_s` the streaming run uses.
    """
    try:
        transcriber = WhisperTranscriber(dataclasses.replace(settings.model, encoder_floor_s=30.0))
    except ModelError as err:
        raise BenchError(str(err)) from None
    prompt, left_out = names_prompt(names, settings.stream.names_chars)
    if left_out:
        _LOGGER.warning("%d of %d names did not fit in the decoder prompt (stream.names_chars)", left_out, len(names))
    speller = NameSpeller(names, transcriber.common_words)
    in_prompt = NamesInPrompt("", speller) if prompt else None
    process = psutil.Process()
    cpu = cpu_seconds(process)
    results: list[OfflineClip] = []
    words = no_text = 0
    for clip in clips:
        transcript = transcriber.decode(
            pcm16_to_float(clip.read_pcm()), prompt, settings.model.language, names=in_prompt
        )
        text = join_words([Word(word.start, word.end, speller.spell(word.text)) for word in transcript.words])
        score = score_words(clip.reference, text)
        named = score_names(clip.reference, text, names)
        words += score.reference_words
        results.append(
            OfflineClip(
                clip.name,
                text,
                score.errors,
                transcript.asr_ms,
                score.inserted_after_speech,
                score.lost_first_two,
                named.found,
                named.expected,
            )
        )
        if score.reference_words and not text.strip():
            no_text += 1
        _progress("offline ", len(results), len(clips), clip, text, score)
    cpu = cpu_seconds(process) - cpu
    errors = sum(result.word_errors for result in results)
    names_found = sum(result.names_found for result in results)
    names_expected = sum(result.names_expected for result in results)
    return results, OfflineSummary(
        clips=len(results),
        reference_words=words,
        word_errors=errors,
        wer=ratio(errors, words),
        hallucinations=sum(
            1 for clip, r in zip(clips, results, strict=True) if not clip.reference.strip() and r.hypothesis.strip()
        ),
        decode_ms_mean=sum(result.decode_ms for result in results) / len(results),
        cpu_s_per_audio_s=ratio(cpu, sum(clip.duration_s for clip in clips)),
        inserted_after_speech=sum(result.inserted_after_speech for result in results),
        lost_first_two=sum(result.lost_first_two for result in results),
        no_text=no_text,
        names_found=names_found,
        names_expected=names_expected,
        names_right=ratio(names_found, names_expected),
    )
