"""Model resolution and decoding on the real bundled tiny.en."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_asr.audio import FloatAudio, pcm16_to_float
from edge_asr.config import ModelSettings, StreamSettings
from edge_asr.decoding import Decoder, WhisperTranscriber
from edge_asr.memory import EncoderBudget
from edge_asr.model import ModelError, WhisperBackend, bundled_model_dir, languages_of, resolve_model
from edge_asr.transcript import Transcript
from edge_asr.vad import VadGate
from edge_asr.vocabulary import NamesInPrompt, NameSpeller, is_unsure, names_prompt

from .speech import normalise, read_pcm, reference, silence


@pytest.mark.fast
def test_tiny_en_resolves_to_the_bundled_package_directory() -> None:
    bundled = bundled_model_dir()
    assert bundled is not None
    assert (bundled / "model.bin").is_file()
    assert resolve_model("tiny.en") == str(bundled)


@pytest.mark.fast
def test_a_model_directory_resolves_to_itself() -> None:
    bundled = bundled_model_dir()
    assert bundled is not None
    assert resolve_model(str(bundled)) == str(bundled)


@pytest.mark.fast
def test_a_directory_without_model_bin_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model\.name: directory .* has no model\.bin"):
        resolve_model(str(tmp_path))


@pytest.mark.fast
def test_a_missing_directory_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))


@pytest.mark.fast
def test_other_size_names_are_left_to_faster_whisper() -> None:
    assert resolve_model("base.en") == "base.en"


def test_the_bundled_model_loaded_by_directory_transcribes_speech() -> None:
    bundled = bundled_model_dir()
    transcriber = WhisperTranscriber(ModelSettings(name=str(bundled), threads=1, workers=1))
    assert transcriber.languages == ("en",)
    assert transcriber.warm_up() > 0

    transcript = transcriber.decode(pcm16_to_float(read_pcm("asterisk_conf-onlyone")), "", "en")

    text = "".join(word.text for word in transcript.words)
    assert normalise(text) == normalise(reference("asterisk_conf-onlyone"))
    ends = [word.end for word in transcript.words]
    assert ends == sorted(ends)
    assert 0 < ends[-1] <= 6.0
    assert all(word.start <= word.end for word in transcript.words)


def test_a_whole_decode_asked_to_judge_its_end_gives_the_decoder_s_and_the_voice_s_cues() -> None:
    transcriber = WhisperTranscriber(ModelSettings(threads=1, workers=1))
    # "Set the thermostat to seventy two degrees.", with the silence a whole decode has after the voice.
    audio = pcm16_to_float(silence(0.3) + read_pcm("cmd_piper_joe_03") + silence(0.3))

    plain = transcriber.decode(audio, "", "en", whole=True)
    judged = transcriber.decode(audio, "", "en", whole=True, judge_end=True)

    assert plain.end_cues is None
    assert judged.words == plain.words, "judging the end changes no word"
    assert judged.end_cues is not None
    probability, pitch = judged.end_cues.end_probability, judged.end_cues.final_pitch_st
    # The decoder expects the text to end where the statement ends, and the voice fell there.
    assert probability is not None
    assert 0.5 < probability <= 1.0
    assert pitch is not None
    assert pitch < -1.5


def test_a_text_that_ends_no_sentence_has_no_end_probability() -> None:
    backend = WhisperBackend(ModelSettings(threads=1, workers=1))
    # The command cut in its third word: Whisper writes no full stop after a word it did not hear end.
    clip = read_pcm("cmd_piper_joe_03")
    cut = len(clip) * 2 // 5 // 2 * 2  # at a sample
    judged = backend.transcribe(pcm16_to_float(clip[:cut]), "", "en", 1500, judge_end=True)

    text = "".join(word.text for word in judged.words).strip()
    assert judged.end_cues is not None
    if text[-1:] in ".?!":
        assert judged.end_cues.end_probability is not None
    else:
        assert judged.end_cues.end_probability is None


def test_a_failing_end_probability_leaves_the_decode_standing(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = WhisperBackend(ModelSettings(threads=1, workers=1))

    def broken(*_args: object) -> float:
        raise RuntimeError("the decoder pass failed")

    monkeypatch.setattr(backend, "_end_probability", broken)
    audio = pcm16_to_float(silence(0.3) + read_pcm("cmd_piper_joe_03") + silence(0.3))
    judged = backend.transcribe(audio, "", "en", 1500, judge_end=True)

    assert judged.words == backend.transcribe(audio, "", "en", 1500).words
    assert judged.end_cues is not None
    assert judged.end_cues.end_probability is None


def test_the_backend_encodes_the_frames_it_is_told_whatever_the_window() -> None:
    backend = WhisperBackend(ModelSettings(threads=1, workers=1))
    audio = pcm16_to_float(read_pcm("asterisk_conf-onlyone"))

    short = backend.transcribe(audio, "", "en", encoder_frames=1000)
    padded = backend.transcribe(audio, "", "en", encoder_frames=3000)

    # The override of faster-whisper's encode() must run: the encoder sees the frames asked for, not 30 s.
    assert (short.encoder_s, padded.encoder_s) == (10.0, 30.0)
    assert normalise("".join(word.text for word in short.words)) == normalise(reference("asterisk_conf-onlyone"))


def test_a_shortened_encoder_floor_is_applied_and_still_transcribes() -> None:
    transcriber = WhisperTranscriber(ModelSettings(threads=1, workers=1, encoder_floor_s=10.0))
    clip = read_pcm("asterisk_conf-onlyone")

    short = transcriber.decode(pcm16_to_float(clip), "", "en")
    longer = transcriber.decode(pcm16_to_float(silence(10.0) + clip), "", "en")

    # The override of faster-whisper's encode() must run: a short window is encoded as the floor, a longer
    # one to its next whole second, never as Whisper's padded 30 s.
    assert short.encoder_s == 10.0
    window_s = 10.0 + len(clip) / 32000
    assert longer.encoder_s.is_integer()
    assert window_s < longer.encoder_s < window_s + 1
    assert normalise("".join(word.text for word in short.words)) == normalise(reference("asterisk_conf-onlyone"))


def test_the_whisper_floor_encodes_the_padded_30_s() -> None:
    transcriber = WhisperTranscriber(ModelSettings(threads=1, workers=1, encoder_floor_s=30.0))

    transcript = transcriber.decode(pcm16_to_float(read_pcm("asterisk_conf-onlyone")), "", "en")

    assert transcript.encoder_s == 30.0


@pytest.mark.fast
def test_languages_are_known_from_the_model_files_before_it_loads(tmp_path: Path) -> None:
    multilingual = tmp_path / "multilingual"
    multilingual.mkdir()
    (multilingual / "model.bin").write_bytes(b"")
    tokens = [f"token{index}" for index in range(51865 - 6)]
    tokens += ["<|startoftranscript|>", "<|en|>", "<|de|>", "<|haw|>", "<|translate|>", "<|nocaptions|>"]
    (multilingual / "vocabulary.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")

    assert languages_of("tiny.en") == ("en",)
    assert languages_of(str(multilingual)) == ("en", "de", "haw")
    assert languages_of("base.en") == ("en",)
    assert languages_of("small") == (), "a multilingual size name not downloaded yet is known once it loads"
    assert languages_of(str(tmp_path / "nowhere")) == ()


def test_a_whole_utterance_with_no_word_at_the_short_context_gets_a_second_opinion_at_30_s() -> None:
    transcriber = WhisperTranscriber(ModelSettings(threads=1, workers=1, encoder_floor_s=15.0))
    gate = VadGate.of(StreamSettings())
    pcm = read_pcm("asterisk_digits_50") + silence(0.5)
    start = next(change.at_s for change in gate.push(pcm) if change.speaking)
    first, last = max(0.0, start - 0.3), gate.last_voice_end_s + 0.12  # the final's window, as a session cuts it
    window = pcm16_to_float(pcm[round(first * 16000) * 2 : round(last * 16000) * 2])

    final = transcriber.decode(window, "", "en", whole=True)
    noise = transcriber.decode(pcm16_to_float(read_pcm("noise_hiss_3s")), "", "en", whole=True)

    assert normalise("".join(word.text for word in final.words)) == "50"
    assert final.encoder_s == 30.0, "the word came from Whisper's own context"
    assert noise.words == ()


class BudgetSpy(EncoderBudget):
    """An encoder budget that records the frames each decode asked it for."""

    def __init__(self, frames: int) -> None:
        super().__init__(frames)
        self.asked: list[int] = []

    @contextlib.contextmanager
    def admit(self, frames: int) -> Iterator[bool]:
        """Record, then admit as the budget does."""
        self.asked.append(frames)
        with super().admit(frames) as alone:
            yield alone


def test_every_pass_of_a_decode_holds_the_frames_it_encodes_in_the_encoder_budget() -> None:
    transcriber = WhisperTranscriber(ModelSettings(threads=1, workers=1, encoder_floor_s=15.0))
    spy = BudgetSpy(3000)
    transcriber._budget = spy
    clip = read_pcm("asterisk_conf-onlyone")

    transcriber.decode(pcm16_to_float(clip), "", "en")
    transcriber.decode(pcm16_to_float(silence(16.0) + clip), "", "en")
    transcriber.decode(pcm16_to_float(read_pcm("noise_hiss_3s")), "", "en", whole=True)

    window_frames = (16.0 + len(clip) / 32000) * 100
    floor, longer, *no_word = spy.asked
    assert (floor, no_word) == (1500, [1500, 3000]), "the floor, then a no-word whole decode at 30 s"
    assert longer % 100 == 0, "beyond the floor: whole seconds"
    assert window_frames < longer < window_frames + 100


class RecordingBackend:
    """The real backend, recording the prompt of every transcription the decode policy asks of it."""

    def __init__(self, backend: WhisperBackend) -> None:
        self._backend = backend
        self.languages = backend.languages
        self.common_words = backend.common_words
        self.prompts: list[str] = []

    def warm_up(self, encoder_frames: int) -> float:
        """As the real backend."""
        return self._backend.warm_up(encoder_frames)

    def release_memory(self) -> None:
        """As the real backend."""
        self._backend.release_memory()

    def transcribe(
        self, audio: FloatAudio, prompt: str, language: str, encoder_frames: int, judge_end: bool = False
    ) -> Transcript:
        """Record the prompt, then transcribe as the real backend."""
        self.prompts.append(prompt)
        return self._backend.transcribe(audio, prompt, language, encoder_frames)


def test_a_final_with_names_is_decoded_without_them_and_again_with_them_only_where_that_was_unsure() -> None:
    settings = ModelSettings(threads=1, workers=1)
    spy = RecordingBackend(WhisperBackend(settings))
    transcriber = Decoder(spy, settings.encoder_floor_s)
    names = ("Zorbeline Quathmire",)
    sentence, _ = names_prompt(names, 200)
    plain = "Earlier words."
    unsure_seen = set()

    for clip in ("asterisk_conf-onlyone", "asterisk_conf-hasjoin", "asterisk_conf-getconfno"):
        audio = pcm16_to_float(read_pcm(clip))
        without = transcriber.decode(audio, plain, "en", whole=True)
        spy.prompts.clear()

        transcript = transcriber.decode(
            audio, f"{sentence} {plain}", "en", whole=True, names=NamesInPrompt(plain, NameSpeller(names, frozenset()))
        )

        unsure = is_unsure(without.words)
        unsure_seen.add(unsure)
        assert spy.prompts == ([plain, f"{sentence} {plain}"] if unsure else [plain])
        assert transcript.words == without.words, "a name nobody said, and unlike any word heard, replaces none"
        assert normalise("".join(word.text for word in transcript.words)) == normalise(reference(clip))
    assert unsure_seen == {True, False}, "the clips cover a decode without names that is sure and one that is not"
