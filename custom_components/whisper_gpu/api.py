"""Client for a whisper-gpu server: its HTTP control API and its Wyoming port."""

import asyncio
import ssl
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from contextlib import aclosing, suppress
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import AsrProgram, Describe, Info
from yarl import URL

from .const import LOGGER, SAMPLE_CHANNELS, SAMPLE_RATE, SAMPLE_WIDTH

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)
# Opening the Wyoming connection; the transcription itself may take longer (RESULT_TIMEOUT).
CONNECT_TIMEOUT = 10.0
DESCRIBE_TIMEOUT = 10.0
# How long the server may take for the transcript once the audio has ended.
RESULT_TIMEOUT = 60.0
# Whether the control port speaks TLS: the handshake of the probe.
TLS_PROBE_TIMEOUT = 5.0
# A park waits for the transcriptions in flight and queued to finish first.
PARK_TIMEOUT = aiohttp.ClientTimeout(total=RESULT_TIMEOUT)


class WhisperGpuError(Exception):
    """Base class for errors talking to a whisper-gpu server."""


class WhisperGpuConnectionError(WhisperGpuError):
    """The server cannot be reached, or the connection broke."""


class WhisperGpuCertificateError(WhisperGpuConnectionError):
    """The control port's certificate is not trusted (or the CA given is no PEM certificate)."""


class WhisperGpuInvalidCaError(WhisperGpuCertificateError):
    """The CA given to verify the control port with is no PEM certificate."""


class WhisperGpuAuthError(WhisperGpuError):
    """The server rejected the control token."""


class WhisperGpuResponseError(WhisperGpuError):
    """The server answered something a whisper-gpu server does not answer."""


class WhisperGpuSettingsError(WhisperGpuError):
    """The server refused a settings change."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        """Keep the server's error codes, keyed by setting name or "base"."""
        super().__init__(", ".join(f"{key}: {code}" for key, code in errors.items()))
        self.errors = dict(errors)


class WhisperGpuTranscriptionError(WhisperGpuError):
    """The server answered a transcription with an error event."""

    def __init__(self, text: str, code: str | None) -> None:
        """Keep the server's error text and code."""
        super().__init__(f"{text} ({code})" if code else text)
        self.code = code


@dataclass(frozen=True, slots=True)
class TranscriptUpdate:
    """Text from the server for one request: the text so far while audio arrives, then the final transcript."""

    text: str
    final: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """A model the server knows (from GET /api/v1/info)."""

    name: str
    usable: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerInfo:
    """What GET /api/v1/info says about the server."""

    server_id: str
    name: str
    version: str
    device_name: str | None
    compute_types: list[str]
    models: list[ModelInfo]
    languages: list[str]
    settings_schema: dict[str, dict[str, Any]]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any) -> ServerInfo:
        """Parse the answer; raise WhisperGpuResponseError if it is not one."""
        try:
            return cls(
                server_id=_str(data["server_id"]),
                name=_str(data["name"]),
                version=_str(data["version"]),
                device_name=data.get("device", {}).get("name"),
                compute_types=[_str(item) for item in data["compute_types"]],
                models=[
                    ModelInfo(
                        name=_str(model["name"]),
                        usable=bool(model.get("usable", True)),
                    )
                    for model in data["models"]
                ],
                languages=[_str(item) for item in data["languages"]],
                settings_schema=dict(data["settings"]),
                raw=data,
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise WhisperGpuResponseError(f"Not the info of a whisper-gpu server: {err!r}") from err

    @property
    def usable_models(self) -> list[str]:
        """Names of the models that fit this server's device."""
        return [model.name for model in self.models if model.usable]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadFailure:
    """The last model load that failed (`last_failure` in the status); kept until a load succeeds."""

    code: str
    message: str
    model: str
    time: str

    @classmethod
    def from_json(cls, data: Any) -> LoadFailure | None:
        """Parse `last_failure` (null when the last load worked)."""
        if data is None:
            return None
        return cls(
            code=_str(data["code"]),
            message=_str(data["message"]),
            model=_str(data["model"]),
            time=_str(data["time"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerStatus:
    """What GET /api/v1/status says about the model and the requests."""

    state: str
    model: str | None
    target: str | None
    error_code: str | None
    error_message: str | None
    last_failure: LoadFailure | None
    last_request_ms: float | None
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any) -> ServerStatus:
        """Parse the answer; raise WhisperGpuResponseError if it is not one."""
        try:
            error = data.get("error") or {}
            last_request = data.get("last_request") or {}
            return cls(
                state=_str(data["state"]),
                model=_model_name(data["model"]),
                target=_model_name(data.get("target")),
                error_code=error.get("code"),
                error_message=error.get("message"),
                last_failure=LoadFailure.from_json(data.get("last_failure")),
                last_request_ms=last_request.get("duration_ms"),
                raw=data,
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise WhisperGpuResponseError(f"Not the status of a whisper-gpu server: {err!r}") from err


def _model_name(value: Any) -> str | None:
    """Return the name of a model in the status: {"name": ...}, or null."""
    return _str(value["name"]) if value is not None else None


def _str(value: Any) -> str:
    """Return value if it is a string, else raise TypeError."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


class WhisperGpuClient:
    """Talks to one whisper-gpu server."""

    def __init__(  # noqa: PLR0913 - the connection settings of a config entry, each on its own
        self,
        session: aiohttp.ClientSession,
        host: str,
        *,
        wyoming_port: int,
        control_port: int,
        token: str,
        tls: bool = False,
        ca_pem: str | None = None,
        server_hostname: str | None = None,
    ) -> None:
        """Set up the client; nothing is sent yet.

        With tls the control API is spoken over HTTPS and the certificate is verified: against ca_pem (PEM
        text of the CA, or of a self-signed certificate) when given, else against the system's trust store.
        server_hostname is the name the certificate must carry when host is an address (a replica behind a
        headless Service); by default host itself.
        """
        self._session = session
        self.host = host
        self.wyoming_port = wyoming_port
        self._base_url = URL.build(scheme="https" if tls else "http", host=host, port=control_port)
        self._token = token
        self._tls = tls
        self._ca_pem = ca_pem
        self._server_hostname = server_hostname
        self._ssl_context: ssl.SSLContext | None = None

    def _verification(self) -> ssl.SSLContext | bool:
        """The `ssl` argument of each request: the given CA, else the session's default (system) verification."""
        if not (self._tls and self._ca_pem):
            return True
        if self._ssl_context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                # cadata only: parsing text in memory, no file access (Home Assistant allows it in the loop).
                context.load_verify_locations(cadata=self._ca_pem)
            except (ssl.SSLError, ValueError) as err:
                raise WhisperGpuInvalidCaError(f"The CA certificate is no PEM certificate: {err}") from err
            self._ssl_context = context
        return self._ssl_context

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        auth: bool = False,
        time_limit: aiohttp.ClientTimeout = REQUEST_TIMEOUT,
    ) -> tuple[int, Any]:
        """Send one request; return the status and the JSON body (None if none)."""
        headers = {"Authorization": f"Bearer {self._token}"} if auth else {}
        verification = self._verification()
        try:
            async with self._session.request(
                method,
                self._base_url.with_path(path),
                json=json,
                headers=headers,
                timeout=time_limit,
                ssl=verification,
                server_hostname=self._server_hostname if self._tls else None,
            ) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                return response.status, body
        except aiohttp.ClientConnectorCertificateError as err:
            raise WhisperGpuCertificateError(f"{method} {path} failed: {_describe_error(err)}") from err
        except (aiohttp.ClientError, TimeoutError) as err:
            raise WhisperGpuConnectionError(f"{method} {path} failed: {_describe_error(err)}") from err

    async def async_probe_tls(self) -> bool | None:
        """Whether the control port speaks TLS: True, False (it accepts connections but not TLS), None (it refuses).

        For a clear error when HTTPS is asked of a plain HTTP port, or plain HTTP of an HTTPS port. The probe only
        shakes hands, without verifying the certificate, and sends nothing.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        port = self._base_url.port
        try:
            async with asyncio.timeout(TLS_PROBE_TIMEOUT):
                _, writer = await asyncio.open_connection(self.host, port)
        except OSError, TimeoutError:
            return None
        try:
            async with asyncio.timeout(TLS_PROBE_TIMEOUT):
                await writer.start_tls(context, server_hostname=self._server_hostname or None)
        except OSError, TimeoutError, ssl.SSLError, EOFError:
            return False
        finally:
            writer.close()
            with suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        return True

    async def async_get_info(self) -> ServerInfo:
        """Read the server's id, models, languages and settings schema."""
        status, body = await self._request("GET", "/api/v1/info")
        if status != HTTPStatus.OK:
            raise WhisperGpuResponseError(f"GET /api/v1/info answered {status}")
        return ServerInfo.from_json(body)

    async def async_get_status(self) -> ServerStatus:
        """Read the model state and the last request."""
        status, body = await self._request("GET", "/api/v1/status")
        if status != HTTPStatus.OK:
            raise WhisperGpuResponseError(f"GET /api/v1/status answered {status}")
        return ServerStatus.from_json(body)

    async def async_get_settings(self) -> dict[str, Any]:
        """Read the runtime settings, keyed by name."""
        status, body = await self._request("GET", "/api/v1/settings")
        if status != HTTPStatus.OK or not isinstance(body, dict):
            raise WhisperGpuResponseError(f"GET /api/v1/settings answered {status}")
        settings = body.get("settings")
        if not isinstance(settings, dict):
            raise WhisperGpuResponseError("GET /api/v1/settings has no settings")
        return settings

    async def async_check_auth(self) -> None:
        """Raise WhisperGpuAuthError unless the server accepts the token."""
        status, _ = await self._request("GET", "/api/v1/auth", auth=True)
        if status == HTTPStatus.UNAUTHORIZED:
            raise WhisperGpuAuthError("The server rejected the token")
        if status != HTTPStatus.NO_CONTENT:
            raise WhisperGpuResponseError(f"GET /api/v1/auth answered {status}")

    async def async_update_settings(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change settings; return all settings as the server now has them."""
        status, body = await self._request("PATCH", "/api/v1/settings", json=changes, auth=True)
        if status == HTTPStatus.OK and isinstance(body, dict):
            return dict(body.get("settings") or {})
        if status == HTTPStatus.UNAUTHORIZED:
            raise WhisperGpuAuthError("The server rejected the token")
        if status == HTTPStatus.BAD_REQUEST and isinstance(body, dict):
            LOGGER.debug("PATCH %s refused: %s", dict(changes), body)
            raise WhisperGpuSettingsError(body.get("errors") or {"base": "unknown"})
        code = body.get("error") if isinstance(body, dict) else None
        if status in (HTTPStatus.CONFLICT, HTTPStatus.REQUEST_ENTITY_TOO_LARGE) or (
            # The server could not save the change (disk full or read-only) and so changed nothing.
            status in (HTTPStatus.INSUFFICIENT_STORAGE, HTTPStatus.INTERNAL_SERVER_ERROR) and code == "save_failed"
        ):
            raise WhisperGpuSettingsError({"base": code or "unknown"})
        raise WhisperGpuResponseError(f"PATCH /api/v1/settings answered {status}")

    async def async_park(self) -> None:
        """Ask the server to free its model's memory now; it answers once the model is parked.

        Raises WhisperGpuSettingsError with the server's code ("base") when it refuses (a model is loading).
        """
        status, body = await self._request("POST", "/api/v1/model/park", auth=True, time_limit=PARK_TIMEOUT)
        if status == HTTPStatus.OK:
            return
        if status == HTTPStatus.UNAUTHORIZED:
            raise WhisperGpuAuthError("The server rejected the token")
        if status == HTTPStatus.CONFLICT and isinstance(body, dict):
            raise WhisperGpuSettingsError({"base": str(body.get("error") or "unknown")})
        raise WhisperGpuResponseError(f"POST /api/v1/model/park answered {status}")

    async def async_describe(self) -> AsrProgram:
        """Ask the Wyoming port what speech-to-text program it serves."""
        try:
            async with (
                asyncio.timeout(DESCRIBE_TIMEOUT),
                AsyncTcpClient(self.host, self.wyoming_port) as client,
            ):
                await client.write_event(Describe().event())
                while (event := await client.read_event()) is not None:
                    if Info.is_type(event.type):
                        info = Info.from_event(event)
                        if not info.asr:
                            raise WhisperGpuResponseError("The server has no asr")
                        return info.asr[0]
        except (OSError, EOFError, TimeoutError) as err:
            raise WhisperGpuConnectionError(f"Wyoming describe failed: {_describe_error(err)}") from err
        raise WhisperGpuConnectionError("The Wyoming connection closed")

    async def async_transcribe_updates(
        self, audio: AsyncIterable[bytes], language: str | None, names: list[str] | None = None
    ) -> AsyncGenerator[TranscriptUpdate]:
        """Stream 16 kHz 16-bit mono audio to the server; yield its text so far, then the final transcript.

        `names` (of the home) go in the request's `transcript_names`, for the server to spell them right.

        The upload and the read run at the same time: partial text arrives while the audio still flows, the
        final transcript may come before the audio ends (the server heard the end of the command), and an error
        that the server sends early (an unsupported language, no model) stops the upload at once. The upload
        stops, and the connection closes, when the final transcript has been yielded.
        """
        client = AsyncTcpClient(self.host, self.wyoming_port)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await client.connect()
            try:
                async with aclosing(_async_stream_and_receive(client, audio, language, names)) as updates:
                    async for update in updates:
                        yield update
                        if update.final:
                            return
            finally:
                await client.disconnect()
        except (OSError, EOFError, TimeoutError) as err:
            # EOFError covers asyncio.IncompleteReadError: the server hung up in the middle of an event.
            raise WhisperGpuConnectionError(f"Transcription failed: {_describe_error(err)}") from err


async def _async_stream_and_receive(
    client: AsyncTcpClient, audio: AsyncIterable[bytes], language: str | None, names: list[str] | None
) -> AsyncGenerator[TranscriptUpdate]:
    """Send the request and its audio while reading the answer; yield partial text, then the transcript."""
    await client.write_event(Transcribe(language=language, transcript_names=names or None).event())
    await client.write_event(AudioStart(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=SAMPLE_CHANNELS).event())
    upload = asyncio.create_task(_async_upload(client, audio))
    try:
        while True:
            event = await _async_next_event(client, upload)
            if Transcript.is_type(event.type):
                yield TranscriptUpdate(Transcript.from_event(event).text, final=True)
                return
            if TranscriptChunk.is_type(event.type):
                yield TranscriptUpdate(TranscriptChunk.from_event(event).text, final=False)
            elif Error.is_type(event.type):
                error = Error.from_event(event)
                raise WhisperGpuTranscriptionError(error.text, error.code)
    finally:
        upload.cancel()
        await asyncio.gather(upload, return_exceptions=True)


async def _async_next_event(client: AsyncTcpClient, upload: asyncio.Task[None]) -> Event:
    """The server's next event. A failed upload ends the wait; once all audio is sent, it may take RESULT_TIMEOUT."""
    read = asyncio.create_task(client.read_event())
    try:
        if not upload.done():
            await asyncio.wait((upload, read), return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                upload.result()  # the upload's error, if it failed
        async with asyncio.timeout(RESULT_TIMEOUT):
            event = await read
    finally:
        read.cancel()
    if event is None:
        raise WhisperGpuConnectionError("The server closed the connection")
    return event


def _describe_error(err: BaseException) -> str:
    """Name an error without its request: aiohttp's repr includes the headers, and so the control token."""
    if isinstance(err, aiohttp.ClientResponseError):
        return f"{type(err).__name__} (HTTP {err.status})"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


async def _async_upload(client: AsyncTcpClient, audio: AsyncIterable[bytes]) -> None:
    """Send the audio as it arrives, then audio-stop."""
    iterator = aiter(audio)
    try:
        async for chunk in iterator:
            await client.write_event(
                AudioChunk(
                    rate=SAMPLE_RATE,
                    width=SAMPLE_WIDTH,
                    channels=SAMPLE_CHANNELS,
                    audio=chunk,
                ).event()
            )
        await client.write_event(AudioStop().event())
    finally:
        if isinstance(iterator, AsyncGenerator):
            await iterator.aclose()
