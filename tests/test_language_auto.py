"""`auto` language: whole decodes ask the model to hear the language in all of the utterance, partials keep the one
heard last, and the final names the language its whole decode heard; a model of one language speaks only it."""

from __future__ import annotations

import pytest

from edge_asr.admission import Admission
from edge_asr.api import SessionRequest, UnsupportedLanguage
from edge_asr.config import AUTO_LANGUAGE, LimitSettings, StreamSettings, build_settings
from edge_asr.events import Final
from edge_asr.metrics import Metrics
from edge_asr.session import DecodeRequest, StreamSession
from edge_asr.transcript import Transcript

from .test_session import Audio, scripted_words

pytestmark = pytest.mark.fast

CHUNK_BYTES = 640
BYTES_PER_S = 32_000


def _run(language: str, heard: dict[bool, str]) -> tuple[list[DecodeRequest], list[Final]]:
    """Feed two commands with a pause to a session in `language`; decodes hear `heard[final]`."""
    audio = Audio().pause(0.3).say("cmd_piper_joe_03").pause(0.2).say("cmd_piper_joe_05").pause(1.0)
    session = StreamSession(StreamSettings(), LimitSettings(), split_on_silence=False, language=language)
    requests: list[DecodeRequest] = []
    finals: list[Final] = []
    now = 1000.0

    def serve() -> None:
        while session.wants_decode():
            request = session.next_request()
            requests.append(request)
            transcript = Transcript(scripted_words(audio.script, request), 12.0, language=heard[request.final])
            finals.extend(e for e in session.apply(request, transcript, now) if isinstance(e, Final))

    for offset in range(0, len(audio.pcm), CHUNK_BYTES):
        now += CHUNK_BYTES / BYTES_PER_S
        finals.extend(e for e in session.push(audio.pcm[offset : offset + CHUNK_BYTES], now) if isinstance(e, Final))
        serve()
    finals.extend(e for e in session.end_of_audio(now) if isinstance(e, Final))
    serve()
    return requests, finals


def test_auto_whole_decodes_detect_partials_keep_the_heard_language_and_the_final_names_it() -> None:
    requests, finals = _run(AUTO_LANGUAGE, {True: "es", False: "it"})

    whole = [r for r in requests if r.final]
    partial = [r for r in requests if not r.final]
    assert whole
    assert partial
    assert all(r.language == AUTO_LANGUAGE for r in whole), "every whole decode hears all of the utterance"
    assert partial[0].language == AUTO_LANGUAGE, "nothing heard yet: the first decode detects"
    assert {r.language for r in partial[1:]} <= {"es", "it"}, "a partial keeps the language heard last"
    assert len(partial) > 1
    [final] = finals
    assert final.language == "es", "the final's language is its whole decode's"
    assert final.to_dict()["language"] == "es"


def test_a_session_in_a_given_language_asks_for_it_and_its_final_names_it() -> None:
    requests, finals = _run("de", {True: "de", False: "de"})

    assert {r.language for r in requests} == {"de"}
    [final] = finals
    assert final.language == "de"


@pytest.mark.parametrize(
    ("languages", "asked", "settled"),
    [
        (("en", "de", "es"), "auto", AUTO_LANGUAGE),
        (("en", "de", "es"), "AUTO", AUTO_LANGUAGE),
        (("en",), "auto", "en"),
        (("en", "de"), "de-AT", "de"),
    ],
)
def test_auto_is_a_language_of_a_model_of_several(languages: tuple[str, ...], asked: str, settled: str) -> None:
    admission = Admission(build_settings({}), Metrics(), lambda: languages, frozenset)
    assert admission.admit(SessionRequest(source="test", language=asked), 0).language == settled


def test_an_unknown_language_is_still_refused() -> None:
    admission = Admission(build_settings({}), Metrics(), lambda: ("en", "de"), frozenset)
    with pytest.raises(UnsupportedLanguage):
        admission.language("xx")
