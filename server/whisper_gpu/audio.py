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
        """Raise AudioFormatError naming what is wrong (JSON numbers such as 2.0 or true are not integers here)."""
        if not _is_int(self.rate) or not MIN_RATE <= self.rate <= MAX_RATE:
            msg = f"rate must be {MIN_RATE}-{MAX_RATE} Hz, got {self.rate!r}"
            raise AudioFormatError(msg)
        if not _is_int(self.width) or self.width not in SUPPORTED_WIDTHS:
            msg = f"width must be 1, 2 or 4 bytes, got {self.width!r}"
            raise AudioFormatError(msg)
        if not _is_int(self.channels) or not 1 <= self.channels <= MAX_CHANNELS:
            msg = f"channels must be 1-{MAX_CHANNELS}, got {self.channels!r}"
            raise AudioFormatError(msg)

    @property
    def frame_bytes(self) -> int:
        """Bytes per sample frame (all channels)."""
        return self.width * self.channels


_DTYPES: dict[int, np.dtype[np.integer]] = {1: np.dtype(np.uint8), 2: np.dtype("<i2"), 4: np.dtype("<i4")}
_SCALES = {1: 128.0, 2: 32768.0, 4: 2147483648.0}
# A chunk is converted in pieces of at most this much audio and input, so that one chunk of a low rate
# (1 kHz: 4 MiB is half an hour, 16 times as many samples once at 16 kHz) never needs more than a little memory.
PIECE_SECONDS = 5
PIECE_BYTES = 256 * 1024
# Conversions larger than this many samples (in or out) are worth a worker thread; HA's chunks are far smaller.
INLINE_SAMPLES = SAMPLE_RATE


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class AudioBuffer:
    """Collects one request's audio at 16 kHz mono, up to a duration limit counted in the input's own frames."""

    def __init__(self, pcm_format: PcmFormat, max_seconds: float) -> None:
        pcm_format.validate()
        self.format = pcm_format
        self._max_frames = max(1, int(max_seconds * pcm_format.rate))
        self._frames = 0
        self._parts: list[np.ndarray] = []
        self._resampler = (
            soxr.ResampleStream(pcm_format.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if pcm_format.rate != SAMPLE_RATE
            else None
        )
        self._taken = 0
        self._piece_frames = max(1, min(PIECE_SECONDS * pcm_format.rate, PIECE_BYTES // pcm_format.frame_bytes))
        self.truncated = False

    @property
    def seconds(self) -> float:
        """Audio taken so far."""
        return self._frames / self.format.rate

    @property
    def full(self) -> bool:
        """The limit is reached; further audio is dropped."""
        return self._frames >= self._max_frames

    def is_heavy(self, payload_bytes: int) -> bool:
        """Whether converting a chunk of this size is too much work for the event loop."""
        frames = min(payload_bytes // self.format.frame_bytes, self._max_frames - self._frames)
        samples_in = frames * self.format.channels
        samples_out = frames * SAMPLE_RATE // self.format.rate
        return max(samples_in, samples_out) > INLINE_SAMPLES

    def append(self, payload: bytes) -> None:
        """Convert and keep a chunk, up to the limit; raises AudioFormatError for a payload of partial frames.

        The part beyond the limit is cut off before any conversion, and the rest is converted piece by piece.
        """
        frame_bytes = self.format.frame_bytes
        if len(payload) % frame_bytes:
            msg = (
                f"chunk of {len(payload)} bytes is not a whole number of "
                f"{frame_bytes}-byte frames ({self.format.width} bytes x {self.format.channels} channels)"
            )
            raise AudioFormatError(msg)
        room = self._max_frames - self._frames
        frames = len(payload) // frame_bytes
        if frames > room:
            self.truncated = True
            frames = room
        data = memoryview(payload)
        for first in range(0, frames, self._piece_frames):
            count = min(self._piece_frames, frames - first)
            self._convert(data[first * frame_bytes : (first + count) * frame_bytes])
            self._frames += count

    def take_new(self) -> np.ndarray:
        """The 16 kHz audio converted since the last call, to follow the request while it arrives."""
        new, self._taken = self._parts[self._taken :], len(self._parts)
        return np.concatenate(new) if new else np.zeros(0, dtype=np.float32)

    def so_far(self) -> np.ndarray:
        """The 16 kHz audio converted so far (the resampler's last few samples come only with `finish`)."""
        return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.float32)

    def finish(self) -> np.ndarray:
        """All audio of the request as one array."""
        if self._resampler is not None:
            self._keep(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        return self.so_far()

    def _convert(self, piece: memoryview) -> None:
        samples = np.frombuffer(piece, dtype=_DTYPES[self.format.width]).astype(np.float32)
        if self.format.width == 1:
            samples -= 128.0
        samples /= _SCALES[self.format.width]
        if self.format.channels > 1:
            samples = samples.reshape(-1, self.format.channels).mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        self._keep(samples)

    def _keep(self, samples: np.ndarray) -> None:
        if len(samples):
            self._parts.append(samples)
