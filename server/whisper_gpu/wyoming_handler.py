"""The Wyoming protocol: one handler per connection, protocol only; the service does the rest.

Events are read with hard size limits (the `wyoming` library reads whatever a header claims), and every bad
input gets an `error` event with a code while the client can still read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.ping import Ping, Pong

from . import __version__
from .audio import AudioBuffer, AudioFormatError, PcmFormat
from .engine import TranscriptResult
from .errors import CodedError
from .inference import Urgency
from .live import LiveRequest, LiveSettings
from .service import RequestError

_LOGGER = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_DATA_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
# Names a request may carry (transcript_names, then transcript_terms); more are dropped, as are longer names. Only
# the first few dozen fit Whisper's prompt anyway.
MAX_NAMES = 500
MAX_NAME_CHARS = 100
LINGER_S = 1.0
_LEFT_WAITING = "the client left while its request waited for the model"
ATTRIBUTION = Attribution(name="OpenAI Whisper on faster-whisper", url="https://github.com/SYSTRAN/faster-whisper")


class ProtocolError(CodedError):
    """Input that breaks the framing; the connection cannot continue after it."""


class TranscriptionService(Protocol):
    """What the handler needs from the service."""

    def check_language(self, language: str | None) -> str | None:
        """Raise RequestError when the language cannot be served."""

    async def transcribe(
        self,
        audio: np.ndarray,
        language: str | None,
        *,
        urgency: Urgency | None = None,
        names: tuple[str, ...] = (),
    ) -> tuple[TranscriptResult, str]:
        """Transcribe 16 kHz mono audio, biased toward the names; the result and the model's name."""

    def promote(self, urgency: Urgency) -> None:
        """Raise background work to final (RequestError when the queue is full)."""

    def live_settings(self) -> LiveSettings:
        """End-of-command detection and partial transcripts for new requests."""

    def describe_model(self) -> tuple[str, list[str]]:
        """Model name and languages for `describe`."""

    def max_audio_seconds(self) -> float:
        """Audio per request before buffering stops."""

    def log_transcripts(self) -> bool:
        """Whether transcript text may be logged."""

    def record(
        self, outcome: str, audio_seconds: float, processing_seconds: float, result: TranscriptResult | None = None
    ) -> Any:
        """Count a finished request (with its result when it was answered)."""

    def protocol_error(self, code: str) -> None:
        """Count bad input."""

    def request_coming(self) -> None:
        """A request has begun: get the model ready while its audio arrives (returns at once)."""


async def read_event(reader: asyncio.StreamReader, read_timeout_s: float | None = None) -> Event | None:
    """Read one event; None at a clean or mid-event end of stream; ProtocolError for malformed input."""
    line = await read_header_line(reader)
    return await read_event_body(reader, line, read_timeout_s) if line is not None else None


async def read_header_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next header line; None at the end of the stream (cancelling loses nothing: bytes stay buffered)."""
    try:
        line = await reader.readline()
    except ValueError as err:  # the stream's limit: a header line longer than MAX_HEADER_BYTES
        raise ProtocolError("header_too_large", f"event header longer than {MAX_HEADER_BYTES} bytes") from err
    return line if line.endswith(b"\n") else None


async def read_event_body(reader: asyncio.StreamReader, line: bytes, read_timeout_s: float | None) -> Event | None:
    """Parse a header line and read the data and payload it announces, which must come within the read timeout."""
    header = _parse_json(line, "event header")
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("malformed_event", "event header must be a JSON object with a string 'type'")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise ProtocolError("malformed_event", "event 'data' must be a JSON object")
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    try:
        async with asyncio.timeout(read_timeout_s):
            extra = await reader.readexactly(data_length) if data_length else None
            payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    except TimeoutError as err:
        raise ProtocolError(
            "read_timeout", f"the event's data and payload did not arrive within {read_timeout_s:g} s"
        ) from err
    if extra is not None:
        extra_data = _parse_json(extra, "event data")
        if not isinstance(extra_data, dict):
            raise ProtocolError("malformed_event", "event data must be a JSON object")
        data.update(extra_data)
    return Event(type=header["type"], data=data, payload=payload)


def _parse_json(raw: bytes, what: str) -> Any:
    """JSON, or ProtocolError: also for nesting too deep for the parser and integers with too many digits."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        message = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:200]
        raise ProtocolError("malformed_event", f"{what} is not acceptable JSON: {message}") from err


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError("malformed_event", f"{key} must be a non-negative integer")
    if value > limit:
        code = "payload_too_large" if key == "payload_length" else "data_too_large"
        raise ProtocolError(code, f"{key} {value} exceeds the limit of {limit} bytes")
    return value


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Before closing after an error: end our side, then drop what the client still sends, for a moment.

    Closing a socket with unread input resets the connection, and a reset can destroy the error event before the
    client has read it.
    """
    with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError, OSError):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(64 * 1024):
                pass


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may keep the server waiting."""

    idle_timeout_s: float
    read_timeout_s: float


class _ClientGoneError(Exception):
    """The client stopped taking what the server sends."""


@dataclass
class _Request:
    """One transcription: language, audio collected so far, and where it stands.

    `refused`: the request was refused (its language); its audio is dropped until the next request.
    `stream_refused`: the audio stream was refused (its format); a corrected `audio-start` retries.
    `submitted`: its audio went to the model; later audio of the same stream is dropped.
    `live`: follows the audio as it arrives (end of speech, partial transcripts) when the settings ask for it.
    `stream_started`: partial text went to the client (transcript-start, transcript-chunk...), so the final transcript
    is followed by transcript-stop; a request answered before any partial gets the transcript alone.
    """

    language: str | None
    names: tuple[str, ...] = ()
    audio: AudioBuffer | None = None
    refused: bool = False
    stream_refused: bool = False
    submitted: bool = False
    live: LiveRequest | None = None
    stream_started: bool = False

    @property
    def collecting(self) -> bool:
        """Audio is arriving for it."""
        return self.audio is not None and not (self.refused or self.stream_refused or self.submitted)


class WyomingHandler:
    """Serves one Wyoming connection: describe, and transcribe with streamed audio.

    The connection is read all the time, also while a request waits for the model: a client that leaves is
    noticed at once and its queued work is dropped, and `describe` or `ping` are answered meanwhile.
    """

    def __init__(
        self,
        service: TranscriptionService,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limits: ConnectionLimits,
    ) -> None:
        self._service = service
        self._reader = reader
        self._writer = writer
        self._limits = limits
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "client")
        self._request: _Request | None = None
        self._answer: asyncio.Task[None] | None = None
        self._idle: asyncio.Timeout | None = None
        self._write_lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        """A request is between audio-start and its answer."""
        return (self._request is not None and self._request.collecting) or self._answering

    @property
    def _answering(self) -> bool:
        return self._answer is not None and not self._answer.done()

    async def run(self) -> None:
        """Handle events until the client leaves, breaks the framing or times out."""
        try:
            try:
                while (event := await self._next_event()) is not None:
                    await self._handle(event)
            except ProtocolError as err:
                _LOGGER.warning("Closing connection from %s: %s", self.peer, err.message)
                self._service.protocol_error(err.code)
                await self._send_error(err.code, err.message)
                await linger(self._reader, self._writer)
        except (ConnectionError, asyncio.IncompleteReadError, _ClientGoneError):
            pass
        finally:
            self._abandon("the client stopped before audio-stop")
            await self._drop_answer()
            self._writer.close()

    async def _next_event(self) -> Event | None:
        """The next event; the idle timer runs only while the server owes the client nothing."""
        try:
            async with asyncio.timeout(None) as idle:
                self._idle = idle
                self._rearm_idle()
                line = await read_header_line(self._reader)
        except TimeoutError as err:
            waited = self._limits.idle_timeout_s
            raise ProtocolError("idle_timeout", f"no event for {waited:g} s; closing the connection") from err
        finally:
            self._idle = None
        if line is None:
            return None
        return await read_event_body(self._reader, line, self._limits.read_timeout_s)

    def _rearm_idle(self) -> None:
        if self._idle is not None:
            when = None if self._answering else asyncio.get_running_loop().time() + self._limits.idle_timeout_s
            self._idle.reschedule(when)

    async def _handle(self, event: Event) -> None:
        if Describe.is_type(event.type):
            await self._write(self._info().event())
        elif Ping.is_type(event.type):
            await self._write(Pong(text=Ping.from_event(event).text).event())
        elif Transcribe.is_type(event.type):
            self._service.request_coming()
            await self._on_transcribe(event)
        elif AudioStart.is_type(event.type):
            self._service.request_coming()
            await self._on_audio_start(event)
        elif AudioChunk.is_type(event.type):
            await self._on_audio_chunk(event)
        elif AudioStop.is_type(event.type):
            await self._on_audio_stop()
        else:
            _LOGGER.debug("Ignoring %s event from %s", event.type, self.peer)

    async def _on_transcribe(self, event: Event) -> None:
        self._abandon("a new request replaced it before audio-stop")
        language = event.data.get("language")
        self._request = _Request(
            language=language if isinstance(language, str) and language else None, names=self._names(event.data)
        )
        try:
            self._service.check_language(self._request.language)
        except RequestError as err:
            await self._refuse(err.code, err.message)

    async def _on_audio_start(self, event: Event) -> None:
        request = self._request
        if request is None or request.submitted or request.collecting:
            # Audio without `transcribe` (default language), or a new stream in place of one left unfinished.
            self._abandon("a new audio-start replaced it before audio-stop")
            request = self._request = _Request(language=None)
        elif request.refused:
            return
        # A stream whose format was refused may be retried with a corrected audio-start.
        request.stream_refused = False
        try:
            pcm = PcmFormat.from_event_data(event.data)
            request.audio = AudioBuffer(pcm, self._service.max_audio_seconds())
        except AudioFormatError as err:
            request.audio = None
            await self._refuse_stream(f"audio-start: {err}")
            return
        live = self._service.live_settings()
        if live.active:
            request.live = LiveRequest(
                self._service,
                request.language,
                live,
                names=request.names,
                audio_so_far=request.audio.so_far,
                on_partial=lambda text: self._send_partial(request, text),
            )

    async def _on_audio_chunk(self, event: Event) -> None:
        request = self._request
        if request is None or (request.audio is None and not (request.refused or request.stream_refused)):
            self._service.protocol_error("audio_chunk_without_start")
            await self._send_error("audio_chunk_without_start", "audio-chunk before audio-start; chunk dropped")
            return
        if not request.collecting:
            return  # the rest of a refused or already answered stream
        assert request.audio is not None  # noqa: S101 - collecting means it has audio
        chunk_format = PcmFormat.from_event_data(event.data)
        if chunk_format != request.audio.format:
            await self._refuse_stream(f"audio-chunk format {chunk_format} differs from audio-start")
            return
        payload = event.payload or b""
        try:
            if request.audio.is_heavy(len(payload)):
                await asyncio.to_thread(request.audio.append, payload)
            else:
                request.audio.append(payload)
        except AudioFormatError as err:
            await self._refuse_stream(f"audio-chunk: {err}")
            return
        ended = request.live is not None and request.live.hear(request.audio.take_new())
        if ended or request.audio.full:
            await self._submit(request)

    async def _on_audio_stop(self) -> None:
        request = self._request
        if request is None or (request.audio is None and not (request.refused or request.stream_refused)):
            self._service.protocol_error("audio_stop_without_start")
            await self._send_error("audio_stop_without_start", "audio-stop without audio-start")
            return
        self._request = None
        if request.collecting:
            await self._submit(request)

    async def _submit(self, request: _Request) -> None:
        """Hand the audio to the model; the answer is written when it comes while the connection is still read.

        A client that sends a second request before the first is answered is read no further until it is.
        """
        request.submitted = True
        if self._answer is not None:
            await asyncio.shield(self._answer)
        self._answer = asyncio.create_task(self._transcribe(request))
        self._answer.add_done_callback(lambda _: self._rearm_idle())

    async def _transcribe(self, request: _Request) -> None:
        """Transcribe and answer; cancelled when the client leaves, which drops the job if it has not started."""
        audio_buffer = request.audio
        assert audio_buffer is not None  # noqa: S101 - only collecting requests are submitted
        audio = audio_buffer.finish()
        seconds = len(audio) / 16_000
        started = time.monotonic()
        model = "-"
        try:
            if request.live is not None:
                result, model = await request.live.final(audio)
            else:
                result, model = await self._service.transcribe(audio, request.language, names=request.names)
        except asyncio.CancelledError:
            if request.live is not None:
                request.live.close()
            self._service.record("disconnected", seconds, time.monotonic() - started)
            self._log(seconds, time.monotonic() - started, model=model, outcome="disconnected", note=_LEFT_WAITING)
            raise
        except RequestError as err:
            outcome = "busy" if err.code == "server_busy" else "not_ready"
            self._log(seconds, time.monotonic() - started, model=model, outcome=outcome, note=err.message)
            self._service.record(outcome, seconds, time.monotonic() - started)
            await self._send_error(err.code, err.message)
            return
        except Exception:
            _LOGGER.exception("Transcription failed for %s", self.peer)
            self._service.record("error", seconds, time.monotonic() - started)
            await self._send_error("transcription_failed", "The server failed to transcribe the audio")
            return
        elapsed = time.monotonic() - started
        outcome = "truncated" if audio_buffer.truncated else ("ok" if result.text else "no_speech")
        self._service.record(outcome, seconds, elapsed, result)
        note = f"stopped at the {self._service.max_audio_seconds():g} s limit" if audio_buffer.truncated else ""
        self._log(seconds, elapsed, model=model, outcome=outcome, note=note, text=result.text)
        await self._write(Transcript(text=result.text, language=result.language).event())
        if request.stream_started:
            await self._write(TranscriptStop().event())

    async def _send_partial(self, request: _Request, text: str) -> None:
        """The text so far, while the audio still arrives (streaming clients show it; others skip it)."""
        if not request.collecting:
            return
        if not request.stream_started:
            request.stream_started = True
            await self._write(TranscriptStart(language=request.language).event())
        await self._write(TranscriptChunk(text=text).event())

    def _names(self, data: dict[str, Any]) -> tuple[str, ...]:
        """The names and terms of a `transcribe` event, names first, as far as they are usable.

        They are a hint: a field of the wrong type is ignored (logged and counted as `invalid_names`) and the
        request goes on without it, rather than losing the user's command over it.
        """
        given: list[str] = []
        for key in ("transcript_names", "transcript_terms"):
            value = data.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                _LOGGER.warning("Ignoring %s from %s: not a list of strings", key, self.peer)
                self._service.protocol_error("invalid_names")
                continue
            given += value
        names = [name for name in (" ".join(item.split()) for item in given) if 0 < len(name) <= MAX_NAME_CHARS]
        if len(names) < len(given) or len(names) > MAX_NAMES:
            _LOGGER.debug(
                "Using %d of the %d names from %s: the rest are empty, longer than %d characters or too many",
                min(len(names), MAX_NAMES),
                len(given),
                self.peer,
                MAX_NAME_CHARS,
            )
        return tuple(names[:MAX_NAMES])

    async def _refuse(self, code: str, message: str) -> None:
        """Refuse the current request: tell the client now, drop its audio until the next request."""
        assert self._request is not None  # noqa: S101
        self._request.refused = True
        self._service.record("invalid", 0.0, 0.0)
        self._log(0.0, 0.0, model="-", outcome="invalid", note=message)
        await self._send_error(code, message)

    async def _refuse_stream(self, message: str) -> None:
        """Refuse the current audio stream: its audio is dropped; a corrected audio-start may follow."""
        assert self._request is not None  # noqa: S101
        self._request.stream_refused = True
        if self._request.live is not None:
            self._request.live.close()
            self._request.live = None
        self._service.record("invalid", 0.0, 0.0)
        self._log(0.0, 0.0, model="-", outcome="invalid", note=message)
        await self._send_error("invalid_audio_format", message)

    def _abandon(self, why: str) -> None:
        """A request that never reached audio-stop: count it once, as the client going away."""
        request, self._request = self._request, None
        if request is not None and request.live is not None and not request.submitted:
            request.live.close()
        if request is not None and request.collecting:
            assert request.audio is not None  # noqa: S101
            seconds = request.audio.seconds
            self._service.record("disconnected", seconds, 0.0)
            self._log(seconds, 0.0, model="-", outcome="disconnected", note=why)

    async def _drop_answer(self) -> None:
        """The client is gone: cancel the transcription it waits for (counted as disconnected)."""
        if self._answer is not None and not self._answer.done():
            self._answer.cancel()
        if self._answer is not None:
            await asyncio.gather(self._answer, return_exceptions=True)

    def _info(self) -> Info:
        model, languages = self._service.describe_model()
        live = self._service.live_settings()
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
                    supports_transcript_streaming=live.partial_interval_s > 0,
                    requires_external_vad=live.endpoint is None,
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
        """Write one event; a client that takes nothing within the idle timeout is cut off."""
        try:
            async with self._write_lock, asyncio.timeout(self._limits.idle_timeout_s):
                await async_write_event(event, self._writer)
        except TimeoutError as err:
            _LOGGER.info(
                "Closing connection from %s: it took no event for %g s", self.peer, self._limits.idle_timeout_s
            )
            self._service.protocol_error("idle_timeout")
            self._writer.transport.abort()
            raise _ClientGoneError from err
        except (ConnectionError, RuntimeError):
            _LOGGER.debug("Could not write %s to %s: the client is gone", event.type, self.peer)
