"""Other languages on a real multilingual model (Whisper base): with `model.language: auto` and no language in the
request, each utterance is decoded in the language the model hears in all of it, and the Wyoming transcript and the
final name it; a request that names its language gets it. Speech made by espeak-ng, compared with the whole-clip
decode of the same audio by faster-whisper itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from faster_whisper import WhisperModel
from wyoming.asr import Transcribe, Transcript, TranscriptStart, TranscriptStop
from wyoming.client import AsyncTcpClient

from edge_asr.api import SessionRequest
from edge_asr.bench.wyoming_client import read_until, send_clip
from edge_asr.config import build_settings
from edge_asr.engine import Engine

from .speech import normalise, silence
from .spoken import multilingual_base, speak
from .wyoming_client import serving

pytestmark = pytest.mark.system

# Commands whose language the model tells apart at once from espeak-ng's voices (Whisper finds most of its voices
# hard; the bench measures recorded speech).
COMMANDS = {
    "es": "Enciende la luz de la cocina, por favor.",
    "de": "Schalte bitte das Licht in der Küche ein.",
}
# Words a streamed final may differ by from the whole-clip decode (its encoder input is 15 s, not 30 s).
WORDS_APART = 2


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Whisper base, multilingual, from its test packages."""
    return multilingual_base(tmp_path_factory.mktemp("whisper-base"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Each command spoken in its language."""
    directory = tmp_path_factory.mktemp("spoken")
    return {language: speak(text, language, directory / f"{language}.wav") for language, text in COMMANDS.items()}


@pytest.fixture(scope="module")
def whole_clip(base_model: Path, clips: dict[str, bytes]) -> dict[str, tuple[str, str]]:
    """faster-whisper's own decode of each whole clip, detecting its language: (language, text)."""
    model = WhisperModel(str(base_model), device="cpu", compute_type="int8", cpu_threads=1)
    decoded = {}
    for language, pcm in clips.items():
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
        segments, info = model.transcribe(audio, beam_size=1, temperature=0.0)
        decoded[language] = (info.language, " ".join(segment.text for segment in segments))
    return decoded


def _words_apart(one: str, other: str) -> int:
    """Word edit distance between two texts, normalised as the bench scores."""
    left, right = normalise(one).split(), normalise(other).split()
    row = list(range(len(right) + 1))
    for i, word in enumerate(left, start=1):
        previous, row[0] = row[0], i
        for j, other_word in enumerate(right, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other_word))
    return row[-1]


async def _final(engine: Engine, pcm: bytes, language: str | None) -> tuple[str, str]:
    async with engine.session(SessionRequest("test", language=language, split_on_silence=False)) as session:
        session.feed(silence(0.3) + pcm + silence(0.8))
        final = await session.finish()
    assert final is not None
    return final.language, final.text


def test_auto_decodes_each_utterance_in_the_language_heard_and_names_it(
    base_model: Path, clips: dict[str, bytes], whole_clip: dict[str, tuple[str, str]]
) -> None:
    settings = build_settings({"model": {"name": str(base_model), "language": "auto", "threads": 1, "workers": 1}})

    async def run() -> dict[str, tuple[str, str]]:
        engine = Engine(settings)
        await engine.start()
        try:
            return {spoken: await _final(engine, pcm, None) for spoken, pcm in clips.items()}
        finally:
            await engine.stop()

    finals = asyncio.run(run())
    for spoken, (language, text) in finals.items():
        whole_language, whole_text = whole_clip[spoken]
        assert language == whole_language == spoken, (spoken, text, whole_text)
        assert _words_apart(text, whole_text) <= WORDS_APART, (text, whole_text)


def test_a_wyoming_request_without_a_language_gets_its_transcript_in_the_language_heard(
    base_model: Path, clips: dict[str, bytes]
) -> None:
    settings = build_settings({"model": {"name": str(base_model), "language": "auto", "threads": 1, "workers": 1}})

    async def run() -> list[tuple[str | None, str | None]]:
        engine = Engine(settings)
        await engine.start()
        answers = []
        try:
            async with serving(engine, {"endpointing": False}) as port:
                for spoken, asked in (("es", None), ("de", None), ("es", "es")):
                    async with AsyncTcpClient("127.0.0.1", port) as client:
                        await client.write_event(Transcribe(language=asked).event())
                        reader = asyncio.create_task(read_until(client, TranscriptStop().event().type))
                        await send_clip(client, silence(0.3) + clips[spoken], trailing_s=0.5, realtime=False)
                        events = [got.event for got in await reader]
                    start = next(TranscriptStart.from_event(e) for e in events if TranscriptStart.is_type(e.type))
                    transcript = next(Transcript.from_event(e) for e in events if Transcript.is_type(e.type))
                    answers.append((start.language, transcript.language))
        finally:
            await engine.stop()
        return answers

    assert asyncio.run(run()) == [(None, "es"), (None, "de"), ("es", "es")]
