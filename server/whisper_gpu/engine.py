"""The speech model behind a narrow interface: 16 kHz mono float audio in, text out.

Nothing here knows about Wyoming or HTTP. Calls block; the inference queue runs them on its own thread.
`transcribe_batch` is the unit of work so that a batching backend can take several requests at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES
from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps

_LOGGER = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
_HALF_PRECISION = ("float16", "bfloat16", "int8_float16", "int8_bfloat16")


class UnsupportedOnDeviceError(ValueError):
    """A device or compute type this machine cannot run."""


@dataclass(frozen=True)
class Device:
    """Where inference runs."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "cpu" else f"{self.kind}:{self.index}"


@dataclass(frozen=True)
class DecodeOptions:
    """Per-request decoding choices."""

    language: str | None
    beam_size: int
    vad_threshold: float
    min_speech_duration_ms: int
    max_speech_duration_s: float
    speech_pad_ms: int

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], language: str | None) -> DecodeOptions:
        """Beam size and VAD values from the settings, with the language decided for this request."""
        return cls(
            language=language,
            beam_size=settings["beam_size"],
            vad_threshold=settings["vad_threshold"],
            min_speech_duration_ms=settings["min_speech_duration_ms"],
            max_speech_duration_s=settings["max_speech_duration_s"],
            speech_pad_ms=settings["speech_pad_ms"],
        )


@dataclass(frozen=True)
class TranscriptResult:
    """What the model heard."""

    text: str
    language: str
    audio_seconds: float
    speech_seconds: float


def _speech_only(audio: np.ndarray, options: DecodeOptions) -> np.ndarray:
    """The speech in the audio, joined, as Silero VAD with the request's settings finds it."""
    vad_options = VadOptions(
        threshold=options.vad_threshold,
        min_speech_duration_ms=options.min_speech_duration_ms,
        max_speech_duration_s=options.max_speech_duration_s,
        speech_pad_ms=options.speech_pad_ms,
    )
    chunks = get_speech_timestamps(audio, vad_options)
    if not chunks:
        return audio[:0]
    pieces, _ = collect_chunks(audio, chunks)
    return np.concatenate(pieces)


def resolve_device(setting: str) -> Device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a device this machine has."""
    gpus = ctranslate2.get_cuda_device_count()
    if setting == "auto":
        return Device("cuda", 0) if gpus > 0 else Device("cpu")
    if setting == "cpu":
        return Device("cpu")
    index = int(setting.partition(":")[2] or 0)
    if index >= gpus:
        found = f"{gpus} CUDA device(s)" if gpus else "no CUDA device"
        msg = f"device {setting} is not available: CTranslate2 sees {found}"
        raise UnsupportedOnDeviceError(msg)
    return Device("cuda", index)


def supported_compute_types(device: Device) -> list[str]:
    """Compute types CTranslate2 can run on the device."""
    return sorted(ctranslate2.get_supported_compute_types(device.kind, device.index))


def resolve_compute_type(requested: str, device: Device) -> tuple[str, str | None]:
    """Pick the compute type to load with, and a note when it differs from the one asked for."""
    supported = supported_compute_types(device)
    if requested == "auto":
        return ("float16" if "float16" in supported else "int8"), None
    if requested in supported:
        return requested, None
    if requested in _HALF_PRECISION and "int8" in supported:
        return "int8", f"{device} cannot compute in {requested}; using int8 instead"
    msg = f"{device} cannot compute in {requested}; it supports {', '.join(supported)}"
    raise UnsupportedOnDeviceError(msg)


class WhisperEngine:
    """One loaded Whisper model."""

    def __init__(self, *, name: str, path: Path, device: Device, compute_type: str, cpu_threads: int) -> None:
        started = time.monotonic()
        self.name = name
        self.device = device
        self.compute_type = compute_type
        self._model: WhisperModel | None = WhisperModel(
            str(path),
            device=device.kind,
            device_index=device.index,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
        )
        self.multilingual = bool(self._model.model.is_multilingual)
        self.languages: list[str] = sorted(_LANGUAGE_CODES) if self.multilingual else ["en"]
        self.load_seconds = time.monotonic() - started

    def warm_up(self) -> None:
        """Run the VAD and one short decode, so the first real request is as fast as the rest."""
        tone = (0.1 * np.sin(np.linspace(0, 2 * np.pi * 440, SAMPLE_RATE))).astype(np.float32)
        get_speech_timestamps(tone, VadOptions())
        self.transcribe(
            tone,
            DecodeOptions(
                language="en",
                beam_size=1,
                vad_threshold=0.0,
                min_speech_duration_ms=0,
                max_speech_duration_s=30.0,
                speech_pad_ms=0,
            ),
            vad=False,
        )

    def transcribe_batch(self, batch: Sequence[tuple[np.ndarray, DecodeOptions]]) -> list[TranscriptResult]:
        """Transcribe several requests; one result per request, in order."""
        return [self.transcribe(audio, options) for audio, options in batch]

    def transcribe(self, audio: np.ndarray, options: DecodeOptions, *, vad: bool = True) -> TranscriptResult:
        """Transcribe 16 kHz mono float32 audio; silence gives empty text without running the model."""
        model = self._require_model()
        audio_seconds = len(audio) / SAMPLE_RATE
        language = options.language if self.multilingual else "en"
        speech = _speech_only(audio, options) if vad else audio
        if not len(speech):
            # Nothing spoken: neither language detection nor decoding has anything to work on.
            return TranscriptResult(text="", language=language or "en", audio_seconds=audio_seconds, speech_seconds=0)
        segments, info = model.transcribe(
            speech,
            language=language,
            beam_size=options.beam_size,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        text = " ".join(segment.text.strip() for segment in segments).strip()
        return TranscriptResult(
            text=text,
            language=info.language or language or "en",
            audio_seconds=audio_seconds,
            speech_seconds=len(speech) / SAMPLE_RATE,
        )

    def close(self) -> None:
        """Free the model's memory now (GPU memory too) rather than whenever the garbage collector runs."""
        if self._model is None:
            return
        self._model.model.unload_model()
        self._model = None
        _LOGGER.info("Unloaded %s", self.name)

    def _require_model(self) -> WhisperModel:
        if self._model is None:
            msg = f"model {self.name} was unloaded"
            raise RuntimeError(msg)
        return self._model
