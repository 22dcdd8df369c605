"""The decode policy on a scripted backend: the encoder's input, the names step, the second opinion at 30 s and
when memory goes back."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from edge_asr import memory
from edge_asr.audio import SAMPLE_RATE, FloatAudio
from edge_asr.decoding import Decoder
from edge_asr.prosody import final_pitch_st
from edge_asr.transcript import EndCues, Transcript, Word
from edge_asr.vocabulary import NamesInPrompt, NameSpeller

from .test_prosody import voiced

pytestmark = pytest.mark.fast

FLOOR_S = 15.0
NAMES = NamesInPrompt("Earlier words.", NameSpeller(("Wrenfold",), frozenset()))
NAMED_PROMPT = "We have Wrenfold. Earlier words."
# "Water the Wrenfold plants" heard without the names, unsure of what it heard for the name, and with them.
UNSURE = (
    Word(0.3, 0.6, " Water"),
    Word(0.6, 0.8, " the"),
    Word(0.8, 1.0, " rain", 0.6),
    Word(1.0, 1.3, " filled", 0.3),
    Word(1.3, 1.6, " plants"),
)
SURE = tuple(Word(word.start, word.end, word.text, 0.95) for word in UNSURE)
NAMED = (Word(0.3, 0.6, " Water"), Word(0.6, 0.8, " the"), Word(0.8, 1.3, " Wrenfold"), Word(1.3, 1.6, " plants"))
# Hang detector, not a speed target.
HANG_S = 5.0


@dataclass(frozen=True)
class Call:
    """One transcription the policy asked of the backend."""

    prompt: str
    encoder_frames: int


class ScriptedBackend:
    """Returns its scripted transcripts in order and records every call, and when memory was given back."""

    languages: tuple[str, ...] = ("en",)
    common_words: frozenset[str] = frozenset({"water", "the", "plants"})

    def __init__(self, *replies: Transcript) -> None:
        self.replies = list(replies)
        self.calls: list[Call] = []
        # Whether each transcription was asked to judge its end.
        self.judged: list[bool] = []
        # "transcribe" and "release" in the order they happened.
        self.events: list[str] = []

    def warm_up(self, encoder_frames: int) -> float:
        """Record the encoder input it was warmed at."""
        self.events.append(f"warm up at {encoder_frames}")
        return 7.0

    def release_memory(self) -> None:
        """Record the release."""
        self.events.append("release")

    def transcribe(
        self, audio: FloatAudio, prompt: str, language: str, encoder_frames: int, judge_end: bool = False
    ) -> Transcript:
        """The next scripted transcript."""
        self.calls.append(Call(prompt, encoder_frames))
        self.judged.append(judge_end)
        self.events.append("transcribe")
        return self.replies.pop(0)


def _audio(seconds: float) -> FloatAudio:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def _heard(words: tuple[Word, ...], asr_ms: float = 10.0, hallucinated: bool = False) -> Transcript:
    return Transcript(words, asr_ms, encoder_s=FLOOR_S, hallucinated=hallucinated)


def test_a_final_with_names_is_decoded_without_them_first_then_with_them_and_the_heard_name_spliced() -> None:
    backend = ScriptedBackend(_heard(UNSURE, 10.0), _heard(NAMED, 12.0))

    transcript = Decoder(backend, FLOOR_S).decode(_audio(2.0), NAMED_PROMPT, "en", whole=True, names=NAMES)

    assert backend.calls == [Call("Earlier words.", 1500), Call(NAMED_PROMPT, 1500)]
    assert [word.text for word in transcript.words] == [" Water", " the", " Wrenfold", " plants"]
    assert transcript.asr_ms == 22.0, "both decodes' time"


def test_a_judged_final_has_its_first_decode_s_end_probability_and_the_pitch_of_its_voice() -> None:
    backend = ScriptedBackend(
        dataclasses.replace(_heard(UNSURE, 10.0), end_cues=EndCues(0.9, None)), _heard(NAMED, 12.0)
    )
    audio = voiced([150, 150, 150, 150, 110], 1.5)

    transcript = Decoder(backend, FLOOR_S).decode(audio, NAMED_PROMPT, "en", whole=True, names=NAMES, judge_end=True)

    # The decode without the names is the one judged; the names replace words, not the end.
    assert backend.judged == [True, False]
    assert transcript.end_cues == EndCues(0.9, final_pitch_st(audio))
    assert transcript.end_cues.final_pitch_st is not None


def test_a_decode_not_asked_to_judge_its_end_has_no_cues() -> None:
    backend = ScriptedBackend(_heard(SURE))

    transcript = Decoder(backend, FLOOR_S).decode(voiced([150], 1.0), "", "en", whole=True)

    assert backend.judged == [False]
    assert transcript.end_cues is None


def test_a_final_sure_of_every_word_is_not_decoded_again_with_the_names() -> None:
    backend = ScriptedBackend(_heard(SURE))

    transcript = Decoder(backend, FLOOR_S).decode(_audio(2.0), NAMED_PROMPT, "en", whole=True, names=NAMES)

    assert backend.calls == [Call("Earlier words.", 1500)]
    assert transcript.words == SURE


def test_a_hallucinated_decode_with_the_names_lends_no_name() -> None:
    backend = ScriptedBackend(_heard(UNSURE, 10.0), _heard(NAMED, 12.0, hallucinated=True))

    transcript = Decoder(backend, FLOOR_S).decode(_audio(2.0), NAMED_PROMPT, "en", whole=True, names=NAMES)

    assert len(backend.calls) == 2
    assert transcript.words == UNSURE
    assert transcript.asr_ms == 22.0


def test_a_partial_with_the_names_in_its_prompt_is_decoded_once_as_asked() -> None:
    backend = ScriptedBackend(_heard(UNSURE))

    Decoder(backend, FLOOR_S).decode(_audio(2.0), NAMED_PROMPT, "en")

    assert backend.calls == [Call(NAMED_PROMPT, 1500)]


def test_a_whole_utterance_that_heard_no_word_gets_a_second_opinion_at_30_s_and_a_partial_does_not() -> None:
    fifty = (Word(0.2, 0.7, " 50"),)
    backend = ScriptedBackend(_heard((Word(0.1, 0.2, " ..."),), 10.0), Transcript(fifty, 40.0, encoder_s=30.0))
    decoder = Decoder(backend, FLOOR_S)

    final = decoder.decode(_audio(1.0), "Earlier words.", "en", whole=True)

    assert backend.calls == [Call("Earlier words.", 1500), Call("Earlier words.", 3000)]
    assert (final.words, final.encoder_s, final.asr_ms) == (fifty, 30.0, 50.0)

    backend.replies.append(_heard(()))
    partial = decoder.decode(_audio(1.0), "Earlier words.", "en")

    assert backend.calls[2:] == [Call("Earlier words.", 1500)]
    assert partial.words == ()


def test_the_second_opinion_of_a_final_with_names_leaves_the_names_out() -> None:
    backend = ScriptedBackend(_heard(()), _heard(()))

    Decoder(backend, FLOOR_S).decode(_audio(1.0), NAMED_PROMPT, "en", whole=True, names=NAMES)

    assert backend.calls == [Call("Earlier words.", 1500), Call("Earlier words.", 3000)]


def test_a_floor_at_whisper_s_30_s_gets_no_second_opinion() -> None:
    backend = ScriptedBackend(_heard(()))

    Decoder(backend, 30.0).decode(_audio(1.0), "", "en", whole=True)

    assert backend.calls == [Call("", 3000)]


@pytest.mark.parametrize(
    ("seconds", "frames"), [(1.0, 1500), (14.98, 1500), (15.0, 1600), (16.2, 1700), (29.995, 3000), (45.0, 3000)]
)
def test_the_encoder_sees_the_floor_or_the_window_to_its_next_whole_second_and_never_more_than_30_s(
    seconds: float, frames: int
) -> None:
    backend = ScriptedBackend(_heard(SURE))

    Decoder(backend, FLOOR_S).decode(_audio(seconds), "", "en")

    assert backend.calls == [Call("", frames)]


def test_partials_give_memory_back_before_their_decode_and_finals_at_the_floor_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = ScriptedBackend(_heard(SURE), _heard(SURE), _heard(SURE))
    decoder = Decoder(backend, FLOOR_S)

    decoder.decode(_audio(2.0), "", "en")
    assert backend.events == ["transcribe"], "at most once every interval, counted from the start"

    monkeypatch.setattr(memory, "_TRIM_INTERVAL_S", 0.0)
    decoder.decode(_audio(2.0), "", "en", whole=True)
    decoder.decode(_audio(2.0), "", "en")

    assert backend.events == ["transcribe", "transcribe", "release", "transcribe"]


def test_a_decode_longer_than_the_floor_running_alone_starts_on_memory_given_back() -> None:
    backend = ScriptedBackend(_heard(SURE), _heard(()), _heard(()))
    decoder = Decoder(backend, FLOOR_S)

    decoder.decode(_audio(20.0), "", "en", whole=True)
    decoder.decode(_audio(1.0), "", "en", whole=True)

    # The 21 s decode; then a whole one at the floor that heard no word, and its second opinion at 30 s.
    assert backend.events == ["release", "transcribe", "transcribe", "release", "transcribe"]


class HeldBackend(ScriptedBackend):
    """A scripted backend whose transcription with the prompt "held" waits until the test lets it go."""

    def __init__(self, *replies: Transcript) -> None:
        super().__init__(*replies)
        self.holding = threading.Event()
        self.go = threading.Event()

    def transcribe(
        self, audio: FloatAudio, prompt: str, language: str, encoder_frames: int, judge_end: bool = False
    ) -> Transcript:
        """Wait while held, then the next scripted transcript."""
        if prompt == "held":
            self.holding.set()
            self.go.wait(HANG_S)
        return super().transcribe(audio, prompt, language, encoder_frames)


def test_a_decode_longer_than_the_floor_beside_another_does_not_give_memory_back() -> None:
    backend = HeldBackend(_heard(SURE), _heard(SURE))
    decoder = Decoder(backend, 10.0)
    partial = threading.Thread(target=decoder.decode, args=(_audio(1.0), "held", "en"), daemon=True)
    partial.start()
    try:
        assert backend.holding.wait(HANG_S)

        decoder.decode(_audio(16.0), "", "en", whole=True)  # 1700 frames fit beside the partial's 1000

        assert backend.events == ["transcribe"]
    finally:
        backend.go.set()
        partial.join(HANG_S)


def test_the_idle_release_gives_memory_back_at_once_and_warm_up_runs_at_the_floor() -> None:
    backend = ScriptedBackend()
    decoder = Decoder(backend, FLOOR_S)

    decoder.release_memory()

    assert decoder.warm_up() == 7.0
    assert backend.events == ["release", "warm up at 1500"]
    assert (decoder.languages, decoder.common_words) == (backend.languages, backend.common_words)
