"""LocalAgreement-2 over timestamped words: commit what two consecutive hypotheses agree on."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .transcript import Word

_NON_WORD = re.compile(r"[^\w']+")
# Word timestamps of the same word move by up to a few hundred ms between passes.
_ALIGN_TOLERANCE_S = 0.5


def normalise(text: str) -> str:
    """Lower case without punctuation, for comparing words across hypotheses."""
    return _NON_WORD.sub("", text.lower())


def join_words(words: Sequence[Word]) -> str:
    """The text of words as Whisper spaced them."""
    return "".join(word.text for word in words).strip()


def common_prefix(previous: Sequence[Word], current: Sequence[Word]) -> list[Word]:
    """The leading words of `current` that `previous` also has, compared without case and punctuation."""
    agreed: list[Word] = []
    for before, now in zip(previous, current, strict=False):
        if normalise(before.text) != normalise(now.text):
            break
        agreed.append(now)
    return agreed


def strip_committed(committed: Sequence[Word], hypothesis: Sequence[Word]) -> list[Word]:
    """The part of a hypothesis after the committed words it re-reads (the window overlaps them on purpose).

    The last committed word is looked for near its committed time; when the hypothesis heard it
    differently, the words whose middle lies after the commit point are kept.
    """
    words = [word for word in hypothesis if normalise(word.text)]
    if not committed:
        return words
    last = committed[-1]
    matches = [
        index
        for index, word in enumerate(words)
        if normalise(word.text) == normalise(last.text) and abs(word.end - last.end) <= _ALIGN_TOLERANCE_S
    ]
    if matches:
        best = min(matches, key=lambda index: abs(words[index].end - last.end))
        return words[best + 1 :]
    return [word for word in words if (word.start + word.end) / 2 > last.end]


class LocalAgreement:
    """Committed words plus the tentative tail of the newest hypothesis."""

    def __init__(self) -> None:
        self._committed: list[Word] = []
        self._tentative: list[Word] = []

    @property
    def committed(self) -> tuple[Word, ...]:
        """Words that never change again."""
        return tuple(self._committed)

    @property
    def tentative(self) -> tuple[Word, ...]:
        """The newest hypothesis after the committed words, not agreed yet."""
        return tuple(self._tentative)

    def update(self, hypothesis: Sequence[Word], horizon_s: float = math.inf) -> list[Word]:
        """Take a new hypothesis; return the words it newly commits.

        Only words ending by `horizon_s` may commit: a word at the very end of the audio may be
        cut off ("part" of "participant"), and two passes can agree on the fragment.
        """
        fresh = strip_committed(self._committed, hypothesis)
        agreed = common_prefix(self._tentative, fresh)
        while agreed and agreed[-1].end > horizon_s:
            agreed.pop()
        self._committed.extend(agreed)
        self._tentative = fresh[len(agreed) :]
        return agreed

    def commit_tentative(self, until_s: float = math.inf) -> list[Word]:
        """End of the utterance: the tentative words that start by `until_s` are committed, the rest dropped."""
        newly = [word for word in self._tentative if word.start <= until_s]
        self._committed.extend(newly)
        self._tentative = []
        return newly

    def commit_before(self, time_s: float) -> list[Word]:
        """Force-commit the leading tentative words that end before `time_s`, to bound the window."""
        count = 0
        while count < len(self._tentative) and self._tentative[count].end <= time_s:
            count += 1
        newly = self._tentative[:count]
        self._committed.extend(newly)
        self._tentative = self._tentative[count:]
        return newly
