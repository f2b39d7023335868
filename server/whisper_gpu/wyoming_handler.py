"""The Wyoming protocol: one handler per connection, protocol only; the service does the rest.

Events are read with hard size limits (the `wyoming` library reads whatever a header claims), and every bad
input gets an `error` event with a code while the client can still read it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.ping import Ping, Pong

from . import __version__
from .audio import AudioBuffer, AudioFormatError, PcmFormat
from .engine import TranscriptResult
from .service import RequestError

_LOGGER = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_DATA_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
ATTRIBUTION = Attribution(name="OpenAI Whisper on faster-whisper", url="https://github.com/SYSTRAN/faster-whisper")


class ProtocolError(Exception):
    """Input that breaks the framing; the connection cannot continue after it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TranscriptionService(Protocol):
    """What the handler needs from the service."""

    def check_language(self, language: str | None) -> str | None:
        """Raise RequestError when the language cannot be served."""

    async def transcribe(self, audio: np.ndarray, language: str | None) -> tuple[TranscriptResult, str]:
        """Transcribe 16 kHz mono audio; the result and the model's name."""

    def describe_model(self) -> tuple[str, list[str]]:
        """Model name and languages for `describe`."""

    def max_audio_seconds(self) -> float:
        """Audio per request before buffering stops."""

    def log_transcripts(self) -> bool:
        """Whether transcript text may be logged."""

    def record(self, outcome: str, audio_seconds: float, processing_seconds: float) -> Any:
        """Count a finished request."""

    def protocol_error(self, code: str) -> None:
        """Count bad input."""


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """Read one event; None at a clean or mid-event end of stream; ProtocolError for malformed input."""
    try:
        line = await reader.readline()
    except ValueError as err:  # the stream's limit: a header line longer than MAX_HEADER_BYTES
        raise ProtocolError("header_too_large", f"event header longer than {MAX_HEADER_BYTES} bytes") from err
    if not line.endswith(b"\n"):
        return None
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError("malformed_event", f"event header is not JSON: {err}") from err
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("malformed_event", "event header must be a JSON object with a string 'type'")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise ProtocolError("malformed_event", "event 'data' must be a JSON object")
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    try:
        if data_length:
            extra = json.loads(await reader.readexactly(data_length))
            if not isinstance(extra, dict):
                raise ProtocolError("malformed_event", "event data must be a JSON object")
            data.update(extra)
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError("malformed_event", f"event data is not JSON: {err}") from err
    return Event(type=header["type"], data=data, payload=payload)


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError("malformed_event", f"{key} must be a non-negative integer")
    if value > limit:
        code = "payload_too_large" if key == "payload_length" else "data_too_large"
        raise ProtocolError(code, f"{key} {value} exceeds the limit of {limit} bytes")
    return value


@dataclass
class _Request:
    """One transcription: language, audio collected so far, and whether it was refused."""

    language: str | None
    audio: AudioBuffer | None = None
    rejected: bool = False
    answered: bool = False


class WyomingHandler:
    """Serves one Wyoming connection: describe, and transcribe with streamed audio."""

    def __init__(
        self, service: TranscriptionService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._service = service
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "client")
        self._request: _Request | None = None
        self.busy = False

    async def run(self) -> None:
        """Handle events until the client leaves or breaks the framing."""
        try:
            while (event := await read_event(self._reader)) is not None:
                await self._handle(event)
        except ProtocolError as err:
            _LOGGER.warning("Closing connection from %s: %s", self.peer, err.message)
            self._service.protocol_error(err.code)
            await self._send_error(err.code, err.message)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._abandon()
            self._writer.close()

    async def _handle(self, event: Event) -> None:
        if Describe.is_type(event.type):
            await self._write(self._info().event())
        elif Ping.is_type(event.type):
            await self._write(Pong(text=Ping.from_event(event).text).event())
        elif Transcribe.is_type(event.type):
            await self._on_transcribe(event)
        elif AudioStart.is_type(event.type):
            await self._on_audio_start(event)
        elif AudioChunk.is_type(event.type):
            await self._on_audio_chunk(event)
        elif AudioStop.is_type(event.type):
            await self._on_audio_stop()
        else:
            _LOGGER.debug("Ignoring %s event from %s", event.type, self.peer)

    async def _on_transcribe(self, event: Event) -> None:
        self._abandon()
        language = event.data.get("language")
        self._request = _Request(language=language if isinstance(language, str) and language else None)
        try:
            self._service.check_language(self._request.language)
        except RequestError as err:
            await self._reject("invalid", err.code, err.message)

    async def _on_audio_start(self, event: Event) -> None:
        if self._request is None or self._request.audio is not None or self._request.answered:
            self._abandon()
            self._request = _Request(language=None)  # audio without `transcribe`: default language
        if self._request.rejected:
            return
        self.busy = True
        try:
            pcm = PcmFormat.from_event_data(event.data)
            self._request.audio = AudioBuffer(pcm, self._service.max_audio_seconds())
        except AudioFormatError as err:
            await self._reject("invalid", "invalid_audio_format", f"audio-start: {err}")

    async def _on_audio_chunk(self, event: Event) -> None:
        request = self._request
        if request is None or (request.audio is None and not request.rejected):
            self._service.protocol_error("audio_chunk_without_start")
            await self._send_error("audio_chunk_without_start", "audio-chunk before audio-start; chunk dropped")
            return
        if request.rejected or request.answered or request.audio is None:
            return
        chunk_format = PcmFormat.from_event_data(event.data)
        if chunk_format != request.audio.format:
            await self._reject(
                "invalid", "invalid_audio_format", f"audio-chunk format {chunk_format} differs from audio-start"
            )
            return
        try:
            request.audio.append(event.payload or b"")
        except AudioFormatError as err:
            await self._reject("invalid", "invalid_audio_format", f"audio-chunk: {err}")
            return
        if request.audio.full:
            await self._finish(request)

    async def _on_audio_stop(self) -> None:
        request = self._request
        if request is None or (request.audio is None and not request.rejected):
            self._service.protocol_error("audio_stop_without_start")
            await self._send_error("audio_stop_without_start", "audio-stop without audio-start")
            return
        self._request = None
        try:
            if not request.rejected and not request.answered:
                await self._finish(request)
        finally:
            self.busy = False

    async def _finish(self, request: _Request) -> None:
        """Transcribe what came and answer; audio arriving later in this request is dropped."""
        assert request.audio is not None  # noqa: S101 - only called with audio
        request.answered = True
        audio = request.audio.finish()
        seconds = len(audio) / 16_000
        started = time.monotonic()
        model = "-"
        try:
            result, model = await self._service.transcribe(audio, request.language)
        except RequestError as err:
            self._log(seconds, time.monotonic() - started, model=model, outcome="not_ready", note=err.message)
            self._service.record("not_ready", seconds, time.monotonic() - started)
            await self._send_error(err.code, err.message)
            return
        except Exception:
            _LOGGER.exception("Transcription failed for %s", self.peer)
            self._service.record("error", seconds, time.monotonic() - started)
            await self._send_error("transcription_failed", "The server failed to transcribe the audio")
            return
        elapsed = time.monotonic() - started
        outcome = "truncated" if request.audio.truncated else ("ok" if result.text else "no_speech")
        self._service.record(outcome, seconds, elapsed)
        note = f"stopped at the {self._service.max_audio_seconds():g} s limit" if request.audio.truncated else ""
        self._log(seconds, elapsed, model=model, outcome=outcome, note=note, text=result.text)
        await self._write(Transcript(text=result.text, language=result.language).event())

    async def _reject(self, outcome: str, code: str, message: str) -> None:
        """Refuse the current request: tell the client now, drop its audio until the next request."""
        assert self._request is not None  # noqa: S101
        self._request.rejected = True
        self._service.record(outcome, 0.0, 0.0)
        self._log(0.0, 0.0, model="-", outcome=outcome, note=message)
        await self._send_error(code, message)

    def _abandon(self) -> None:
        """A request that never reached audio-stop: count it once, as the client going away."""
        request, self._request = self._request, None
        self.busy = False
        if request is not None and request.audio is not None and not (request.rejected or request.answered):
            seconds = request.audio.seconds
            self._service.record("disconnected", seconds, 0.0)
            self._log(seconds, 0.0, model="-", outcome="disconnected", note="the client stopped before audio-stop")

    def _info(self) -> Info:
        model, languages = self._service.describe_model()
        return Info(
            asr=[
                AsrProgram(
                    name="whisper-gpu",
                    description="Whisper speech-to-text on faster-whisper (NVIDIA GPU or CPU)",
                    attribution=ATTRIBUTION,
                    installed=True,
                    version=__version__,
                    models=[
                        AsrModel(
                            name=model,
                            description=f"Whisper {model}",
                            attribution=ATTRIBUTION,
                            installed=True,
                            languages=languages,
                            version=None,
                        )
                    ],
                    supports_transcript_streaming=False,
                    requires_external_vad=True,
                )
            ]
        )

    def _log(  # noqa: PLR0913 - one line carries every field the operator asked for
        self,
        audio_seconds: float,
        processing_seconds: float,
        *,
        model: str,
        outcome: str,
        note: str = "",
        text: str | None = None,
    ) -> None:
        rtf = processing_seconds / audio_seconds if audio_seconds else 0.0
        line = "request from %s: %.2f s audio, %d ms, RTF %.2f, model %s, outcome %s"
        args: list[Any] = [self.peer, audio_seconds, round(processing_seconds * 1000), rtf, model, outcome]
        if note:
            line += " (%s)"
            args.append(note)
        if text is not None and self._service.log_transcripts():
            line += ": %r"
            args.append(text)
        _LOGGER.info(line, *args)

    async def _send_error(self, code: str, message: str) -> None:
        await self._write(Error(text=message, code=code).event())

    async def _write(self, event: Event) -> None:
        try:
            await async_write_event(event, self._writer)
        except (ConnectionError, RuntimeError):
            _LOGGER.debug("Could not write %s to %s: the client is gone", event.type, self.peer)
