"""The household's names: merged in priority order, put in the prompt within a budget, heard words spelled
as names, the file read again when it changes; and the engine passing them to decodes and to listeners."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from edge_asr.agreement import Word
from edge_asr.config import build_settings
from edge_asr.engine import Engine
from edge_asr.events import Final, SessionInfo
from edge_asr.model import Transcript
from edge_asr.vocabulary import NamesFile, NamesInPrompt, NameSpeller, Vocabulary, names_prompt

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
        self, audio: object, prompt: str, language: str, whole: bool = False, names: NamesInPrompt | None = None
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
    engine.add_listener(lambda info, event: seen.append((info, event)) if isinstance(event, Final) else None)
    engine.set_names("homeassistant", ("Kestrel", "brannoc"))
    await engine.start()
    try:
        with caplog.at_level(logging.INFO):
            async with engine.session("test", names=("Calloway",), terms=("Tarrow",)) as session:
                session.feed(silence(0.3) + read_pcm("cmd_piper_joe_01") + silence(1.0))
                await session.finish()
    finally:
        await engine.stop()

    assert transcriber.prompts
    assert all(p.startswith("We have Calloway and Tarrow and Brannoc and Wrenfold.") for p in transcriber.prompts)
    assert "Kestrel" not in transcriber.prompts[0], "the least important name did not fit"
    assert transcriber.plain_prompts, "a final decode may be decoded again without the names"
    assert not any("Calloway" in p for p in transcriber.plain_prompts)
    [(info, final)] = seen
    assert final.text == "Lock the Calloway"
    assert info.vocabulary_names == 5
    assert info.vocabulary_digest == Vocabulary(("Calloway", "Tarrow", "Brannoc", "Wrenfold", "Kestrel")).digest
    assert "1 of 5 names did not fit" in caplog.text
    assert "Kestrel" not in caplog.text
