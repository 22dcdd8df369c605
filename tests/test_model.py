"""Model resolution and decoding on the real bundled tiny.en."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_asr.audio import pcm16_to_float
from edge_asr.config import ModelSettings
from edge_asr.model import ModelError, WhisperTranscriber, bundled_model_dir, resolve_model

from .conftest import read_pcm, reference
from .wsclient import normalise


def test_tiny_en_resolves_to_the_bundled_package_directory() -> None:
    bundled = bundled_model_dir()
    assert bundled is not None and (bundled / "model.bin").is_file()
    assert resolve_model("tiny.en") == str(bundled)


def test_a_model_directory_resolves_to_itself() -> None:
    bundled = bundled_model_dir()
    assert bundled is not None
    assert resolve_model(str(bundled)) == str(bundled)


def test_a_directory_without_model_bin_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model: directory .* has no model\.bin"):
        resolve_model(str(tmp_path))


def test_a_missing_directory_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))


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
    assert ends == sorted(ends) and 0 < ends[-1] <= 6.0
    assert all(word.start <= word.end for word in transcript.words)


def test_a_shortened_encoder_floor_still_transcribes() -> None:
    transcriber = WhisperTranscriber(ModelSettings(threads=1, workers=1, encoder_floor_s=10.0))

    transcript = transcriber.decode(pcm16_to_float(read_pcm("asterisk_conf-onlyone")), "", "en")

    assert normalise("".join(word.text for word in transcript.words)) == normalise(reference("asterisk_conf-onlyone"))
