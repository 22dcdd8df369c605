"""Ending a voice command ourselves: when the silence after it and the whole decode of what was said say it is over."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from .agreement import join_words, normalise
from .config import EndpointingSettings
from .transcript import EndCues, Word

# Home Assistant's voice-activity sensitivities and the silence each waits for (relaxed 1.25 s, default 0.7 s,
# aggressive 0.25 s): a client's choice scales our silences by the same ratio.
Sensitivity = Literal["relaxed", "default", "aggressive"]
SENSITIVITY_SCALE: dict[Sensitivity, float] = {"relaxed": 1.25 / 0.7, "default": 1.0, "aggressive": 0.25 / 0.7}
# No silence is shorter than this whatever the sensitivity: a stop consonant's closure is silent for up to ~0.1 s.
MIN_SILENCE_S = 0.12
# The decoder's end-of-sentence punctuation, in the scripts Whisper writes (the ideographic full stop, and the
# full-width question and exclamation marks).
_SENTENCE_ENDS = frozenset(".?!\u3002\uff1f\uff01")
# Whisper's mark of speech that trails off or goes on: an ellipsis ends no sentence.
_TRAILING_OFF = ("...", "\u2026")
# English words a command does not end on: articles, determiners, prepositions, conjunctions, question words,
# auxiliaries, and numbers that may go on ("twenty" … "five").
_UNFINISHED_EN = frozenset(
    (
        *("a", "an", "the", "this", "that", "these", "those", "my", "your", "our", "his", "her", "their", "its"),
        *("some", "any", "every", "each", "no", "another", "please", "not"),
        *("to", "of", "in", "at", "for", "from", "with", "by", "into", "onto", "about", "over", "under", "between"),
        *("through", "after", "before", "during", "without", "within", "until", "via", "per", "than"),
        *("and", "or", "but", "nor", "so", "because", "if", "then", "as", "while", "whether"),
        *("when", "where", "which", "who", "whom", "whose", "what", "how", "why"),
        *("is", "are", "was", "were", "be", "been", "being", "am", "do", "does", "did", "have", "has", "had"),
        *("can", "could", "will", "would", "shall", "should", "may", "might", "must"),
        *("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand"),
        *("million", "point", "minus"),
    )
)
# A command's verbs wait for their object ("set …", "turn on …") when nothing but a function word or a pronoun comes
# before them ("open" ends "is the door open"); "stop", "pause" and "cancel" are whole commands.
_VERBS_EN = frozenset(
    (
        *("set", "turn", "switch", "open", "close", "dim", "play", "start", "lock", "unlock", "add", "put", "show"),
        *("tell", "give", "make", "let", "increase", "decrease", "raise", "lower", "change", "call", "send"),
        *("remind", "brighten"),
    )
)
_BEFORE_A_VERB_EN = frozenset(("you", "me", "us", "i", "we", "to", "please", "and", "then", "can", "could", "would"))
# Particles end a command ("turn the fan on"), but not right after its verb ("turn on").
_PARTICLES_EN = frozenset(("on", "off", "up", "down"))
# A number in digits that may go on, as its words would: Whisper writes "twenty" as 20 and "two hundred" as 200 (a
# unit after it, "20%", ends it).
_ROUND_NUMBER = re.compile(r"[2-9]0|[1-9]0*00")


class Verdict(enum.Enum):
    """What the newest whole decode of the utterance says of the command."""

    NOTHING = "nothing"  # no word heard (yet)
    SURE = "sure"  # it can end here, and the decoder and the voice's fall say it ends here
    COMPLETE = "complete"  # it can end here
    UNFINISHED = "unfinished"  # it ends where no command ends, or the decoder was unsure
    UNDECODED = "undecoded"  # no trusted whole decode has heard all the speech yet


class EndReason(enum.Enum):
    """Why the endpointer ended a request."""

    COMMAND = "command"  # silence after a command
    NO_SPEECH = "no_speech"  # `no_speech_s` without a word
    TOO_LONG = "too_long"  # `max_command_s`


@dataclass(frozen=True)
class EndpointRules:
    """One request's endpointing, in seconds of its audio, the client's sensitivity applied."""

    sure_silence_s: float
    complete_silence_s: float
    unfinished_silence_s: float
    no_speech_s: float
    max_command_s: float
    min_word_probability: float
    min_end_probability: float
    sure_end_probability: float
    sure_pitch_fall_st: float

    @classmethod
    def of(cls, settings: EndpointingSettings, sensitivity: Sensitivity = "default") -> EndpointRules:
        """The rules of the settings, their silences scaled for a client's sensitivity."""
        scale = SENSITIVITY_SCALE[sensitivity]
        return cls(
            # A sure command never waits longer than a complete one.
            sure_silence_s=max(
                MIN_SILENCE_S, min(settings.sure_silence_ms, settings.complete_silence_ms) / 1000 * scale
            ),
            complete_silence_s=max(MIN_SILENCE_S, settings.complete_silence_ms / 1000 * scale),
            unfinished_silence_s=max(MIN_SILENCE_S, settings.unfinished_silence_ms / 1000 * scale),
            no_speech_s=settings.no_speech_s,
            max_command_s=settings.max_command_s,
            min_word_probability=settings.min_word_probability,
            min_end_probability=settings.min_end_probability,
            sure_end_probability=settings.sure_end_probability,
            sure_pitch_fall_st=settings.sure_pitch_fall_st,
        )

    @property
    def judges_end(self) -> bool:
        """Whether a whole decode needs the cues of its end: a sure command ends sooner, or a complete one the decoder
        does not expect to end waits longer."""
        return self.sure_silence_s < self.complete_silence_s or self.min_end_probability > 0

    def verdict(self, words: Sequence[Word], language: str, cues: EndCues | None = None) -> Verdict:
        """Whether a whole decode's words make a command that can end here, and whether the decoder is sure.

        It cannot when its last word is one no command ends on (English only: other languages have no word list and
        rely on the signals that are not words), when the decoder ended it without end-of-sentence punctuation, or
        when the decoder was unsure of that word or gives its text's end a probability below `min_end_probability`.
        It is sure when it can, the decoder's probability that its text ends there is at least
        `sure_end_probability`, and the voice fell at its end by at least `sure_pitch_fall_st` (neither is a word
        list: they hold in any language whose statements end falling).
        """
        spoken = [word for word in words if normalise(word.text)]
        if not spoken:
            return Verdict.NOTHING
        last = spoken[-1]
        text = join_words(words)
        if text[-1:] not in _SENTENCE_ENDS or text.endswith(_TRAILING_OFF):
            return Verdict.UNFINISHED
        probability = cues.end_probability if cues else None
        if last.probability < self.min_word_probability or (probability or 1.0) < self.min_end_probability:
            return Verdict.UNFINISHED
        if language == "en" and not _can_end_en([normalise(word.text) for word in spoken[-2:]], last.text):
            return Verdict.UNFINISHED
        if cues is not None and _sure(cues, self.sure_end_probability, self.sure_pitch_fall_st):
            return Verdict.SURE
        return Verdict.COMPLETE

    def end(self, *, audio_s: float, silence_s: float | None, verdict: Callable[[], Verdict]) -> EndReason | None:
        """Whether the request ends now, `audio_s` into it, after `silence_s` of silence since the last voice of an
        open utterance (None when none is open or the voice goes on). `verdict` says what the decode makes of the
        command; it is asked only once the silence or the clock could end the request, not on every chunk."""
        if audio_s >= self.max_command_s:
            return EndReason.TOO_LONG
        waited = silence_s is not None and silence_s >= self.sure_silence_s
        if not waited and audio_s < self.no_speech_s:
            return None
        found = verdict()
        if found is Verdict.NOTHING:
            return EndReason.NO_SPEECH if audio_s >= self.no_speech_s else None
        if silence_s is None:
            return None
        needed = {Verdict.SURE: self.sure_silence_s, Verdict.COMPLETE: self.complete_silence_s}.get(
            found, self.unfinished_silence_s
        )
        return EndReason.COMMAND if silence_s >= needed else None


def _can_end_en(last_two: list[str], written: str) -> bool:
    """Whether an English command may end on its last word (normalised, and as `written`), given the one before it
    when there is one."""
    last = last_two[-1]
    before = last_two[0] if len(last_two) == 2 else None
    if last in _UNFINISHED_EN or _ROUND_NUMBER.fullmatch(written.strip().rstrip(".?!,")):
        return False
    if last in _VERBS_EN:
        return before is not None and before not in _UNFINISHED_EN and before not in _BEFORE_A_VERB_EN
    return not (last in _PARTICLES_EN and before in _VERBS_EN)


def _sure(cues: EndCues, min_probability: float, min_fall_st: float) -> bool:
    """Whether the decoder and the voice both say the speech ends here."""
    probability, pitch = cues.end_probability, cues.final_pitch_st
    return probability is not None and probability >= min_probability and pitch is not None and -pitch >= min_fall_st
