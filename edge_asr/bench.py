"""`edge-asr bench CORPUS`: replay WAV + TXT pairs like live speakers and report accuracy, latency, CPU and RSS.

Each clip (16 kHz mono s16le `.wav` beside its reference `.txt`; an empty `.txt` means no speech) is
sent in 20 ms chunks, paced against an absolute schedule (chunk k leaves when its audio has been
"spoken": at start + bytes sent including that chunk / 32000, so a slow send never accumulates drift;
`--fast` sends without pacing), followed by `--trailing-silence` seconds of digital silence and the end
signal, through the engine in-process, a running server (`--url ws://HOST:PORT/ws/stream`) or any Wyoming
speech-to-text server (`--wyoming tcp://HOST:PORT`).

How the numbers are measured (all times from `time.monotonic()` in this process):

- WER: word edit distance / reference words over the whole corpus, after normalising both sides
  (Whisper's English normaliser when `whisper_normalizer` is installed, else a built-in one).
  Words a no-speech clip produced count as insertions; such clips are also counted as hallucinations.
- A position in a clip is "spoken" when the chunk holding it was handed to the transport.
- Word lag: the clip's final words are assumed evenly spread between the speech start and the last
  voiced frame that `VadGate` (with the local stream settings) finds in the clip: word i of N ends at
  start + (i+1)/N * (end - start). Its lag is the first time any partial (or the final) had that
  normalised word at that position, minus when that word end was spoken. It is an estimate: a lag may
  be negative when a word is shorter than the even share.
- First partial: speech start (as above) to the first partial (or the final, when no partial came first).
- End -> final: sending the end signal to receiving the clip's last final; 0 when it came before the end
  (the server's VAD already closed the utterance in the trailing silence). Clips without a final are left out.
- ttct and e2e: the server's own `ttct_ms` and `e2e_ms` fields (n/a for Wyoming, whose events carry none).
- CPU-seconds per audio-second: CPU time (user + system) of the measured process during the replay,
  divided by the seconds of corpus audio (trailing silence not included). In-process that process is
  this one (engine and bench client together); with `--url` or `--wyoming` it is `--pid`, else not measured.
  Peak RSS is sampled every 100 ms. Idle CPU is measured over 3 s with no session after the replay.

WebSocket end of a clip: after `{"type":"end"}` the bench reads until the server's `done` (sent once
everything before the end is transcribed, after the final if there is one). A server that closes first,
or sends no `done` within 10 s of the end, gives the clip an error.

Wyoming, as a satellite speaks it: per clip one connection with `transcribe`, `audio-start`, the chunks as
`audio-chunk`s and `audio-stop` as the end signal; then the bench reads until `transcript-stop`, or until
`transcript` (or `error`) from a server that sent no `transcript-start` (one that does not stream, such as
wyoming-faster-whisper). None within 30 s of `audio-stop` gives the clip an error. The `transcript-chunk`s
add up to the text so far and count as partials (word lag; first partial is the first transcript-chunk, or
the transcript when none came first); `transcript` is the final, so end -> final is audio-stop -> transcript.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import fnmatch
import functools
import json
import logging
import re
import sys
import time
import wave
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from adapters.wyoming import WyomingClient, WyomingReply

from .agreement import join_words
from .audio import BYTES_PER_SECOND, SAMPLE_RATE, SAMPLE_WIDTH, pcm16_to_float
from .config import Settings, StreamSettings
from .engine import Engine
from .events import Done, Event, Final, Partial, SessionError
from .model import ModelError, WhisperTranscriber
from .vad import VadGate

_LOGGER = logging.getLogger(__name__)

CHUNK_BYTES = BYTES_PER_SECOND * 20 // 1000
RSS_INTERVAL_S = 0.1
IDLE_SECONDS = 3.0
READY_TIMEOUT_S = 30.0
MAX_WAIT_AFTER_END_S = 10.0
MAX_WAIT_AFTER_AUDIO_STOP_S = 30.0


class BenchError(Exception):
    """A problem that stops the bench: bad corpus, unreachable server, bad flags."""


# --- text: normalising and scoring -------------------------------------------------------------------

_UNITS = {
    word: value
    for value, word in enumerate(
        (
            "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
        )
    )
}  # fmt: skip
_TENS = {
    word: 10 * (index + 2)
    for index, word in enumerate(["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"])
}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")


def _spells_number(words: Sequence[str], index: int) -> bool:
    return index < len(words) and (words[index] in _UNITS or words[index] in _TENS)


def _parse_number(words: Sequence[str], index: int) -> tuple[int, int] | None:
    """The number spelled by the words from `index` and the index after it, or None when none starts there."""
    total = 0
    group: int | None = None
    last = ""
    last_scale = 0
    position = index
    while position < len(words):
        word = words[position]
        if _spells_number(words, position):
            value = _UNITS.get(word, _TENS.get(word, 0))
            if group is None:
                group = value
            elif (last == "tens" and 0 < value < 10) or (last == "hundred" and group % 100 == 0):
                group += value
            else:
                break
            last = "tens" if word in _TENS else "unit"
        elif word == "hundred" and group is not None and last in ("unit", "tens") and group < 100:
            group *= 100
            last = "hundred"
        elif word in _SCALES and group is not None and (not last_scale or _SCALES[word] < last_scale):
            last_scale = _SCALES[word]
            total += group * last_scale
            group = None
            last = "scale"
        elif word == "and" and last in ("hundred", "scale") and _spells_number(words, position + 1):
            pass  # "two hundred and five"
        else:
            break
        position += 1
    if position == index:
        return None
    return total + (group or 0), position


def builtin_normalize(text: str) -> str:
    """Lower case, no punctuation, "%" as "percent", spelled numbers as digits ("seventy two" -> "72")."""
    text = _THOUSANDS_COMMA.sub("", text.lower().replace("'", "").replace("\u2019", "")).replace("%", " percent ")
    words = _TOKEN.findall(text)
    out: list[str] = []
    index = 0
    while index < len(words):
        parsed = _parse_number(words, index)
        if parsed is None:
            out.append(words[index])
            index += 1
        else:
            out.append(str(parsed[0]))
            index = parsed[1]
    return " ".join(out)


@functools.cache
def _normalizer() -> tuple[str, Callable[[str], str]]:
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError:
        return "builtin", builtin_normalize
    whisper: Callable[[str], str] = EnglishTextNormalizer()
    return "whisper", whisper


def normalizer_name() -> str:
    """Which normaliser `normalize` uses: "whisper" or "builtin"."""
    return _normalizer()[0]


def normalize(text: str) -> str:
    """Text as scored: Whisper's English normaliser when installed, else `builtin_normalize`."""
    return " ".join(_normalizer()[1](text).split())


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Word edit distance: substitutions + deletions + insertions."""
    previous = list(range(len(hypothesis) + 1))
    for ref_index, ref_word in enumerate(reference, 1):
        current = [ref_index]
        for hyp_index, hyp_word in enumerate(hypothesis, 1):
            current.append(
                min(previous[hyp_index] + 1, current[-1] + 1, previous[hyp_index - 1] + (ref_word != hyp_word))
            )
        previous = current
    return previous[-1]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- what a replay records, and the latencies derived from it ----------------------------------------


@dataclass(frozen=True)
class Received:
    """An event and the monotonic time the bench received it."""

    at: float
    event: Event


@dataclass(frozen=True)
class Playback:
    """One clip's replay: events received, when each chunk left, when the end signal left.

    `timed` is False when the events carry no server timings (Wyoming's have none; their asr/e2e/ttct are 0
    placeholders the report leaves out).
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
    gate = VadGate(stream.vad_aggressiveness, stream.silence_ms)
    starts = [change.at_s for change in gate.push(pcm) if change.speaking]
    return (starts[0], gate.last_voice_end_s) if starts else None


def parse_message(raw: str | bytes) -> tuple[str, Event | None]:
    """A server message as its type and, for partial/final/error/done, the event."""
    try:
        data: Any = json.loads(raw)
        kind = str(data["type"])
        if kind == "partial":
            return kind, Partial(
                str(data["text"]), str(data["stable"]), int(data["utterance"]), int(data["asr_ms"]), int(data["e2e_ms"])
            )
        if kind == "final":
            return kind, Final(
                str(data["text"]),
                int(data["utterance"]),
                int(data["asr_ms"]),
                int(data["e2e_ms"]),
                int(data["ttct_ms"]),
                float(data["start"]),
                float(data["end"]),
            )
        if kind == "error":
            return kind, SessionError(str(data["code"]), str(data["message"]))
        if kind == "done":
            return kind, Done(int(data["utterances"]))
        return kind, None
    except (ValueError, TypeError, KeyError) as err:
        return "error", SessionError("bad_message", f"unreadable server message {raw!r:.200}: {err!r}")


# --- the corpus --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """A WAV file and its reference transcript."""

    name: str
    wav: Path
    reference: str
    duration_s: float

    def read_pcm(self) -> bytes:
        """The clip's s16le frames."""
        with wave.open(str(self.wav), "rb") as wav:
            return wav.readframes(wav.getnframes())


def _clip(wav_path: Path) -> Clip:
    try:
        with wave.open(str(wav_path), "rb") as wav:
            params = wav.getparams()
    except (OSError, wave.Error, EOFError) as err:
        raise BenchError(f"{wav_path}: not a readable WAV file ({err})") from None
    if (params.framerate, params.sampwidth, params.nchannels) != (SAMPLE_RATE, SAMPLE_WIDTH, 1):
        raise BenchError(
            f"{wav_path}: expected 16 kHz mono 16-bit audio, got {params.framerate} Hz,"
            f" {params.nchannels} channel(s), {8 * params.sampwidth}-bit"
        )
    reference = wav_path.with_suffix(".txt").read_text(encoding="utf-8").strip()
    return Clip(wav_path.stem, wav_path, reference, params.nframes / SAMPLE_RATE)


def load_corpus(directory: Path, match: str | None = None, limit: int | None = None) -> list[Clip]:
    """The .wav + .txt pairs of a directory, sorted by name, filtered by a glob on the name, at most `limit`."""
    if not directory.is_dir():
        raise BenchError(f"corpus {directory}: not a directory")
    clips: list[Clip] = []
    for wav_path in sorted(directory.glob("*.wav")):
        if match and not (fnmatch.fnmatchcase(wav_path.stem, match) or fnmatch.fnmatchcase(wav_path.name, match)):
            continue
        if not wav_path.with_suffix(".txt").is_file():
            _LOGGER.warning("Skipping %s: no %s beside it", wav_path.name, wav_path.with_suffix(".txt").name)
            continue
        clips.append(_clip(wav_path))
        if limit is not None and len(clips) >= limit:
            break
    if not clips:
        raise BenchError(f"corpus {directory}: no .wav + .txt pairs" + (f" matching {match!r}" if match else ""))
    return clips


# --- transports --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """How clips are sent: paced in real time or not, and the digital silence after each."""

    realtime: bool
    trailing_silence_s: float


async def _send_audio(
    pcm: bytes, replay: Replay, send: Callable[[bytes], Awaitable[None]], sent: list[tuple[float, float]]
) -> None:
    """Send the clip and its trailing silence in 20 ms chunks, appending (audio seconds sent, time) per chunk."""
    audio = pcm + bytes(int(replay.trailing_silence_s * SAMPLE_RATE) * SAMPLE_WIDTH)
    started = time.monotonic()
    for offset in range(0, len(audio), CHUNK_BYTES):
        chunk = audio[offset : offset + CHUNK_BYTES]
        position_s = (offset + len(chunk)) / BYTES_PER_SECOND
        if replay.realtime:
            delay = started + position_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)
        sent.append((position_s, time.monotonic()))
        await send(chunk)


class Transport(Protocol):
    """A way to reach the recogniser: plays one clip as one request and returns what came back."""

    async def play(self, pcm: bytes) -> Playback:
        """Send the clip (then silence and the end signal) and collect its events."""
        ...


class EngineTransport:
    """The engine in this process, one session per clip."""

    def __init__(self, engine: Engine, replay: Replay) -> None:
        self._engine = engine
        self._replay = replay

    async def play(self, pcm: bytes) -> Playback:
        """Feed the clip to a new session, then finish it."""
        received: list[Received] = []
        sent: list[tuple[float, float]] = []
        async with self._engine.session(source="bench") as session:

            async def read() -> None:
                async for event in session.events():
                    received.append(Received(time.monotonic(), event))

            reader = asyncio.create_task(read())
            await _send_audio(pcm, self._replay, session.feed, sent)
            end_at = time.monotonic()
            await session.finish()
        await reader
        return Playback(tuple(received), tuple(sent), end_at)


class WebSocketTransport:
    """A running server's `/ws/stream`, one connection per clip."""

    def __init__(self, url: str, replay: Replay) -> None:
        self._url = url
        self._replay = replay

    async def play(self, pcm: bytes) -> Playback:
        """Connect, wait for `ready`, stream the clip, send `end` and read until the clip is done."""
        try:
            async with connect(self._url, open_timeout=READY_TIMEOUT_S, max_size=None) as ws:
                return await self._play(ws, pcm)
        except (OSError, WebSocketException, asyncio.TimeoutError) as err:
            raise BenchError(f"{self._url}: {err or type(err).__name__}") from None

    async def _play(self, ws: ClientConnection, pcm: bytes) -> Playback:
        kind, event = parse_message(await asyncio.wait_for(ws.recv(), READY_TIMEOUT_S))
        if kind != "ready":
            error = event or SessionError("no_ready", f"the server's first message was {kind!r}, not ready")
            return Playback((Received(time.monotonic(), error),), (), time.monotonic())
        received: list[Received] = []

        async def read() -> bool:
            """Record events until `done`; False when the server closed first."""
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    at = time.monotonic()
                    event = parse_message(message)[1]
                    if event is not None:
                        received.append(Received(at, event))
                    if isinstance(event, Done):
                        return True
            return False

        reader = asyncio.create_task(read())
        sent: list[tuple[float, float]] = []
        with contextlib.suppress(ConnectionClosed):
            await _send_audio(pcm, self._replay, ws.send, sent)
            await ws.send(json.dumps({"type": "end"}))
        end_at = time.monotonic()
        try:
            finished = await asyncio.wait_for(reader, MAX_WAIT_AFTER_END_S)
            problem = None if finished else SessionError("closed", "the server closed the connection before done")
        except asyncio.TimeoutError:
            problem = SessionError("no_done", f"no done message within {MAX_WAIT_AFTER_END_S:g} s of the end")
        if problem is not None and not any(isinstance(item.event, SessionError) for item in received):
            received.append(Received(time.monotonic(), problem))
        return Playback(tuple(received), tuple(sent), end_at)


class WyomingReplies:
    """A Wyoming server's replies to one request as bench events.

    `transcript-chunk`s add up to the text so far (a partial); `transcript` is the final. The request is
    answered at `transcript-stop` or, from a server that sent no `transcript-start`, at `transcript` or `error`.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._text = ""
        self._streaming = False

    def add(self, at: float, reply: WyomingReply) -> bool:
        """Record one reply received at `at`; True when it answers the request."""
        if reply.kind == "transcript-start":
            self._streaming = True
        elif reply.kind == "transcript-chunk":
            self._text += reply.text
            self.received.append(Received(at, Partial(self._text, self._text, utterance=1, asr_ms=0, e2e_ms=0)))
        elif reply.kind == "transcript":
            final = Final(reply.text, utterance=1, asr_ms=0, e2e_ms=0, ttct_ms=0, start=0.0, end=0.0)
            self.received.append(Received(at, final))
        elif reply.kind == "error":
            self.received.append(Received(at, SessionError(reply.code or "error", reply.text)))
        return reply.kind == "transcript-stop" or (not self._streaming and reply.kind in ("transcript", "error"))


class WyomingTransport:
    """A Wyoming speech-to-text server (edge-asr's or another), one connection and one request per clip."""

    def __init__(self, uri: str, language: str, replay: Replay) -> None:
        self._uri = uri
        self._language = language
        self._replay = replay

    async def play(self, pcm: bytes) -> Playback:
        """Connect, send transcribe, audio-start, the clip and audio-stop, and read until the transcript."""
        try:
            client = WyomingClient(self._uri, READY_TIMEOUT_S)
        except ValueError as err:
            raise BenchError(f"--wyoming {err}") from None
        try:
            async with client:
                return await self._play(client, pcm)
        except (OSError, asyncio.TimeoutError) as err:
            raise BenchError(f"{self._uri}: {err or type(err).__name__}") from None

    async def _play(self, client: WyomingClient, pcm: bytes) -> Playback:
        replies = WyomingReplies()

        async def read() -> bool:
            """Record replies until the request is answered; False when the server closed first."""
            while (reply := await client.reply()) is not None:
                if replies.add(time.monotonic(), reply):
                    return True
            return False

        reader = asyncio.create_task(read())
        sent: list[tuple[float, float]] = []
        with contextlib.suppress(ConnectionError):
            await client.start(self._language)
            await _send_audio(pcm, self._replay, client.send, sent)
            await client.stop()
        end_at = time.monotonic()
        try:
            finished = await asyncio.wait_for(reader, MAX_WAIT_AFTER_AUDIO_STOP_S)
            problem = None if finished else SessionError("closed", "the server closed the connection before answering")
        except asyncio.TimeoutError:
            problem = SessionError(
                "no_transcript", f"no transcript within {MAX_WAIT_AFTER_AUDIO_STOP_S:g} s of audio-stop"
            )
        if problem is not None and not any(isinstance(item.event, SessionError) for item in replies.received):
            replies.received.append(Received(time.monotonic(), problem))
        return Playback(tuple(replies.received), tuple(sent), end_at, timed=False)


# --- resources ---------------------------------------------------------------------------------------


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class _Usage:
    """CPU time and peak RSS of one process from now until `stop`; RSS sampled every 100 ms."""

    def __init__(self, process: psutil.Process) -> None:
        self._process = process
        self.peak_rss = 0
        self._cpu_start = _cpu_seconds(process)
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
            await asyncio.sleep(RSS_INTERVAL_S)

    async def stop(self) -> float:
        """Stop sampling; return the CPU seconds used since the start."""
        self._sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sampler
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        return _cpu_seconds(self._process) - self._cpu_start


async def _idle_cpu_percent(process: psutil.Process) -> float:
    """CPU use of the process over IDLE_SECONDS, in % of one core."""
    cpu, started = _cpu_seconds(process), time.monotonic()
    await asyncio.sleep(IDLE_SECONDS)
    return 100 * (_cpu_seconds(process) - cpu) / (time.monotonic() - started)


# --- results -----------------------------------------------------------------------------------------


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
class Resources:
    """What the measured process used; None where it could not be measured."""

    cpu_s_per_audio_s: float | None
    peak_rss_mb: float | None
    start_to_ready_s: float | None
    idle_cpu_percent: float | None


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
    reference_words = normalize(clip.reference).split()
    events = [item.event for item in playback.events]
    timed = events if playback.timed else []
    return ClipResult(
        name=clip.name,
        reference=clip.reference,
        hypothesis=hypothesis,
        audio_s=clip.duration_s,
        reference_words=len(reference_words),
        word_errors=word_errors(reference_words, normalize(hypothesis).split()),
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


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


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
        wer=_ratio(errors, words),
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


# --- the run -----------------------------------------------------------------------------------------


def _progress(label: str, done: int, total: int, clip: Clip, hypothesis: str) -> None:
    """A line on stderr per clip: its name, its WER (or whether a no-speech clip stayed silent) and its text."""
    words = normalize(clip.reference).split()
    if words:
        score = f"WER {word_errors(words, normalize(hypothesis).split()) / len(words):4.0%}"
    else:
        score = "HALLUCINATED" if hypothesis.strip() else "no speech"
    print(
        f"{label}[{done:>{len(str(total))}}/{total}] {clip.name}  {score}  {hypothesis!r}", file=sys.stderr, flush=True
    )


async def _replay_all(clips: Sequence[Clip], transport: Transport, concurrency: int) -> list[Playback]:
    """Play every clip with `concurrency` speakers taking clips from one queue; results in clip order."""
    queue: Iterator[tuple[int, Clip]] = iter(enumerate(clips))
    playbacks: dict[int, Playback] = {}

    async def speaker() -> None:
        for index, clip in queue:
            playback = await transport.play(clip.read_pcm())
            playbacks[index] = playback
            _progress("", len(playbacks), len(clips), clip, final_text(playback.events))
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


async def _stream(
    args: argparse.Namespace, settings: Settings, clips: Sequence[Clip]
) -> tuple[list[Playback], Resources]:
    """Replay the corpus through the chosen transport, measuring the serving process."""
    replay = Replay(realtime=not args.fast, trailing_silence_s=args.trailing_silence)
    audio_s = sum(clip.duration_s for clip in clips)
    if args.url or args.wyoming:
        transport: Transport = (
            WebSocketTransport(args.url, replay)
            if args.url
            else WyomingTransport(args.wyoming, settings.model.language, replay)
        )
        if args.pid is None:
            return await _replay_all(clips, transport, args.concurrency), Resources(None, None, None, None)
        try:
            process = psutil.Process(args.pid)
            usage = _Usage(process)
            playbacks = await _replay_all(clips, transport, args.concurrency)
            cpu = await usage.stop()
            idle = await _idle_cpu_percent(process)
        except psutil.Error as err:
            raise BenchError(f"--pid {args.pid}: {err}") from None
        return playbacks, Resources(_ratio(cpu, audio_s), usage.peak_rss / 2**20, None, idle)
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
        usage = _Usage(psutil.Process())
        playbacks = await _replay_all(clips, EngineTransport(engine, replay), args.concurrency)
        cpu = await usage.stop()
        idle = await _idle_cpu_percent(psutil.Process())
    finally:
        await engine.stop()
    return playbacks, Resources(_ratio(cpu, audio_s), usage.peak_rss / 2**20, ready_s, idle)


def _offline(clips: Sequence[Clip], settings: Settings) -> tuple[list[OfflineClip], OfflineSummary]:
    """Decode every clip whole with the same model, no prompt, padded to 30 s as Whisper was trained.

    The baseline is the standard whole-utterance decode (what a non-streaming server does), whatever
    `model.encoder_floor_s` the streaming run uses.
    """
    try:
        transcriber = WhisperTranscriber(dataclasses.replace(settings.model, encoder_floor_s=30.0))
    except ModelError as err:
        raise BenchError(str(err)) from None
    process = psutil.Process()
    cpu = _cpu_seconds(process)
    results: list[OfflineClip] = []
    for clip in clips:
        transcript = transcriber.decode(pcm16_to_float(clip.read_pcm()), "", settings.model.language)
        text = join_words(transcript.words)
        results.append(
            OfflineClip(
                clip.name,
                text,
                word_errors(normalize(clip.reference).split(), normalize(text).split()),
                transcript.asr_ms,
            )
        )
        _progress("offline ", len(results), len(clips), clip, text)
    cpu = _cpu_seconds(process) - cpu
    words = sum(len(normalize(clip.reference).split()) for clip in clips)
    errors = sum(result.word_errors for result in results)
    return results, OfflineSummary(
        clips=len(results),
        reference_words=words,
        word_errors=errors,
        wer=_ratio(errors, words),
        hallucinations=sum(
            1 for clip, r in zip(clips, results, strict=True) if not clip.reference.strip() and r.hypothesis.strip()
        ),
        decode_ms_mean=sum(result.decode_ms for result in results) / len(results),
        cpu_s_per_audio_s=_ratio(cpu, sum(clip.duration_s for clip in clips)),
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


# --- the command -------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's flags and its CORPUS argument."""
    parser.add_argument("corpus", type=Path, metavar="CORPUS", help="directory of 16 kHz mono .wav + .txt pairs")
    server = parser.add_mutually_exclusive_group()
    server.add_argument("--url", help="replay through a running server, e.g. ws://127.0.0.1:8787/ws/stream")
    server.add_argument("--wyoming", metavar="URI", help="replay through a Wyoming STT server, e.g. tcp://HOST:10300")
    parser.add_argument(
        "--pid", type=int, help="with --url or --wyoming: the server's process id, to measure its CPU and RSS"
    )
    parser.add_argument("--concurrency", type=_positive_int, default=1, metavar="K", help="speakers at once (1)")
    parser.add_argument("--fast", action="store_true", help="send audio as fast as possible instead of in real time")
    parser.add_argument(
        "--trailing-silence",
        type=_non_negative_float,
        default=0.5,
        metavar="S",
        help="seconds of digital silence after each clip, before the end signal (0.5)",
    )
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N clips (by name)")
    parser.add_argument("--match", metavar="GLOB", help="only clips whose name matches, e.g. 'cmd_*'")
    parser.add_argument("--offline", action="store_true", help="also decode each clip whole with the same model")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' prints it on stdout)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the bench; 0 when every clip went through, 1 when a clip got an error or the bench could not run."""
    try:
        if args.pid is not None and not (args.url or args.wyoming):
            raise BenchError("--pid only applies with --url or --wyoming (in-process, the bench measures itself)")
        clips = load_corpus(args.corpus, args.match, args.limit)
        playbacks, resources = asyncio.run(_stream(args, settings, clips))
        results = [
            clip_result(clip, playback, speech_span(clip.read_pcm(), settings.stream))
            for clip, playback in zip(clips, playbacks, strict=True)
        ]
        offline_clips, offline = _offline(clips, settings) if args.offline else ([], None)
    except BenchError as err:
        print(f"edge-asr bench: {err}", file=sys.stderr)
        return 1
    report = Report(
        corpus=str(args.corpus),
        transport=args.url or args.wyoming or "in-process",
        protocol="websocket" if args.url else "wyoming" if args.wyoming else "in-process",
        concurrency=args.concurrency,
        realtime=not args.fast,
        trailing_silence_s=args.trailing_silence,
        normalizer=normalizer_name(),
        streaming=summarize(results),
        resources=resources,
        offline=offline,
        clips=tuple(results),
        offline_clips=tuple(offline_clips),
    )
    table = format_table(report)
    if args.json == "-":
        print(table, file=sys.stderr)
        print(report_json(report))
        return 1 if report.streaming.clip_errors else 0
    print(table)
    if args.json:
        try:
            Path(args.json).write_text(report_json(report) + "\n", encoding="utf-8")
        except OSError as err:
            print(f"edge-asr bench: cannot write {args.json}: {err.strerror or err}", file=sys.stderr)
            return 1
    return 1 if report.streaming.clip_errors else 0
