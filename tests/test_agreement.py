"""Unit tests for LocalAgreement-2 and the overlap stripping in edge_asr.agreement."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from edge_asr.agreement import (
    LocalAgreement,
    common_prefix,
    join_words,
    normalise,
    strip_committed,
)
from edge_asr.transcript import Word

pytestmark = pytest.mark.fast


def words(*spec: tuple[str, float, float]) -> list[Word]:
    """Words from (text, start, end); the text is given a leading space as Whisper spaces it."""
    return [Word(start, end, f" {text}") for text, start, end in spec]


def texts(items: Sequence[Word]) -> list[str]:
    """The normalised texts of words, for compact comparisons."""
    return [normalise(word.text) for word in items]


# "turn on the kitchen lights" with made-up but plausible times.
TURN = ("turn", 0.10, 0.30)
ON = ("on", 0.35, 0.50)
THE = ("the", 0.55, 0.65)
KITCHEN = ("kitchen", 0.70, 1.10)
LIGHTS = ("lights", 1.15, 1.60)


# --- normalise, join_words, common_prefix -------------------------------------------------------


def test_normalise_ignores_case_punctuation_and_spacing() -> None:
    assert normalise(" Lights.") == "lights"
    assert normalise(" LIGHTS,") == "lights"
    assert normalise("lights?!") == "lights"
    assert normalise(" don't") == "don't"
    assert normalise(" ...") == ""


def test_join_words_keeps_whisper_spacing_and_strips_the_ends() -> None:
    assert join_words(words(TURN, ON)) == "turn on"
    assert join_words([Word(0.0, 0.2, " Hello"), Word(0.2, 0.3, ","), Word(0.3, 0.6, " world.")]) == "Hello, world."
    assert join_words([]) == ""


def test_common_prefix_stops_at_first_disagreement() -> None:
    previous = words(TURN, ON, THE, ("kitten", 0.7, 1.1))
    current = words(TURN, ON, THE, KITCHEN, LIGHTS)
    assert texts(common_prefix(previous, current)) == ["turn", "on", "the"]


def test_common_prefix_is_case_and_punctuation_insensitive_and_keeps_the_newer_words() -> None:
    previous = [Word(0.1, 0.3, " Turn"), Word(0.35, 0.5, " ON,")]
    current = [Word(0.12, 0.31, " turn"), Word(0.36, 0.52, " on.")]
    agreed = common_prefix(previous, current)
    assert agreed == current


def test_common_prefix_with_an_empty_side_is_empty() -> None:
    assert common_prefix([], words(TURN)) == []
    assert common_prefix(words(TURN), []) == []


# --- LocalAgreement.update ---------------------------------------------------------------------


def test_first_hypothesis_commits_nothing() -> None:
    agreement = LocalAgreement()
    assert agreement.update(words(TURN, ON, THE)) == []
    assert agreement.committed == ()
    assert texts(agreement.tentative) == ["turn", "on", "the"]


def test_second_hypothesis_commits_only_the_agreed_prefix() -> None:
    agreement = LocalAgreement()
    agreement.update(words(TURN, ON, THE, ("kit", 0.7, 0.9)))
    newly = agreement.update(words(TURN, ON, THE, KITCHEN))
    assert texts(newly) == ["turn", "on", "the"]
    assert texts(agreement.committed) == ["turn", "on", "the"]
    assert texts(agreement.tentative) == ["kitchen"]


def test_disagreeing_hypotheses_commit_nothing() -> None:
    agreement = LocalAgreement()
    agreement.update(words(("learn", 0.1, 0.3), ON))
    assert agreement.update(words(TURN, ON)) == []
    assert agreement.committed == ()
    assert texts(agreement.tentative) == ["turn", "on"]


def test_agreement_is_case_and_punctuation_insensitive() -> None:
    agreement = LocalAgreement()
    agreement.update([Word(0.1, 0.3, " Turn"), Word(0.35, 0.5, " on,")])
    newly = agreement.update([Word(0.1, 0.3, " turn"), Word(0.35, 0.5, " On.")])
    assert texts(newly) == ["turn", "on"]


def test_committed_text_never_changes_when_a_later_hypothesis_rewrites_it() -> None:
    agreement = LocalAgreement()
    agreement.update(words(TURN, ON, THE))
    agreement.update(words(TURN, ON, THE, KITCHEN))
    committed = agreement.committed
    # A later pass hears the committed audio differently; committed words stay as they are.
    agreement.update(words(("learn", 0.10, 0.30), ("an", 0.35, 0.50), ("a", 0.55, 0.65), KITCHEN, LIGHTS))
    agreement.update(words(("learn", 0.10, 0.30), ("an", 0.35, 0.50), ("a", 0.55, 0.65), KITCHEN, LIGHTS))
    assert agreement.committed[: len(committed)] == committed
    assert texts(agreement.committed) == ["turn", "on", "the", "kitchen", "lights"]


def test_growing_hypotheses_commit_each_word_once() -> None:
    agreement = LocalAgreement()
    spec = [TURN, ON, THE, KITCHEN, LIGHTS]
    newly_all: list[Word] = []
    for count in range(1, len(spec) + 1):
        newly_all += agreement.update(words(*spec[:count]))
    newly_all += agreement.update(words(*spec))
    assert texts(newly_all) == ["turn", "on", "the", "kitchen", "lights"]
    assert texts(agreement.committed) == texts(newly_all)
    assert agreement.tentative == ()


@pytest.mark.parametrize("seed", range(25))
def test_jittered_overlapping_hypotheses_keep_committed_text_append_only(seed: int) -> None:
    """Windows re-read the last 150 ms; timestamps jitter; the transcript still comes out once, in order."""
    rng = random.Random(seed)
    truth: list[tuple[str, float, float]] = []
    t = 0.2
    for index in range(30):
        length = rng.uniform(0.15, 0.5)
        truth.append((f"w{index}", t, t + length))
        t += length + rng.uniform(0.03, 0.2)
    agreement = LocalAgreement()
    audio_end = 0.5
    while audio_end < t + 0.6:
        commit_end = agreement.committed[-1].end if agreement.committed else 0.0
        window_start = max(0.0, commit_end - 0.15)
        hypothesis: list[Word] = []
        for text, start, end in truth:
            if end <= window_start or start >= audio_end:
                continue
            # A word cut off by the window's end is misheard, differently in each pass.
            heard = text if end <= audio_end else f"{text}x{round(audio_end * 100)}"
            shown = rng.choice([heard, heard.upper(), heard + ",", heard + "."])
            jitter_start, jitter_end = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
            hypothesis.append(
                Word(max(window_start, start + jitter_start), min(audio_end, end + jitter_end), " " + shown)
            )
        before = agreement.committed
        agreement.update(hypothesis)
        assert agreement.committed[: len(before)] == before
        audio_end += rng.choice([0.25, 0.26, 0.5])
    agreement.commit_tentative()
    assert texts(agreement.committed) == [text for text, _, _ in truth]


# --- strip_committed -----------------------------------------------------------------------------


def test_strip_committed_without_committed_words_drops_only_empty_words() -> None:
    hypothesis = [Word(0.1, 0.3, " turn"), Word(0.3, 0.35, " ..."), Word(0.35, 0.5, " on")]
    assert texts(strip_committed([], hypothesis)) == ["turn", "on"]


def test_strip_committed_drops_words_of_already_committed_audio() -> None:
    committed = words(TURN, ON)  # commit point 0.50
    # The window re-reads the 150 ms before the commit point: "on" comes back with its old times.
    hypothesis = words(("turn", 0.1, 0.3), ("on", 0.36, 0.5), THE, KITCHEN)
    assert texts(strip_committed(committed, hypothesis)) == ["the", "kitchen"]


def test_strip_committed_keeps_a_new_word_within_the_time_tolerance() -> None:
    committed = words(TURN, ON)  # commit point 0.50
    # Timestamps jitter: a new word may start a little before the commit point.
    assert texts(strip_committed(committed, words(("the", 0.45, 0.65)))) == ["the"]


def test_strip_committed_drops_a_repeated_ngram_whose_times_shifted() -> None:
    committed = words(TURN, ON, THE)  # commit point 0.65
    # The decoder re-read the overlap and placed the repeated words late.
    hypothesis = words(("On", 0.58, 0.62), ("the", 0.62, 0.68), KITCHEN)
    assert texts(strip_committed(committed, hypothesis)) == ["kitchen"]


def test_strip_committed_drops_the_longest_repeated_ngram() -> None:
    committed = words(("a", 0.0, 0.2), ("b", 0.3, 0.5), ("a", 0.6, 0.8))
    hypothesis = words(("b", 0.72, 0.8), ("a", 0.8, 0.85), ("c", 0.9, 1.1))
    assert texts(strip_committed(committed, hypothesis)) == ["c"]


def test_strip_committed_repeat_is_case_and_punctuation_insensitive() -> None:
    committed = words(KITCHEN, LIGHTS)  # commit point 1.60
    hypothesis = [Word(1.55, 1.62, " Lights."), Word(1.7, 1.9, " please")]
    assert texts(strip_committed(committed, hypothesis)) == ["please"]


def test_strip_committed_keeps_a_repeat_heard_much_later() -> None:
    committed = words(TURN, ON)  # commit point 0.50
    # "on" said again two seconds later is new speech, not the overlap.
    hypothesis = words(("on", 2.5, 2.7), ("again", 2.75, 3.0))
    assert texts(strip_committed(committed, hypothesis)) == ["on", "again"]


def test_strip_committed_drops_a_misheard_re_read_of_the_last_committed_word() -> None:
    committed = words(THE, KITCHEN)  # commit point 1.10
    # The overlap re-read "kitchen" as "kitten", ending a little after the commit point.
    hypothesis = words(("kitten", 0.75, 1.16), LIGHTS)
    assert texts(strip_committed(committed, hypothesis)) == ["lights"]


def test_strip_committed_keeps_a_word_said_again_right_after_the_commit_point() -> None:
    committed = words(("press", 0.0, 0.3), ("one", 0.35, 0.6))  # commit point 0.60
    hypothesis = words(("one", 0.36, 0.6), ("one", 0.7, 0.95), ("two", 1.0, 1.2))
    assert texts(strip_committed(committed, hypothesis)) == ["one", "two"]
    assert strip_committed(committed, hypothesis)[0].start == 0.7


def test_strip_committed_keeps_fresh_words_that_do_not_repeat() -> None:
    committed = words(TURN, ON)
    hypothesis = words(THE, KITCHEN, LIGHTS)
    assert strip_committed(committed, hypothesis) == hypothesis


def test_update_ignores_the_overlap_re_read_of_committed_words() -> None:
    agreement = LocalAgreement()
    agreement.update(words(TURN, ON, THE))
    agreement.update(words(TURN, ON, THE))
    assert texts(agreement.committed) == ["turn", "on", "the"]
    # The next windows start 150 ms before the commit point and re-read "the".
    overlap = [("the", 0.56, 0.66), KITCHEN, ("li", 1.15, 1.3)]
    assert agreement.update(words(*overlap)) == []
    newly = agreement.update(words(("the", 0.55, 0.64), KITCHEN, LIGHTS))
    assert texts(newly) == ["kitchen"]
    assert texts(agreement.committed) == ["turn", "on", "the", "kitchen"]
    assert texts(agreement.tentative) == ["lights"]


# --- commit_tentative / commit_before -------------------------------------------------------------


def test_commit_tentative_commits_the_whole_tail_once() -> None:
    agreement = LocalAgreement()
    agreement.update(words(TURN, ON))
    agreement.update(words(TURN, ON, THE, KITCHEN))
    newly = agreement.commit_tentative()
    assert texts(newly) == ["the", "kitchen"]
    assert texts(agreement.committed) == ["turn", "on", "the", "kitchen"]
    assert agreement.tentative == ()
    assert agreement.commit_tentative() == []
    assert texts(agreement.committed) == ["turn", "on", "the", "kitchen"]


def test_commit_tentative_on_a_fresh_agreement_is_empty() -> None:
    agreement = LocalAgreement()
    assert agreement.commit_tentative() == []
    assert agreement.committed == ()


def test_commit_before_commits_leading_words_ending_by_the_time() -> None:
    agreement = LocalAgreement()
    agreement.update(words(TURN, ON, THE, KITCHEN, LIGHTS))
    newly = agreement.commit_before(0.65)
    assert texts(newly) == ["turn", "on", "the"]  # "the" ends exactly at 0.65
    assert texts(agreement.committed) == ["turn", "on", "the"]
    assert texts(agreement.tentative) == ["kitchen", "lights"]


def test_commit_before_an_early_time_commits_nothing() -> None:
    agreement = LocalAgreement()
    agreement.update(words(TURN, ON))
    assert agreement.commit_before(0.2) == []
    assert agreement.committed == ()
    assert texts(agreement.tentative) == ["turn", "on"]


def test_commit_before_a_late_time_commits_everything_and_appends() -> None:
    agreement = LocalAgreement()
    agreement.update(words(TURN, ON))
    agreement.update(words(TURN, ON, THE))
    assert texts(agreement.commit_before(10.0)) == ["the"]
    assert texts(agreement.committed) == ["turn", "on", "the"]
    assert agreement.tentative == ()
