"""The decode policy on a speech backend: how much the encoder sees, the household's names let in where the decode
was unsure, a second opinion at Whisper's 30 s for a final that heard nothing, and when memory goes back."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from .agreement import normalise
from .audio import SAMPLE_RATE, FloatAudio
from .config import ModelSettings
from .memory import EncoderBudget, FreeMemoryTrimmer
from .model import FRAMES_PER_SECOND, WHISPER_FRAMES, WhisperBackend
from .prosody import final_pitch_st
from .transcript import EndCues, Transcript
from .vocabulary import NamesInPrompt, is_unsure, splice_names

# A window longer than the floor is encoded to the next whole second. oneDNN compiles and keeps the encoder's
# convolutions for every input width it meets (up to 1024 widths): in-process, 80 decodes of 15-30 s windows,
# each its own width, left 32 MB more at rest; 1 MB with whole seconds, which leave at most 16 widths. The frames
# added are the padding Whisper sees in every 30 s window.
_ENCODER_FRAME_STEP = 100


class SpeechBackend(Protocol):
    """What the decode policy needs of a speech model: one transcription at a given encoder input, and no policy."""

    languages: tuple[str, ...]
    # Words the model's tokenizer has whole (lower case): likely said when heard, not misheard names.
    common_words: frozenset[str]

    def warm_up(self, encoder_frames: int) -> float:
        """Transcribe a little dummy audio at this encoder input; return its ms."""
        ...

    def release_memory(self) -> None:
        """Give the memory the decodes freed back to the system, at once; blocking."""
        ...

    def transcribe(
        self, audio: FloatAudio, prompt: str, language: str, encoder_frames: int, judge_end: bool = False
    ) -> Transcript:
        """Transcribe 16 kHz float audio after a prompt, encoding `encoder_frames` mel frames of it (with
        `judge_end`, also the decoder's probability that the text ends there); blocking."""
        ...


class Decoder:
    """A `Transcriber` on a speech backend: decides each decode's encoder input, the names step, the second opinion
    and when to give memory back; the backend only transcribes."""

    def __init__(self, backend: SpeechBackend, encoder_floor_s: float) -> None:
        self._backend = backend
        self.languages = backend.languages
        self.common_words = backend.common_words
        self._floor_frames = int(encoder_floor_s * FRAMES_PER_SECOND)
        self._trimmer = FreeMemoryTrimmer(backend.release_memory)
        self._budget = EncoderBudget(WHISPER_FRAMES)

    def release_memory(self) -> None:
        """Give the memory the decodes freed back to the system; blocking, called on a decode thread."""
        self._trimmer.trim_now()

    def warm_up(self) -> float:
        """Decode a little dummy audio at the encoder floor, the partials' input, so the first real request pays no
        first-call cost."""
        return self._backend.warm_up(self._floor_frames)

    def decode(
        self,
        audio: FloatAudio,
        prompt: str,
        language: str,
        whole: bool = False,
        names: NamesInPrompt | None = None,
        judge_end: bool = False,
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

        `judge_end` (a whole decode the endpointer reads) asks the first decode for the decoder's probability that
        the text ends there, and adds the pitch at the end of the voice.
        """
        if not whole:
            # Off a final's path, and outside the partial's own time (which paces the partials).
            self._trimmer.trim()
        if names is None:
            transcript = self._decode(audio, prompt, language, self._floor_frames, judge_end)
        else:
            transcript = self._decode(audio, names.plain, language, self._floor_frames, judge_end)
            if is_unsure(transcript.words):
                # In the language the first decode heard, so that the names do not change it.
                named = self._decode(audio, prompt, transcript.language or language, self._floor_frames)
                words = (
                    transcript.words
                    if named.hallucinated
                    else splice_names(transcript.words, named.words, names.speller)
                )
                transcript = dataclasses.replace(transcript, words=words, asr_ms=transcript.asr_ms + named.asr_ms)
            prompt = names.plain
        if judge_end:
            probability = transcript.end_cues.end_probability if transcript.end_cues else None
            transcript = dataclasses.replace(transcript, end_cues=EndCues(probability, final_pitch_st(audio)))
        if not whole or self._floor_frames >= WHISPER_FRAMES or any(normalise(w.text) for w in transcript.words):
            return transcript
        second = self._decode(audio, prompt, language, WHISPER_FRAMES)
        return dataclasses.replace(second, asr_ms=transcript.asr_ms + second.asr_ms)

    def _decode(
        self, audio: FloatAudio, prompt: str, language: str, floor_frames: int, judge_end: bool = False
    ) -> Transcript:
        content_frames = int(len(audio) / SAMPLE_RATE * FRAMES_PER_SECOND) + 1
        whole_seconds = -(-content_frames // _ENCODER_FRAME_STEP) * _ENCODER_FRAME_STEP
        frames = min(WHISPER_FRAMES, max(floor_frames, whole_seconds))
        # The decodes in flight encode at most Whisper's own 30 s between them (EncoderBudget says why).
        with self._budget.admit(frames) as alone:
            if alone and frames > self._floor_frames:
                # The longest decodes start on the memory the decodes before them freed, not beside it.
                self._trimmer.trim_now()
            return self._backend.transcribe(audio, prompt, language, frames, judge_end)


class WhisperTranscriber(Decoder):
    """The decode policy on faster-whisper, as `settings` configure both."""

    def __init__(self, settings: ModelSettings) -> None:
        super().__init__(WhisperBackend(settings), settings.encoder_floor_s)
