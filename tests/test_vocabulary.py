"""The household's names: merged in priority order, put in the prompt within a budget, heard words spelled
as names, let into a final only where the decode without them was unsure, the file read again when it
changes; and the engine passing them to decodes and to listeners."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from edge_asr.agreement import join_words
from edge_asr.api import SessionRequest
from edge_asr.config import build_settings
from edge_asr.engine import Engine
from edge_asr.events import Final, SessionInfo
from edge_asr.transcript import Transcript, Word
from edge_asr.vocabulary import NamesFile, NamesInPrompt, NameSpeller, Vocabulary, is_unsure, names_prompt, splice_names

from .fakes import ScriptedTranscriber
from .speech import read_pcm, silence

pytestmark = pytest.mark.fast

COMMON = frozenset({"tomorrow", "the", "lamp", "fan", "allow", "glass"})


def test_sources_merge_in_priority_order_without_duplicates_or_blanks() -> None:
    merged = Vocabulary.merge(["Elowen", " Quillo  fan "], ["elowen", "Tarrow"], ["", "x" * 101, "Brannoc"])

    assert merged.names == ("Elowen", "Quillo fan", "Tarrow", "Brannoc")


def test_the_digest_tells_vocabularies_apart_without_their_names() -> None:
    one, same, other = Vocabulary(("Elowen",)), Vocabulary(("Elowen",)), Vocabulary(("Brannoc",))

    assert one.digest == same.digest
    assert one.digest != other.digest
    assert "Elowen" not in one.digest
    assert Vocabulary().digest == ""


def test_the_prompt_names_whole_names_within_its_budget_and_counts_the_rest() -> None:
    names = ["Elowen", "Brannoc", "Maelis", "Tamsin"]

    whole, none_left = names_prompt(names, 200)
    short, left_out = names_prompt(names, len("We have Elowen and Brannoc."))

    assert whole == "We have Elowen and Brannoc and Maelis and Tamsin."
    assert none_left == 0
    assert short == "We have Elowen and Brannoc."
    assert left_out == 2
    assert names_prompt([], 200) == ("", 0)
    assert names_prompt(["A very long name indeed"], 10) == ("", 1)


@pytest.mark.parametrize(
    ("heard", "spelled"),
    [
        (" Calaway.", " Calloway."),
        (" Glassnik", " Glasnoc"),
        (" Rannfold's", " Wrenfold's"),
        (" calloway", " Calloway"),
        (" tomorrow,", " tomorrow,"),  # a common word close to "Tarrow": it was said
        (" allow", " allow"),
        (" glass", " glass"),
        (" the", " the"),
        (" Zzyzx", " Zzyzx"),  # close to nothing
        (" 72", " 72"),
    ],
)
def test_a_heard_word_close_to_a_name_is_spelled_as_it_unless_it_is_a_common_word(heard: str, spelled: str) -> None:
    speller = NameSpeller(["Calloway", "Glasnoc", "Wrenfold", "Tarrow", "Quillo fan"], COMMON)

    assert speller.spell(heard) == spelled


def test_common_words_in_names_are_not_targets() -> None:
    speller = NameSpeller(["Quillo fan"], COMMON)

    assert speller.spell(" Turn on the fun") == " Turn on the fun"
    assert speller.spell(" the Quilo fan") == " the Quillo fan"
    assert not NameSpeller(["the lamp"], COMMON)


def test_a_name_replaces_the_words_the_decode_without_names_was_unsure_of() -> None:
    speller = NameSpeller(["Calloway", "Nimbrel"], COMMON)
    plain = (
        Word(0.0, 0.4, " Lock", 0.9),
        Word(0.4, 0.6, " the", 0.95),
        Word(0.6, 0.9, " cat", 0.05),
        Word(0.9, 1.0, " the", 0.33),
        Word(1.0, 1.4, " way", 0.94),
        Word(1.4, 1.9, " gate", 0.97),
    )
    named = (
        Word(0.0, 0.4, " Lock", 0.9),
        Word(0.4, 0.6, " the", 0.9),
        Word(0.6, 1.4, " Calloway", 0.03),
        Word(1.4, 1.9, " gate", 0.97),
    )

    assert join_words(splice_names(plain, named, speller)) == "Lock the Calloway gate"
    assert is_unsure(plain)
    assert not is_unsure((Word(0.0, 0.3, " Dial", 0.8), Word(0.3, 0.6, " 1,", 0.3))), "a number is no name's sound"

    looks_alike = (Word(0.0, 0.5, " Dim", 0.99), Word(0.5, 1.2, " Embryl", 0.43), Word(1.2, 1.6, " lamp", 0.9))
    named_alike = (Word(0.0, 0.5, " Dim", 0.99), Word(0.5, 1.3, " Nimbrel", 0.23), Word(1.3, 1.6, " lamp", 0.9))
    assert join_words(splice_names(looks_alike, named_alike, speller)) == "Dim Nimbrel lamp"

    with_number = (Word(0.0, 0.3, " Dow", 0.2), Word(0.3, 0.6, " 1,", 0.3), Word(0.6, 1.0, " please", 0.9))
    named_number = (Word(0.0, 0.6, " Calloway,", 0.1), Word(0.6, 1.0, " please", 0.9))
    assert join_words(splice_names(with_number, named_number, speller)) == "Calloway, 1, please"


@pytest.mark.parametrize(
    ("plain", "named"),
    [
        # Sure of its word: a name nobody said, written because the prompt is full of names.
        ((Word(0.0, 0.6, " second.", 0.95),), (Word(0.0, 0.6, " Brannoc.", 0.2),)),
        ((Word(0.0, 0.3, " Dial", 0.79), Word(0.3, 0.6, " 2,", 0.97)), (Word(0.0, 0.6, " Faolan", 0.65),)),
        # Sure of its word; the number it heard beside it is no name's sound, however unsure.
        ((Word(0.0, 0.3, " Dial", 0.8), Word(0.3, 0.6, " 1,", 0.3)), (Word(0.0, 0.6, " Faolan,", 0.2),)),
        # Sure enough of a word much like the name.
        ((Word(0.0, 0.5, " allow", 0.75),), (Word(0.0, 0.5, " Allowyn", 0.3),)),
        # Unsure, but of a word that looks nothing like the name.
        (
            (Word(0.0, 0.3, " add", 0.63), Word(0.3, 0.7, " milk", 0.57)),
            (Word(0.0, 0.3, " And", 0.6), Word(0.3, 0.7, " Maelis", 0.3)),
        ),
        # The decode without names heard nothing there, or already a name.
        ((Word(0.0, 0.4, " Lights", 0.9),), (Word(0.0, 0.4, " Lights", 0.9), Word(0.6, 1.0, " Brannoc", 0.1))),
        ((Word(0.0, 0.6, " Brannock", 0.3),), (Word(0.0, 0.6, " Faolan", 0.4),)),
    ],
)
def test_a_name_leaves_what_the_decode_without_names_was_sure_of_or_did_not_hear(
    plain: tuple[Word, ...], named: tuple[Word, ...]
) -> None:
    speller = NameSpeller(["Brannoc", "Faolan", "Maelis", "Allowyn"], COMMON)

    assert splice_names(plain, named, speller) == plain


def test_the_names_file_is_read_again_when_it_changes_and_kept_when_it_goes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "names.txt"
    path.write_text("Elowen\n# a comment\n\nBrannoc\n", encoding="utf-8")
    names_file = NamesFile(str(path))
    assert list(names_file.names) == ["Elowen", "Brannoc"]

    path.write_text("Elowen\nBrannoc\nMaelis\n", encoding="utf-8")
    os.utime(path, ns=(1, 10**18))  # a new modification time even on a coarse clock
    assert list(names_file.names) == ["Elowen", "Brannoc", "Maelis"]

    path.unlink()
    with caplog.at_level(logging.WARNING):
        assert list(names_file.names) == ["Elowen", "Brannoc", "Maelis"]
    assert "keeping its last names" in caplog.text
    assert "Maelis" not in caplog.text


class PromptRecorder(ScriptedTranscriber):
    """A scripted model that hears "Calaway" (a misheard name) and records the prompts it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []
        self.plain_prompts: list[str] = []

    def decode(
        self,
        audio: object,
        prompt: str,
        language: str,
        whole: bool = False,
        names: NamesInPrompt | None = None,
        judge_end: bool = False,
    ) -> Transcript:
        self.prompts.append(prompt)
        if names is not None:
            self.plain_prompts.append(names.plain)
        return Transcript((Word(0.3, 0.8, " Lock"), Word(0.8, 1.2, " the"), Word(1.2, 1.8, " Calaway")), 5.0)


async def test_the_engine_merges_request_config_file_and_outside_names_and_tells_listeners(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    names_file = tmp_path / "names.txt"
    names_file.write_text("Wrenfold\n", encoding="utf-8")
    settings = build_settings(
        {
            "model": {"threads": 1, "workers": 1, "vocabulary": ["Brannoc"], "vocabulary_file": str(names_file)},
            "stream": {"names_chars": len("We have Calloway and Tarrow and Brannoc and Wrenfold.")},
        }
    )
    transcriber = PromptRecorder()
    engine = Engine(settings, lambda: transcriber)
    seen: list[tuple[SessionInfo, Final]] = []
    engine.add_listener(
        lambda info, event: seen.append((info, event)) if isinstance(event, Final) else None, reads_partials=False
    )
    engine.set_names("homeassistant", ("Kestrel", "brannoc"))
    await engine.start()
    try:
        with caplog.at_level(logging.INFO):
            async with engine.session(SessionRequest("test", names=("Calloway",), terms=("Tarrow",))) as session:
                session.feed(silence(0.3) + read_pcm("cmd_piper_joe_01") + silence(1.0))
                await session.finish()
    finally:
        await engine.stop()

    assert transcriber.prompts
    assert all(p.startswith("We have Calloway and Tarrow and Brannoc and Wrenfold.") for p in transcriber.prompts)
    assert "Kestrel" not in transcriber.prompts[0], "the least important name did not fit"
    assert transcriber.plain_prompts, "a final is told its prompt without the names, to decode first"
    assert not any("Calloway" in p for p in transcriber.plain_prompts)
    [(info, final)] = seen
    assert final.text == "Lock the Calloway"
    assert info.vocabulary_names == 5
    assert info.vocabulary_digest == Vocabulary(("Calloway", "Tarrow", "Brannoc", "Wrenfold", "Kestrel")).digest
    assert "1 of 5 names did not fit" in caplog.text
    assert "Kestrel" not in caplog.text
