"""Scoring a transcript against its reference: Whisper's English normaliser, then jiwer's word alignment."""

from __future__ import annotations

import functools
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
    """Text as scored: Whisper's English normaliser, words separated by single spaces."""
    return " ".join(_whisper_normalizer()(text).split())


@dataclass(frozen=True)
class WordScore:
    """One transcript's word errors against its reference, both normalised."""

    reference_words: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        """Substitutions + deletions + insertions: the numerator of WER."""
        return self.substitutions + self.deletions + self.insertions


def score_words(reference: str, hypothesis: str) -> WordScore:
    """Normalise both texts and count the word errors of the hypothesis."""
    reference_text, hypothesis_text = normalize(reference), normalize(hypothesis)
    if not reference_text:
        # jiwer before 4.0 refuses an empty reference; against nothing, every word said is an insertion.
        return WordScore(0, 0, 0, len(hypothesis_text.split()))
    aligned = jiwer.process_words(reference_text, hypothesis_text)
    return WordScore(len(reference_text.split()), aligned.substitutions, aligned.deletions, aligned.insertions)


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
