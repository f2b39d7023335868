"""Helpers of the integration tests: server processes, stub servers, audio, setup."""

import asyncio
import re
import signal
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Self

import pytest
from aiohttp import web
from helpers import api_fixtures
from helpers.server import ServerProcess, free_port
from homeassistant.components import stt
from homeassistant.components.assist_pipeline import (
    Pipeline,
    PipelineEvent,
    PipelineEventType,
    PipelineStage,
    async_pipeline_from_audio_stream,
)
from homeassistant.components.assist_pipeline.pipeline import async_create_default_pipeline
from homeassistant.const import CONF_HOST, CONF_TOKEN
from homeassistant.core import Context, HomeAssistant
from homeassistant.setup import async_setup_component
from homeassistant.util import dt as dt_util
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed
from wyoming.asr import Transcript, TranscriptStart
from wyoming.audio import AudioStop
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.ping import Ping

from custom_components.whisper_gpu.api import TranscriptUpdate
from custom_components.whisper_gpu.const import (
    CONF_CA_PEM,
    CONF_CONTROL_PORT,
    CONF_TLS,
    CONF_WYOMING_PORT,
    SCAN_INTERVAL,
)

HOST = "127.0.0.1"
TEST_MODEL = "tiny.en"
SECOND_MODEL = "base"
UTTERANCE = "turn on the kitchen light"
STARTUP_TIMEOUT = 180.0
# The options form as a user sees it: each section's fields, in order.
OPTIONS_FORM: dict[str, tuple[str, ...]] = {
    "model_settings": ("model", "compute_type", "keep_alive_s"),
    "decoding": ("detect_language", "language", "beam_size"),
    "voice_activity_detection": (
        "endpointing",
        "end_of_speech_s",
        "vad_threshold",
        "min_speech_duration_ms",
        "max_speech_duration_s",
        "speech_pad_ms",
    ),
    "assist": ("send_names",),
}
FORM_FIELDS = tuple(name for names in OPTIONS_FORM.values() for name in names)
# The integration's own options, with their defaults; the other fields are the server's settings.
LOCAL_OPTIONS = {"send_names": True}
# The connection of the fast layer's entry: never contacted, the patched client answers.
FIXTURE_ENTRY_DATA = {
    CONF_HOST: "whisper-gpu.local",
    CONF_WYOMING_PORT: api_fixtures.WYOMING_PORT,
    CONF_CONTROL_PORT: api_fixtures.CONTROL_PORT,
    CONF_TOKEN: "fixture-token",
    CONF_TLS: False,
    CONF_CA_PEM: "",
}
# The form's switch for the language setting's `auto`: not a setting of its own.
DETECT_LANGUAGE = "detect_language"
OPTION_NAMES = tuple(name for name in FORM_FIELDS if name not in LOCAL_OPTIONS and name != DETECT_LANGUAGE)
# Beside ServerProcess's defaults (loopback, offline, no zeroconf, the model): the fast compute type, and two CPU
# threads whatever the host has (the fixtures' memory estimates depend on them).
SERVER_ARGS = ("--compute-type", "int8", "--cpu-threads", "2")


@dataclass
class WhisperGpuServer(ServerProcess):
    """A real server on loopback (tiny.en, int8, offline, no zeroconf) as a config entry sees it."""

    model: str = TEST_MODEL
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    initial_settings: dict[str, Any] = field(default_factory=dict)

    def start(self, *extra_args: str, wait: bool = True) -> Self:
        """Start the server with extra command-line arguments; by default wait until it is ready."""
        assert self.process is None
        self.args = [*SERVER_ARGS, *extra_args]
        super().start(wait=wait)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the server; it may be started again afterwards."""
        code = super().stop(sig, timeout)
        self.process = None
        return code

    def request(self, method: str, path: str, body: object = None, *, token: str | None = None) -> tuple[int, Any]:
        """Send a request to the control API with this server's token unless another is given."""
        return super().request(method, path, body, token=token or self.token)

    def wait_state(self, state: str, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        """Wait until GET /api/v1/status has the given state and no reload runs."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            _, answer = self.request("GET", "/api/v1/status")
            status = answer if isinstance(answer, dict) else {}  # nothing answers while the server starts
            if status.get("state") == state and status.get("target") is None:
                return status
            time.sleep(0.1)
        pytest.fail(f"state {state!r} not reached: {status}")

    def settings(self) -> dict[str, Any]:
        """Return the server's runtime settings."""
        _, body = self.request("GET", "/api/v1/settings")
        return dict(body["settings"])

    @property
    def server_id(self) -> str:
        """Return the server's id."""
        _, body = self.request("GET", "/api/v1/info")
        return str(body["server_id"])

    def entry_data(self, **changes: Any) -> dict[str, Any]:
        """Return config entry data that points at this server (HTTPS when it has a certificate; no CA given)."""
        return {
            CONF_HOST: self.address,
            CONF_WYOMING_PORT: self.wyoming_port,
            CONF_CONTROL_PORT: self.control_port,
            CONF_TOKEN: self.token,
            CONF_TLS: self.tls is not None,
            CONF_CA_PEM: "",
            **changes,
        }


async def audio_stream(pcm: bytes, chunk_bytes: int = 2048) -> AsyncGenerator[bytes]:
    """Yield PCM in chunks, the way a voice satellite streams it."""
    for start in range(0, len(pcm), chunk_bytes):
        yield pcm[start : start + chunk_bytes]


@dataclass
class StubControlServer:
    """A small HTTP server on loopback that answers like (or unlike) whisper-gpu.

    It serves what the tests put in `routes` (status, JSON body) by method and
    path, changes them as `then` says once a request is answered, and records
    the requests it got.
    """

    routes: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    # Routes that change once a request has been answered: what the server does after a PATCH, say.
    then: dict[tuple[str, str], dict[tuple[str, str], tuple[int, Any]]] = field(default_factory=dict)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, body))
        if (request.method, request.path) not in self.routes:
            return web.Response(status=404, text="404: Not Found")
        status, payload = self.routes[request.method, request.path]
        self.routes.update(self.then.pop((request.method, request.path), {}))
        if payload is None:
            return web.Response(status=status)
        return web.json_response(payload, status=status)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, HOST, self.port).start()

    async def stop(self) -> None:
        """Stop listening."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def setup_integration(hass: HomeAssistant, entry: MockConfigEntry, **connection: Any) -> None:
    """Add the entry to hass, with other connection data if given (another server, a closed port), and set it up."""
    if hass.config_entries.async_get_entry(entry.entry_id) is None:
        entry.add_to_hass(hass)
    if connection:
        hass.config_entries.async_update_entry(entry, data={**entry.data, **connection})
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()


async def run_assist_pipeline(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    stt_entity_id: str,
    stream: AsyncGenerator[bytes],
    end_stage: PipelineStage,
) -> tuple[Pipeline, dict[PipelineEventType, PipelineEvent]]:
    """Set up Home Assistant's Assist pipeline with the entry's speech-to-text entity and run one command through it
    up to `end_stage`; the pipeline, and its events by type, none of them an error.
    """
    for component in ("homeassistant", "conversation", "assist_pipeline"):
        assert await async_setup_component(hass, component, {})
    await setup_integration(hass, entry)
    pipeline = await async_create_default_pipeline(
        hass, stt_engine_id=stt_entity_id, tts_engine_id=None, pipeline_name="whisper-gpu"
    )
    assert pipeline is not None
    events: list[PipelineEvent] = []
    await async_pipeline_from_audio_stream(
        hass,
        context=Context(),
        event_callback=events.append,
        stt_metadata=metadata(),
        stt_stream=stream,
        pipeline_id=pipeline.id,
        end_stage=end_stage,
    )
    by_type = {event.type: event for event in events}
    assert PipelineEventType.ERROR not in by_type, by_type.get(PipelineEventType.ERROR)
    return pipeline, by_type


async def poll(hass: HomeAssistant) -> None:
    """Let the coordinator's next poll run now."""
    async_fire_time_changed(hass, dt_util.utcnow() + SCAN_INTERVAL + timedelta(seconds=1))
    await hass.async_block_till_done(wait_background_tasks=True)


def mirror(stub: StubControlServer, server: WhisperGpuServer) -> None:
    """Make the stub answer the reads as the real server does."""
    for path in ("/api/v1/info", "/api/v1/settings", "/api/v1/status"):
        stub.routes["GET", path] = server.request("GET", path)
    stub.routes["GET", "/api/v1/auth"] = (204, None)


def transcript_updates(*items: TranscriptUpdate | Exception) -> Callable[..., AsyncGenerator[TranscriptUpdate]]:
    """A stand-in for the client's `async_transcribe_updates`: yields the updates, raises the exceptions, in order."""

    async def updates(*_: object) -> AsyncGenerator[TranscriptUpdate]:
        for item in items:
            if isinstance(item, Exception):
                raise item
            yield item

    return updates


def metadata(language: str = "en") -> stt.SpeechMetadata:
    """Return the metadata of the pipeline's audio."""
    return stt.SpeechMetadata(
        language=language,
        format=stt.AudioFormats.WAV,
        codec=stt.AudioCodecs.PCM,
        bit_rate=stt.AudioBitRates.BITRATE_16,
        sample_rate=stt.AudioSampleRates.SAMPLERATE_16000,
        channel=stt.AudioChannels.CHANNEL_MONO,
    )


def words(text: str | None) -> str:
    """Return text in lower case without punctuation."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", (text or "").lower()).split())


@dataclass
class StubWyomingServer:
    """A Wyoming server on loopback that records what the integration writes.

    `mode` picks its behaviour: "normal" answers describe with an asr program
    and audio-stop with a transcript (after a transcript-start); "no_asr",
    "ping_first" and "close_on_describe" vary the describe answer;
    "close_on_stop" hangs up instead of answering; "cut_on_describe" and
    "cut_on_stop" hang up in the middle of the answer's payload.
    """

    mode: str = "normal"
    events: list[Event] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (event := await async_read_event(reader)) is not None:
                self.events.append(event)
                if self.mode == f"cut_on_{event.type.replace('-', '_')}":
                    writer.write(b'{"type": "transcript", "payload_length": 100}\n' + bytes(10))
                    await writer.drain()
                    return
                if Describe.is_type(event.type):
                    if self.mode == "close_on_describe":
                        return
                    if self.mode == "ping_first":
                        await async_write_event(Ping(text="hello").event(), writer)
                    asr = [] if self.mode == "no_asr" else [STUB_ASR]
                    await async_write_event(Info(asr=asr).event(), writer)
                elif AudioStop.is_type(event.type):
                    if self.mode == "close_on_stop":
                        return
                    await async_write_event(TranscriptStart(language="en").event(), writer)
                    await async_write_event(Transcript(text="stub transcript").event(), writer)
        finally:
            writer.close()

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self.port = free_port()
        self.server = await asyncio.start_server(self._handle, HOST, self.port)

    async def stop(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


STUB_ASR = AsrProgram(
    name="stub",
    attribution=Attribution(name="tests", url="http://127.0.0.1/"),
    installed=True,
    description="A test double",
    version="0",
    models=[
        AsrModel(
            name="tiny.en",
            attribution=Attribution(name="tests", url="http://127.0.0.1/"),
            installed=True,
            description=None,
            version=None,
            languages=["en"],
        )
    ],
    requires_external_vad=True,
    prefers_auto_gain_enabled=False,
    prefers_noise_reduction_enabled=False,
)
