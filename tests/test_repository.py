"""The repository stands alone: the tests and the bench need nothing beside the clone."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import pytest

from .speech import REPO, SPEECH_DIR

pytestmark = pytest.mark.fast

# Built from parts, so that this file does not name the folder it looks for.
OUTSIDE_CORPUS = "/".join(("..", "shared"))
# "A few MB": the corpus travels in every clone and every wheel.
CORPUS_LIMIT_BYTES = 8 * 1024 * 1024


def _tracked_and_new_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return [REPO / name for name in listed.decode().split("\0") if name and (REPO / name).is_file()]


def test_nothing_in_the_project_names_a_folder_beside_the_clone() -> None:
    naming = []
    for path in _tracked_and_new_files():
        if path.suffix == ".wav":
            continue
        if OUTSIDE_CORPUS in path.read_text(encoding="utf-8", errors="replace"):
            naming.append(str(path.relative_to(REPO)))
    assert naming == []


def test_the_shipped_corpus_is_small_pairs_of_16_khz_mono_speech_with_their_licences() -> None:
    wavs = sorted(SPEECH_DIR.glob("*.wav"))
    assert len(wavs) >= 40
    for wav_path in wavs:
        assert wav_path.with_suffix(".txt").is_file(), wav_path.name
        with wave.open(str(wav_path), "rb") as wav:
            assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (16_000, 2, 1), wav_path.name
    assert sum(path.stat().st_size for path in SPEECH_DIR.iterdir()) <= CORPUS_LIMIT_BYTES
    kinds = {path.stem.split("_")[0] for path in wavs}
    assert {"asterisk", "cmd", "silence", "noise"} <= kinds
    licences = (SPEECH_DIR / "README.md").read_text(encoding="utf-8")
    for credit in ("Allison Smith", "CC-BY-SA 3.0", "CC0", "piper", "espeak-ng"):
        assert credit in licences
