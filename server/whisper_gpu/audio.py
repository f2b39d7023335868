"""Streamed PCM of any rate, width and channel count to 16 kHz mono float32, as it arrives, in memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr

from .engine import SAMPLE_RATE

SUPPORTED_WIDTHS = (1, 2, 4)
MIN_RATE = 1_000
MAX_RATE = 384_000
MAX_CHANNELS = 32


class AudioFormatError(ValueError):
    """A format the server cannot take."""


@dataclass(frozen=True)
class PcmFormat:
    """Raw little-endian PCM: 8-bit unsigned, 16-bit or 32-bit signed."""

    rate: int
    width: int
    channels: int

    @classmethod
    def from_event_data(cls, data: dict[str, Any]) -> PcmFormat:
        """The format an `audio-start` or `audio-chunk` event declares (unchecked: see `validate`)."""
        return cls(data.get("rate"), data.get("width"), data.get("channels"))  # type: ignore[arg-type]

    def validate(self) -> None:
        """Raise AudioFormatError naming what is wrong."""
        if not isinstance(self.rate, int) or not MIN_RATE <= self.rate <= MAX_RATE:
            msg = f"rate must be {MIN_RATE}-{MAX_RATE} Hz, got {self.rate!r}"
            raise AudioFormatError(msg)
        if self.width not in SUPPORTED_WIDTHS:
            msg = f"width must be 1, 2 or 4 bytes, got {self.width!r}"
            raise AudioFormatError(msg)
        if not isinstance(self.channels, int) or not 1 <= self.channels <= MAX_CHANNELS:
            msg = f"channels must be 1-{MAX_CHANNELS}, got {self.channels!r}"
            raise AudioFormatError(msg)

    @property
    def frame_bytes(self) -> int:
        """Bytes per sample frame (all channels)."""
        return self.width * self.channels


_DTYPES: dict[int, np.dtype[np.integer]] = {1: np.dtype(np.uint8), 2: np.dtype("<i2"), 4: np.dtype("<i4")}
_SCALES = {1: 128.0, 2: 32768.0, 4: 2147483648.0}


class AudioBuffer:
    """Collects one request's audio at 16 kHz mono, up to a limit."""

    def __init__(self, pcm_format: PcmFormat, max_seconds: float) -> None:
        pcm_format.validate()
        self.format = pcm_format
        self._max_samples = int(max_seconds * SAMPLE_RATE)
        self._parts: list[np.ndarray] = []
        self._samples = 0
        self._resampler = (
            soxr.ResampleStream(pcm_format.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if pcm_format.rate != SAMPLE_RATE
            else None
        )
        self.truncated = False

    @property
    def seconds(self) -> float:
        """Audio collected so far."""
        return self._samples / SAMPLE_RATE

    @property
    def full(self) -> bool:
        """The limit is reached; further audio is dropped."""
        return self._samples >= self._max_samples

    def append(self, payload: bytes) -> None:
        """Convert and keep a chunk; raises AudioFormatError for a payload that is not whole frames."""
        if len(payload) % self.format.frame_bytes:
            msg = (
                f"chunk of {len(payload)} bytes is not a whole number of "
                f"{self.format.frame_bytes}-byte frames ({self.format.width} bytes x {self.format.channels} channels)"
            )
            raise AudioFormatError(msg)
        if self.full:
            self.truncated = True
            return
        samples = np.frombuffer(payload, dtype=_DTYPES[self.format.width]).astype(np.float32)
        if self.format.width == 1:
            samples -= 128.0
        samples /= _SCALES[self.format.width]
        if self.format.channels > 1:
            samples = samples.reshape(-1, self.format.channels).mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        self._keep(samples)

    def finish(self) -> np.ndarray:
        """All audio of the request as one array."""
        if self._resampler is not None and not self.full:
            self._keep(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        if not self._parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._parts)

    def _keep(self, samples: np.ndarray) -> None:
        room = self._max_samples - self._samples
        if len(samples) > room:
            samples = samples[:room]
            self.truncated = True
        if len(samples):
            self._parts.append(samples)
            self._samples += len(samples)
