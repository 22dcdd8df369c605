"""What a decode gives (timestamped words in a transcript) and what the engine asks to give it (a transcriber)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .audio import FloatAudio
    from .vocabulary import NamesInPrompt


@dataclass(frozen=True)
class Word:
    """A word with its times in seconds of the session's audio; `text` keeps Whisper's leading space, and
    `probability` is the decoder's confidence in it (1.0 where none was given)."""

    start: float
    end: float
    text: str
    probability: float = 1.0


@dataclass(frozen=True)
class EndCues:
    """What tells that speech ends where a whole decode's text ends, beyond its words: the decoder's probability that
    the text ends there (None when it does not end a sentence) and the pitch of the last voiced frames in semitones
    against the utterance's median (None when too little is voiced)."""

    end_probability: float | None
    final_pitch_st: float | None


@dataclass(frozen=True)
class Transcript:
    """One decode: words with times relative to the start of the decoded audio.

    `encoder_s` is the encoder input the decode used, in seconds (Whisper's own is 30). `hallucinated` is
    Whisper's own verdict on the text: a segment so repetitive that it compresses more than 2.4 times.
    `language` is the language the words were decoded as: the one asked for, or the one detected ("" when the
    transcriber does not say). `end_cues` tell whether the speech ends where the text does (None unless asked for).
    """

    words: tuple[Word, ...]
    asr_ms: float
    encoder_s: float = 0.0
    hallucinated: bool = False
    language: str = ""
    end_cues: EndCues | None = None


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
        self,
        audio: FloatAudio,
        prompt: str,
        language: str,
        whole: bool = False,
        names: NamesInPrompt | None = None,
        judge_end: bool = False,
    ) -> Transcript:
        """Transcribe a window of 16 kHz float audio in `language` (AUTO_LANGUAGE: the one the model hears in it),
        with text that came before it as prompt; `whole` says the
        window is a whole utterance whose transcript may become its final; `names` that its prompt names the
        household's names; `judge_end` asks for the cues that the speech ends where the text does."""
        ...
