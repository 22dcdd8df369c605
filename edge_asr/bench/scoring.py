"""Scoring a transcript against its reference: Whisper's English normaliser, then jiwer's word alignment."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

# Named in the report so it can be compared with reports scored by another normaliser.
NORMALIZER = "whisper"


@functools.cache
def _whisper_normalizer() -> Callable[[str], str]:
    # Built on first use: it loads a spelling table, and `edge-asr serve` imports the bench for its parser.
    normalizer: Callable[[str], str] = EnglishTextNormalizer()
    return normalizer


def normalize(text: str) -> str:
    """Text as scored: Whisper's English normaliser, words separated by single spaces. Tokens without a letter or
    digit are not words: the normaliser leaves the "." of an ellipsis ("your..." is "your ."), which would count
    as a word inserted."""
    return " ".join(token for token in _whisper_normalizer()(text).split() if any(c.isalnum() for c in token))


# The first words of a command ("turn on", "set the") carry its intent; losing one loses the command.
FIRST_WORDS = 2


@dataclass(frozen=True)
class WordScore:
    """One transcript's word errors against its reference, both normalised, and two classes of them.

    `inserted_after_speech`: hypothesis words inserted after the last reference word the alignment matched
    or substituted (every word, when the reference is empty). `lost_first_two`: reference words among the
    first two that the hypothesis deleted (0 to 2).
    """

    reference_words: int
    substitutions: int
    deletions: int
    insertions: int
    inserted_after_speech: int
    lost_first_two: int

    @property
    def errors(self) -> int:
        """Substitutions + deletions + insertions: the numerator of WER."""
        return self.substitutions + self.deletions + self.insertions


def score_words(reference: str, hypothesis: str) -> WordScore:
    """Normalise both texts and count the word errors of the hypothesis."""
    reference_text, hypothesis_text = normalize(reference), normalize(hypothesis)
    if not reference_text:
        # jiwer before 4.0 refuses an empty reference; against nothing, every word said is an insertion.
        said = len(hypothesis_text.split())
        return WordScore(0, 0, 0, said, inserted_after_speech=said, lost_first_two=0)
    aligned = jiwer.process_words(reference_text, hypothesis_text)
    chunks = aligned.alignments[0]
    return WordScore(
        len(reference_text.split()),
        aligned.substitutions,
        aligned.deletions,
        aligned.insertions,
        inserted_after_speech=_trailing_insertions(chunks),
        lost_first_two=_first_words_deleted(chunks),
    )


def _trailing_insertions(chunks: Sequence[jiwer.AlignmentChunk]) -> int:
    """Hypothesis words inserted after the last matched or substituted reference word."""
    trailing = 0
    for chunk in chunks:
        if chunk.type in ("equal", "substitute"):
            trailing = 0
        elif chunk.type == "insert":
            trailing += chunk.hyp_end_idx - chunk.hyp_start_idx
    return trailing


def _first_words_deleted(chunks: Sequence[jiwer.AlignmentChunk]) -> int:
    """Reference words among the first FIRST_WORDS that a `delete` chunk covers."""
    return sum(
        max(0, min(chunk.ref_end_idx, FIRST_WORDS) - chunk.ref_start_idx) for chunk in chunks if chunk.type == "delete"
    )


# Words as names are matched: letters and digits, with apostrophes inside ("O'Brien"); "Quillo-fan" is two.
_NAME_WORDS = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
# References are often typed with a typographic apostrophe, transcripts with a straight one.
_POSSESSIVES = ("'s", "\u2019s")


@dataclass(frozen=True)
class NameScore:
    """How many of the vocabulary's names in a reference the hypothesis has: `found` of `expected` occurrences,
    a name's found occurrences counted up to its expected ones."""

    found: int
    expected: int


def _name_words(text: str) -> list[str]:
    """The words of `text` without case and without a possessive 's."""
    words = (word.casefold() for word in _NAME_WORDS.findall(text))
    return [word[:-2] if word.endswith(_POSSESSIVES) else word for word in words]


def _occurrences(phrase: Sequence[str], words: Sequence[str]) -> int:
    """How often `phrase` appears in `words` as a run of whole words, occurrences not overlapping."""
    count = index = 0
    while phrase and index + len(phrase) <= len(words):
        if words[index : index + len(phrase)] == phrase:
            count += 1
            index += len(phrase)
        else:
            index += 1
    return count


def score_names(reference: str, hypothesis: str, names: Sequence[str]) -> NameScore:
    """Count each name's occurrences in the reference and how many of them the hypothesis has (case-insensitive
    whole words after dropping a possessive 's; a name of several words matches as a phrase)."""
    reference_words, hypothesis_words = _name_words(reference), _name_words(hypothesis)
    found = expected = 0
    for name in names:
        phrase = _name_words(name)
        said = _occurrences(phrase, reference_words)
        expected += said
        found += min(said, _occurrences(phrase, hypothesis_words))
    return NameScore(found, expected)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(part: float, whole: float) -> float | None:
    """part / whole; None when there is no whole (no reference words, no audio)."""
    return part / whole if whole else None
