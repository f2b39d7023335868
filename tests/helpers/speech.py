"""Real speech for tests: Home Assistant commands spoken by espeak-ng and converted by sox, and recorded speech."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

# Spoken commands and what a listener hears; `clear` ones must come back exactly (after normalisation).
COMMANDS: tuple[tuple[str, bool], ...] = (
    ("turn on the kitchen light", True),
    ("turn off the living room lights", True),
    ("set the thermostat to twenty one degrees", False),
    ("what is the temperature in the bedroom", False),
    ("open the garage door", True),
    ("close the blinds in the office", False),
    ("lock the front door", True),
    ("start the vacuum cleaner", True),
    ("set a timer for ten minutes", True),
    ("what time is it", False),
    ("play some music in the kitchen", False),
    ("dim the bedroom lights to fifty percent", False),
    ("is the back door locked", False),
    ("turn on the fan", False),
    ("good night", False),
    ("add milk to the shopping list", False),
    ("what's the weather like today", True),
    ("stop the music", False),
    ("turn off all the lights", True),
    ("set the living room lights to blue", False),
)
# espeak-ng voice and speed chosen for how well Whisper understands them (base: about 4% WER).
VOICE = "en-us+f2"
WORDS_PER_MINUTE = 150


@dataclass(frozen=True)
class Utterance:
    """A WAV file and the text spoken in it."""

    text: str
    path: Path
    clear: bool

    def pcm(self) -> tuple[bytes, int, int, int]:
        """Raw frames, rate, width and channels."""
        with wave.open(str(self.path)) as wav:
            return wav.readframes(wav.getnframes()), wav.getframerate(), wav.getsampwidth(), wav.getnchannels()

    def seconds(self) -> float:
        """Duration."""
        with wave.open(str(self.path)) as wav:
            return wav.getnframes() / wav.getframerate()


def require_tools() -> None:
    """Fail with a clear message when espeak-ng or sox is missing."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        msg = f"install {' and '.join(missing)} (Debian: apt-get install espeak-ng sox) to generate test speech"
        raise RuntimeError(msg)


def synthesize(
    text: str, directory: Path, *, rate: int = 16_000, channels: int = 1, width: int = 2, voice: str = VOICE
) -> Path:
    """Speak text into a WAV of the given format (cached by content).

    sox dithers when it resamples; `-R` seeds the dither, so the same text makes the same samples in every run and
    two runs of a benchmark hear the same audio.
    """
    require_tools()
    key = hashlib.sha256(f"{voice}|{WORDS_PER_MINUTE}|{text}|{rate}|{channels}|{width}".encode()).hexdigest()[:16]
    target = directory / f"{key}.wav"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / f"{key}.raw.wav"
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(WORDS_PER_MINUTE), "-w", str(raw), text], check=True, capture_output=True
    )
    subprocess.run(
        ["sox", "-R", str(raw), "-r", str(rate), "-c", str(channels), "-b", str(width * 8), str(target)],
        check=True,
        capture_output=True,
    )
    raw.unlink()
    return target


def raw_pcm(path: Path, *, rate: int, channels: int, width: int) -> bytes:
    """A WAV's samples as raw little-endian PCM (sox reads WAV_FORMAT_EXTENSIBLE, which old `wave` cannot)."""
    encoding = "unsigned-integer" if width == 1 else "signed-integer"
    result = subprocess.run(
        [
            "sox",
            "-R",
            str(path),
            "-t",
            "raw",
            "-r",
            str(rate),
            "-c",
            str(channels),
            "-b",
            str(width * 8),
            "-e",
            encoding,
            "-",
        ],
        check=True,
        capture_output=True,
    )
    return result.stdout


def command_set(directory: Path) -> list[Utterance]:
    """Every command as 16 kHz mono 16-bit speech."""
    return [Utterance(text, synthesize(text, directory), clear) for text, clear in COMMANDS]


RECORDED = Path(__file__).resolve().parent.parent / "data" / "recorded"
"""Recorded English speech with known transcripts; sources and licences in its SOURCES.md."""


def recorded_set(directory: Path) -> list[Utterance]:
    """Every recorded clip as a 16 kHz mono 16-bit WAV (sox decodes the FLAC)."""
    directory.mkdir(parents=True, exist_ok=True)
    utterances = []
    for line in (RECORDED / "transcripts.tsv").read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        name, text, _source = line.split("\t")
        target = directory / f"{Path(name).stem}.wav"
        if not target.is_file():
            require_tools()
            subprocess.run(
                ["sox", "-R", str(RECORDED / name), "-r", "16000", "-c", "1", "-b", "16", str(target)],
                check=True,
                capture_output=True,
            )
        utterances.append(Utterance(text, target, clear=False))
    return utterances
