"""The household's own names: merged from every source in priority order, told to the decoder within a
budget, spelled right where the model heard a word close to one, and let into a final only where the decode
without them was unsure of what it heard. Pure: no I/O but the file of names.

Names are personal: nothing here logs them; counts and a digest identify a vocabulary.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from .transcript import Word

_LOGGER = logging.getLogger(__name__)

# A name longer than this is not a name; a vocabulary longer than this is not a household's.
MAX_NAME_CHARS = 100
MAX_NAMES = 1000
# How close a heard word must be to a name's word to be spelled as it (normalised edit similarity). A word
# the model knows as a common English word ("tomorrow", "allow") must be closer: it was likely said.
_UNCOMMON_SIMILARITY = 0.6
_COMMON_SIMILARITY = 0.8
_MIN_WORD_CHARS = 3
_LETTERS = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_DIGEST_CHARS = 12
# A name from the decode prompted with the names may replace words of the decode without them only where that
# decode gave one of them less than this probability, and only as far as those words look like the name: the
# less sure it was, the less alike they need be (doubt plus likeness at least _NAME_EVIDENCE; at the bound, 60 %
# of the letters; below 0.1, none). Measured with tiny.en: where a name was said, the decode without names wrote
# other words at 0.05-0.66 ("the rain-filled" for "Wrenfold"); where the names prompt wrote a name nobody said
# ("Dial" as a name, four times in one prompt; "milk" as "Maelis"), the decode without names had been sure of
# its word, or it looked nothing like the name.
UNSURE_PROBABILITY = 0.7
_NAME_EVIDENCE = 0.9
_NOT_LETTERS = re.compile(r"[\W\d_]+")


@dataclass(frozen=True)
class Vocabulary:
    """Names, the most important first, without duplicates (compared without case)."""

    names: tuple[str, ...] = ()

    @classmethod
    def merge(cls, *sources: Iterable[str]) -> Vocabulary:
        """The names of every source in order, each once; blank and overlong names left out."""
        seen: set[str] = set()
        names: list[str] = []
        for source in sources:
            for raw in source:
                name = " ".join(raw.split())
                key = name.casefold()
                if not name or len(name) > MAX_NAME_CHARS or key in seen:
                    continue
                seen.add(key)
                names.append(name)
                if len(names) == MAX_NAMES:
                    return cls(tuple(names))
        return cls(tuple(names))

    @property
    def digest(self) -> str:
        """A short hash that identifies the vocabulary without telling its names ("" when empty)."""
        if not self.names:
            return ""
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()[:_DIGEST_CHARS]


def names_prompt(names: Iterable[str], budget_chars: int) -> tuple[str, int]:
    """A sentence naming as many names as fit in `budget_chars`, whole names in order, and how many were left out.

    Measured on name-heavy commands with tiny.en: names joined by "and" in a sentence bias the decoder as much
    as a comma-separated list, without making it write its output as a list.
    """
    kept: list[str] = []
    left_out = 0
    for name in names:
        sentence = _sentence([*kept, name])
        if len(sentence) <= budget_chars:
            kept.append(name)
        else:
            left_out += 1
    return (_sentence(kept) if kept else "", left_out)


def _sentence(names: list[str]) -> str:
    return f"We have {' and '.join(names)}."


class NameSpeller:
    """Spells a heard word as the name word it is close to: "Calaway" as "Calloway", "Glassnik" as "Glasnoc".

    `common_words` are words the model's tokenizer has whole (lower case): such a heard word is taken as a
    name only when it is very close, so that "tomorrow" stays "tomorrow" beside a name "Tarrow".
    """

    def __init__(self, names: Iterable[str], common_words: frozenset[str]) -> None:
        self._common = common_words
        targets: dict[str, str] = {}
        for name in names:
            for word in _LETTERS.findall(name):
                if len(word) >= _MIN_WORD_CHARS and word.lower() not in common_words:
                    targets.setdefault(word.lower(), word)
        self._targets = targets
        self._keys = list(targets)

    def __bool__(self) -> bool:
        return bool(self._targets)

    def names_any(self, texts: Iterable[str]) -> bool:
        """Whether, spelled, any of these word texts is a name's word."""
        return any(
            _stem(word).lower() in self._targets for text in texts for word in _LETTERS.findall(self.spell(text))
        )

    def spell(self, text: str) -> str:
        """`text` with every word close to a name word spelled as that name word; spacing and punctuation kept."""
        if not self._targets:
            return text
        return _LETTERS.sub(self._respell, text)

    def _respell(self, match: re.Match[str]) -> str:
        word = match.group(0)
        stem = _stem(word)
        possessive = word[len(stem) :]
        lowered = stem.lower()
        if len(lowered) < _MIN_WORD_CHARS or lowered in self._targets:
            return self._targets.get(lowered, stem) + possessive
        # A hair under the bound: edit similarities are fractions (0.6 is 3/5) and must not round below it.
        needed = (_COMMON_SIMILARITY if lowered in self._common else _UNCOMMON_SIMILARITY) - 1e-9
        found = process.extractOne(lowered, self._keys, scorer=Levenshtein.normalized_similarity, score_cutoff=needed)
        return (self._targets[found[0]] if found else stem) + possessive


@dataclass(frozen=True)
class NamesInPrompt:
    """A decode whose prompt begins with the household's names: `plain` is its prompt without them, and
    `speller` knows the names' words."""

    plain: str
    speller: NameSpeller


def is_unsure(words: Iterable[Word]) -> bool:
    """Whether a decode without the names wrote any word a name could replace (see `splice_names`)."""
    return any(word.probability < UNSURE_PROBABILITY and _letters(word.text) for word in words)


def splice_names(plain: Sequence[Word], named: Sequence[Word], speller: NameSpeller) -> tuple[Word, ...]:
    """The words of the decode without names (`plain`), with each name the decode prompted with them (`named`)
    heard put in place of the plain words it covers, where the plain decode was unsure of them and they look
    enough like the name (see UNSURE_PROBABILITY).

    The prompted decode is not taken whole: a prompt full of names changes words nobody said a name in. A name
    covers the plain words whose middle falls in its time (or the one it overlaps most) and replaces those with
    letters; a name where the plain decode heard nothing, or already heard a name, changes nothing.
    """
    words = list(plain)
    for name in named:
        if not speller.names_any([name.text]):
            continue
        covered = [w for w in words if name.start <= (w.start + w.end) / 2 <= name.end]
        if not covered:
            overlaps = [(min(w.end, name.end) - max(w.start, name.start), index) for index, w in enumerate(words)]
            best = max(overlaps, default=(0.0, -1))
            covered = [words[best[1]]] if best[0] > 0 else []
        # Numbers and punctuation are no name's sound: they neither count as doubt nor give way to the name.
        spoken = [w for w in covered if _letters(w.text)]
        if not spoken or speller.names_any(w.text for w in spoken):
            continue
        if not is_unsure(spoken):
            continue
        doubt = 1.0 - min(w.probability for w in spoken)
        likeness = Levenshtein.normalized_similarity(
            _letters("".join(w.text for w in spoken)), _letters(speller.spell(name.text))
        )
        if doubt + likeness < _NAME_EVIDENCE:
            continue
        words[words.index(spoken[0])] = name
        for word in spoken[1:]:
            words.remove(word)
    return tuple(words)


class NamesFile:
    """`model.vocabulary_file`: one name per line, read again when the file changes (no restart)."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._names: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The file's names as of now; a file that cannot be read keeps the last names it had (and says so)."""
        try:
            status = os.stat(self._path)
        except OSError as err:
            if self._stamp is not None:
                _LOGGER.warning("model.vocabulary_file: cannot read %s (%s); keeping its last names", self._path, err)
                self._stamp = None
            return self._names
        stamp = (status.st_mtime_ns, status.st_size)
        if stamp != self._stamp:
            try:
                lines = self._path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                _LOGGER.warning("model.vocabulary_file: cannot read %s (%s); keeping its last names", self._path, err)
                return self._names
            self._names = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
            self._stamp = stamp
            _LOGGER.info("model.vocabulary_file: %d names", len(self._names))
        return self._names


def _letters(text: str) -> str:
    return _NOT_LETTERS.sub("", text).casefold()


def _stem(word: str) -> str:
    """A word without its possessive ("Elowen's" is "Elowen")."""
    return word[:-2] if word.lower().endswith("'s") else word
