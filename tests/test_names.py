"""The household's names on the real model: commands full of invented names, spoken by espeak-ng, come out
with the names right when the session has them, and not without."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_asr.api import SessionRequest
from edge_asr.config import build_settings
from edge_asr.engine import Engine

from .speech import normalise, read_pcm, reference, silence
from .spoken import speak

NAMES = ("Calloway", "Pellmire", "Wrenfold", "Glasnoc", "Sunderby")
COMMANDS = (
    "Lock the Calloway gate",
    "Turn the Pellmire kettle on",
    "Water the Wrenfold plants",
    "Close the Glasnoc garage door",
    "Is the Sunderby window open",
)


def _names_heard(text: str) -> set[str]:
    words = set(re.findall(r"[a-z]+", text.lower()))
    return {name for name in NAMES if name.lower() in words}


async def _finals(settings_layer: dict[str, object], clips: list[bytes]) -> list[str]:
    engine = Engine(build_settings({"model": {"threads": 1, "workers": 1}, **settings_layer}))
    await engine.start()
    texts = []
    try:
        for pcm in clips:
            async with engine.session(SessionRequest("test")) as session:
                session.feed(silence(0.3) + pcm + silence(0.8))
                final = await session.finish()
                texts.append(final.text if final else "")
    finally:
        await engine.stop()
    return texts


@pytest.mark.system
async def test_names_in_the_vocabulary_come_out_right(tmp_path: Path) -> None:
    clips = [speak(command, "en-us", tmp_path / f"command{index}.wav") for index, command in enumerate(COMMANDS)]

    without = await _finals({}, clips)
    with_names = await _finals({"model": {"threads": 1, "workers": 1, "vocabulary": list(NAMES)}}, clips)

    right_without = sum(name in _names_heard(text) for name, text in zip(NAMES, without, strict=True))
    right_with = sum(name in _names_heard(text) for name, text in zip(NAMES, with_names, strict=True))
    # tiny.en hears espeak's names badly: the vocabulary must win at least two of five back.
    assert right_with >= right_without + 2, (without, with_names)


@pytest.mark.parametrize("clip", ["asterisk_conf-onlyone", "silence_3s"])
async def test_a_vocabulary_adds_no_name_where_none_was_said(clip: str) -> None:
    [text] = await _finals({"model": {"threads": 1, "workers": 1, "vocabulary": list(NAMES)}}, [read_pcm(clip)])

    assert not _names_heard(text)
    assert normalise(text) == normalise(reference(clip))
