"""The corpus: 16 kHz mono `.wav` files, each with its reference transcript in a `.txt` beside it; and the
household's names (`--vocabulary`) its requests carry."""

from __future__ import annotations

import fnmatch
import logging
import wave
from dataclasses import dataclass
from pathlib import Path

from ..api import MAX_REQUEST_NAME_CHARS, MAX_REQUEST_NAMES
from ..audio import SAMPLE_RATE, SAMPLE_WIDTH
from ..vocabulary import Vocabulary
from .errors import BenchError
from .scoring import normalize

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Clip:
    """A WAV file and its reference transcript."""

    name: str
    wav: Path
    reference: str
    duration_s: float

    @property
    def has_words(self) -> bool:
        """Whether the reference holds words as scored (a "<beep ascending>" holds none: no final is owed)."""
        return bool(normalize(self.reference))

    def read_pcm(self) -> bytes:
        """The clip's s16le frames."""
        with wave.open(str(self.wav), "rb") as wav:
            return wav.readframes(wav.getnframes())


def _clip(wav_path: Path) -> Clip:
    try:
        with wave.open(str(wav_path), "rb") as wav:
            params = wav.getparams()
    except (OSError, wave.Error, EOFError) as err:
        raise BenchError(f"{wav_path}: not a readable WAV file ({err})") from None
    if (params.framerate, params.sampwidth, params.nchannels) != (SAMPLE_RATE, SAMPLE_WIDTH, 1):
        raise BenchError(
            f"{wav_path}: expected 16 kHz mono 16-bit audio, got {params.framerate} Hz,"
            f" {params.nchannels} channel(s), {8 * params.sampwidth}-bit"
        )
    reference = wav_path.with_suffix(".txt").read_text(encoding="utf-8").strip()
    return Clip(wav_path.stem, wav_path, reference, params.nframes / SAMPLE_RATE)


def load_corpus(directory: Path, match: str | None = None, limit: int | None = None) -> list[Clip]:
    """The .wav + .txt pairs of a directory, sorted by name, filtered by a glob on the name, at most `limit`."""
    if not directory.is_dir():
        raise BenchError(f"corpus {directory}: not a directory")
    clips: list[Clip] = []
    for wav_path in sorted(directory.glob("*.wav")):
        if match and not (fnmatch.fnmatchcase(wav_path.stem, match) or fnmatch.fnmatchcase(wav_path.name, match)):
            continue
        if not wav_path.with_suffix(".txt").is_file():
            _LOGGER.warning("Skipping %s: no %s beside it", wav_path.name, wav_path.with_suffix(".txt").name)
            continue
        clips.append(_clip(wav_path))
        if limit is not None and len(clips) >= limit:
            break
    if not clips:
        raise BenchError(f"corpus {directory}: no .wav + .txt pairs" + (f" matching {match!r}" if match else ""))
    return clips


def load_vocabulary(path: Path) -> tuple[str, ...]:
    """The names of a `--vocabulary` file, one a line (blank lines and `#` comments skipped), each once.

    A file holding more than a request may carry (what the service's WebSocket and Wyoming requests accept)
    is refused, so that every transport sends the same names.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BenchError(f"--vocabulary {path}: cannot read it ({err})") from None
    stripped = [line.strip() for line in lines]
    given = [line for line in stripped if line and not line.startswith("#")]
    if any(len(name) > MAX_REQUEST_NAME_CHARS for name in given):
        raise BenchError(f"--vocabulary {path}: a name is longer than {MAX_REQUEST_NAME_CHARS} characters")
    # The same name twice would count twice in names right.
    names = Vocabulary.merge(given).names
    if not names:
        raise BenchError(f"--vocabulary {path}: no names")
    if len(names) > MAX_REQUEST_NAMES:
        raise BenchError(f"--vocabulary {path}: more than {MAX_REQUEST_NAMES} names, what a request may carry")
    return names
