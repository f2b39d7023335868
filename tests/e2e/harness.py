"""A real Home Assistant (`hass` in a subprocess) with our integration, set up the way a new user sets it up.

`HomeAssistant` writes a configuration directory with `custom_components/whisper_gpu` linked in, starts
`python -m homeassistant` on a loopback port, completes onboarding through the HTTP API the frontend uses (owner
user, tokens, core config, analytics, integration step), adds integrations through the config-flow HTTP API, and
talks to the WebSocket API (`HomeAssistantWebSocket`), including Assist pipeline runs with audio streamed in real
time. Each step prints how long it took. Runs in the environment of scripts/ha-e2e-env (scripts/ha-e2e-run).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp
import numpy as np
from helpers.server import ServerProcess, free_port
from helpers.speech import Utterance, synthesize

CHECKOUT = Path(__file__).resolve().parents[2]
INTEGRATION_SOURCE = CHECKOUT / "custom_components" / "whisper_gpu"
HOST = "127.0.0.1"
OWNER_NAME = "Test Owner"
OWNER_USERNAME = "owner"
OWNER_PASSWORD = "owner-password-0123"  # noqa: S105 - a test credential
START_TIMEOUT_S = 180.0
RATE = 16_000
SAMPLE_WIDTH = 2
# What a satellite sends: 20 ms frames of 16 kHz 16-bit mono.
FRAME_BYTES = RATE * SAMPLE_WIDTH // 50
# Python with the server's dependencies (scripts/ha-e2e-env points at scripts/ha-env's venv); the e2e venv holds
# Home Assistant's own pins, which differ from the server's (av).
SERVER_PYTHON_ENV = "WHISPER_GPU_E2E_SERVER_PYTHON"
# Where espeak-ng's words begin and end: 16-bit samples louder than this.
LOUD = 300


@dataclass(frozen=True)
class SpokenCommand:
    """A command as a microphone hears it: a little noise, the words, then noise; where the words end."""

    text: str
    audio: bytes
    speech_end_s: float


def spoken_command(text: str, directory: Path, *, lead_s: float = 0.3, trailing_s: float = 3.0) -> SpokenCommand:
    """espeak-ng's words (its own silence cut off) between microphone-like noise, 16 kHz 16-bit mono."""
    samples = np.frombuffer(Utterance(text, synthesize(text, directory), clear=True).pcm()[0], dtype="<i2")
    loud = np.nonzero(np.abs(samples) > LOUD)[0]
    words = samples[loud[0] : loud[-1] + 1]
    rng = np.random.default_rng(len(text))

    def noise(seconds: float) -> np.ndarray:
        return rng.normal(0, 30, int(seconds * RATE)).astype("<i2")

    audio = np.concatenate((noise(lead_s), words, noise(trailing_s)))
    return SpokenCommand(text, audio.tobytes(), lead_s + len(words) / RATE)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Print how long a step took: the harness must stay fast enough for CI."""
    started = time.monotonic()
    try:
        yield
    finally:
        print(f"e2e: {name}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def server_python() -> str:
    """The Python that has the server's dependencies."""
    return os.environ.get(SERVER_PYTHON_ENV, sys.executable)


@functools.cache
def server_environment_names() -> frozenset[str]:
    """The bare environment names of the server's settings, asked of the server's own Python."""
    names = subprocess.run(
        [server_python(), "-c", "from whisper_gpu.settings import SETTINGS\nfor s in SETTINGS.values(): print(s.env)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return frozenset(names)


class E2EServer(ServerProcess):
    """Our server, run by the Python that has its dependencies (not Home Assistant's venv)."""

    def command(self) -> list[str]:
        """`python -m whisper_gpu serve …` with the server's Python."""
        command = super().command()
        return [server_python(), "-m", "whisper_gpu", *command[command.index("serve") :]]

    def start(self, *, wait: bool = True) -> Self:
        """Start it in an environment without whisper-gpu settings, and by default wait until it is ready."""
        bare = server_environment_names()
        env = {
            key: value for key, value in os.environ.items() if key not in bare and not key.startswith("WHISPER_GPU_")
        }
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1", **self.env}
            )
        if wait:
            self.wait_ready()
        return self


class HomeAssistantError(RuntimeError):
    """Home Assistant answered something the harness did not expect."""


@dataclass
class HomeAssistant:
    """One `hass` process with its configuration directory, an owner and an access token."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    access_token: str = ""
    refresh_token: str = ""
    entry_ids: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Base URL of the frontend and the HTTP API."""
        return f"http://{HOST}:{self.port}"

    @property
    def client_id(self) -> str:
        """The OAuth client id the frontend uses: its own URL."""
        return f"{self.url}/"

    @property
    def config_dir(self) -> Path:
        """Home Assistant's configuration directory."""
        return self.root / "config"

    @property
    def log_path(self) -> Path:
        """Where `hass` writes its output."""
        return self.root / "hass.log"

    def write_config(self) -> None:
        """A configuration with the HTTP server on loopback, Assist, and our integration linked in."""
        self.config_dir.mkdir(parents=True, exist_ok=True)
        custom = self.config_dir / "custom_components"
        custom.mkdir(exist_ok=True)
        link = custom / "whisper_gpu"
        if not link.exists():
            link.symlink_to(INTEGRATION_SOURCE, target_is_directory=True)
        (self.config_dir / "configuration.yaml").write_text(
            "\n".join(
                (
                    "http:",
                    f"  server_host: {HOST}",
                    f"  server_port: {self.port}",
                    "assist_pipeline:",
                    "conversation:",
                    "logger:",
                    "  default: warning",
                    "  logs:",
                    "    custom_components.whisper_gpu: debug",
                    "    homeassistant.components.assist_pipeline: info",
                    "",
                )
            ),
            encoding="utf-8",
        )

    def start(self) -> Self:
        """Start `hass`; wait_ready() waits for its HTTP API."""
        self.write_config()
        with self.log_path.open("ab") as log:
            # --skip-pip: everything it needs is installed by scripts/ha-e2e-env; a missing requirement shows as an
            # error instead of a slow install. The integrations onboarding sets up (met, radio_browser, …) need
            # packages that are not there, and fail quietly as they would offline.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "homeassistant", "-c", str(self.config_dir), "--skip-pip"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until the onboarding API answers (http, auth and onboarding are up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                msg = f"hass exited with {self.process.returncode}:\n{self.log()[-5000:]}"
                raise HomeAssistantError(msg)
            status, _ = self.request("GET", "/api/onboarding", token=None)
            if status == 200:
                return
            time.sleep(0.2)
        msg = f"hass did not answer within {timeout} s:\n{self.log()[-5000:]}"
        raise HomeAssistantError(msg)

    def stop(self, timeout: float = 30) -> None:
        """Stop `hass` as a service manager does (SIGTERM), killing it if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        """Everything `hass` wrote."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | bool | None = True,
        form: bool = False,
    ) -> tuple[int, Any]:
        """One HTTP request: status and decoded JSON (status 0 when nothing answers). token=True: the owner's."""
        data = None
        headers = {}
        if body is not None:
            if form:
                data = urllib.parse.urlencode(body).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        bearer = self.access_token if token is True else token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as err:
            return err.code, _decode(err.read())
        except OSError:
            return 0, None

    def expect(self, method: str, path: str, body: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """A request that must succeed (2xx); its decoded answer."""
        status, answer = self.request(method, path, body, **kwargs)
        if not 200 <= status < 300:
            msg = f"{method} {path} answered {status}: {answer}"
            raise HomeAssistantError(msg)
        return answer

    def onboard(self) -> None:
        """The onboarding a new user clicks through, over the frontend's HTTP API; keeps the owner's tokens."""
        answer = self.expect(
            "POST",
            "/api/onboarding/users",
            {
                "client_id": self.client_id,
                "name": OWNER_NAME,
                "username": OWNER_USERNAME,
                "password": OWNER_PASSWORD,
                "language": "en",
            },
            token=None,
        )
        self._tokens({"grant_type": "authorization_code", "code": answer["auth_code"], "client_id": self.client_id})
        self.expect("POST", "/api/onboarding/core_config", {})
        self.expect("POST", "/api/onboarding/analytics", {})
        answer = self.expect(
            "POST",
            "/api/onboarding/integration",
            {"client_id": self.client_id, "redirect_uri": f"{self.url}/?auth_callback=1"},
        )
        remaining = [step["step"] for step in self.expect("GET", "/api/onboarding", token=None) if not step["done"]]
        if remaining:
            msg = f"onboarding steps left: {remaining}"
            raise HomeAssistantError(msg)

    def _tokens(self, grant: Mapping[str, str]) -> None:
        answer = self.expect("POST", "/auth/token", grant, token=None, form=True)
        self.access_token = answer["access_token"]
        self.refresh_token = answer.get("refresh_token", self.refresh_token)

    def config_flow(self, handler: str, answers: Mapping[str, Any]) -> dict[str, Any]:
        """Run a config flow as the frontend does: start it, answer each form from `answers`, return the end."""
        result: dict[str, Any] = self.expect(
            "POST", "/api/config/config_entries/flow", {"handler": handler, "show_advanced_options": False}
        )
        for _ in range(10):
            if result["type"] != "form":
                return result
            fields = {item["name"] for item in result["data_schema"]}
            user_input = {name: value for name, value in answers.items() if name in fields}
            if result.get("errors"):
                msg = f"{handler} flow step {result['step_id']} shows errors {result['errors']}"
                raise HomeAssistantError(msg)
            result = self.expect("POST", f"/api/config/config_entries/flow/{result['flow_id']}", user_input)
        msg = f"{handler} flow did not end: {result}"
        raise HomeAssistantError(msg)

    def add_whisper_gpu(self, server: ServerProcess) -> str:
        """Add our integration for a server, as a user does from the integrations page; the entry id."""
        result = self.config_flow(
            "whisper_gpu",
            {
                "host": HOST,
                "wyoming_port": server.wyoming_port,
                "control_port": server.control_port,
                "token": server.token,
            },
        )
        if result["type"] != "create_entry":
            msg = f"whisper_gpu flow ended with {result}"
            raise HomeAssistantError(msg)
        return str(result["result"]["entry_id"])

    def add_wyoming(self, port: int) -> str:
        """Add Home Assistant core's Wyoming integration for a server on loopback; the entry id."""
        result = self.config_flow("wyoming", {"host": HOST, "port": port})
        if result["type"] != "create_entry":
            msg = f"wyoming flow ended with {result}"
            raise HomeAssistantError(msg)
        return str(result["result"]["entry_id"])

    @contextlib.asynccontextmanager
    async def websocket(self) -> AsyncIterator[HomeAssistantWebSocket]:
        """An authenticated WebSocket API connection as the owner."""
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{self.url}/api/websocket") as ws:
            connection = HomeAssistantWebSocket(ws)
            await connection.authenticate(self.access_token)
            yield connection


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


@dataclass
class PipelineRun:
    """What one Assist pipeline run reported: its events, when each arrived, and when the speech ended."""

    events: list[dict[str, Any]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    speech_end: float = 0.0
    audio_sent_s: float = 0.0

    def first(self, event_type: str) -> dict[str, Any]:
        """The first event of a type (its data), failing with all events seen when there is none."""
        for event in self.events:
            if event["type"] == event_type:
                return dict(event.get("data") or {})
        msg = f"no {event_type} event in {[event['type'] for event in self.events]}: {self.events}"
        raise AssertionError(msg)

    def time_of(self, event_type: str) -> float:
        """When the first event of a type arrived (monotonic clock)."""
        for event, arrived in zip(self.events, self.arrived, strict=True):
            if event["type"] == event_type:
                return arrived
        msg = f"no {event_type} event in {[event['type'] for event in self.events]}"
        raise AssertionError(msg)

    @property
    def types(self) -> list[str]:
        """The event types in order."""
        return [event["type"] for event in self.events]

    @property
    def stt_text(self) -> str:
        """The text of `stt-end`."""
        return str(self.first("stt-end")["stt_output"]["text"])


class HomeAssistantWebSocket:
    """Commands and Assist pipeline runs over Home Assistant's WebSocket API."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Wrap an open connection."""
        self._ws = ws
        self._next_id = 1

    async def authenticate(self, access_token: str) -> None:
        """The auth handshake."""
        greeting = await self._ws.receive_json()
        if greeting["type"] != "auth_required":
            msg = f"unexpected greeting {greeting}"
            raise HomeAssistantError(msg)
        await self._ws.send_json({"type": "auth", "access_token": access_token})
        answer = await self._ws.receive_json()
        if answer["type"] != "auth_ok":
            msg = f"authentication failed: {answer}"
            raise HomeAssistantError(msg)

    async def _send(self, command: str, **fields: Any) -> int:
        message_id = self._next_id
        self._next_id += 1
        await self._ws.send_json({"id": message_id, "type": command, **fields})
        return message_id

    async def command(self, command: str, **fields: Any) -> Any:
        """Send a command and return its result, raising on an error result."""
        message_id = await self._send(command, **fields)
        while True:
            answer = await self._ws.receive_json()
            if answer.get("id") == message_id and answer["type"] == "result":
                if not answer["success"]:
                    msg = f"{command} failed: {answer['error']}"
                    raise HomeAssistantError(msg)
                return answer["result"]

    async def entities(self, platform: str, domain: str | None = None) -> list[str]:
        """Entity ids a platform (integration) registered, optionally of one domain."""
        registry = await self.command("config/entity_registry/list")
        return [
            item["entity_id"]
            for item in registry
            if item["platform"] == platform and (domain is None or item["entity_id"].startswith(f"{domain}."))
        ]

    async def states(self, entity_ids: list[str]) -> dict[str, str]:
        """The current state of each entity."""
        states = await self.command("get_states")
        return {item["entity_id"]: item["state"] for item in states if item["entity_id"] in entity_ids}

    async def create_pipeline(self, name: str, stt_engine: str, language: str = "en") -> str:
        """An Assist pipeline that uses a speech-to-text entity; its id."""
        pipeline = await self.command(
            "assist_pipeline/pipeline/create",
            name=name,
            language=language,
            conversation_engine="conversation.home_assistant",
            conversation_language=language,
            stt_engine=stt_engine,
            stt_language=language,
            tts_engine=None,
            tts_language=None,
            tts_voice=None,
            wake_word_entity=None,
            wake_word_id=None,
        )
        return str(pipeline["id"])

    async def run_stt(
        self,
        pipeline_id: str,
        audio: bytes,
        *,
        speech_end_s: float | None = None,
        realtime: bool = True,
        timeout: float = 60,
    ) -> PipelineRun:
        """Run a pipeline's speech-to-text stage on audio sent as a satellite does: 20 ms binary frames.

        With `realtime`, frames go out at the pace a microphone makes them, and sending stops as soon as the
        pipeline reports `stt-end` (a satellite stops streaming then). `speech_end_s` is where the words end in
        `audio`; `PipelineRun.speech_end` is when that audio went out. After all audio, the empty frame that
        ends the stream is sent.
        """
        message_id = await self._send(
            "assist_pipeline/run",
            start_stage="stt",
            end_stage="stt",
            pipeline=pipeline_id,
            input={"sample_rate": RATE},
        )
        run = PipelineRun()
        done = asyncio.Event()
        handler_ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def receive() -> None:
            while True:
                answer = await self._ws.receive_json()
                if answer.get("id") != message_id:
                    continue
                if answer["type"] == "result":
                    if not answer["success"]:
                        msg = f"assist_pipeline/run failed: {answer['error']}"
                        raise HomeAssistantError(msg)
                    continue
                event = answer["event"]
                run.events.append(event)
                run.arrived.append(time.monotonic())
                if event["type"] == "run-start" and not handler_ready.done():
                    handler_ready.set_result(int(event["data"]["runner_data"]["stt_binary_handler_id"]))
                if event["type"] in {"stt-end", "error"}:
                    done.set()
                if event["type"] == "run-end":
                    done.set()
                    return

        receiver = asyncio.create_task(receive())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait({receiver, handler_ready}, return_when=asyncio.FIRST_COMPLETED)
                if not handler_ready.done():
                    receiver.result()  # its error, if it failed
                    msg = f"the run ended before it started: {run.events}"
                    raise HomeAssistantError(msg)
                handler = bytes([handler_ready.result()])
                await self._stream(run, handler, audio, speech_end_s, realtime=realtime, done=done)
                await receiver
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
        return run

    async def _stream(
        self,
        run: PipelineRun,
        handler: bytes,
        audio: bytes,
        speech_end_s: float | None,
        *,
        realtime: bool,
        done: asyncio.Event,
    ) -> None:
        started = time.monotonic()
        speech_end_byte = None if speech_end_s is None else int(speech_end_s * RATE) * SAMPLE_WIDTH
        for offset in range(0, len(audio), FRAME_BYTES):
            if done.is_set():
                break
            if speech_end_byte is not None and offset >= speech_end_byte and not run.speech_end:
                run.speech_end = time.monotonic()
            await self._ws.send_bytes(handler + audio[offset : offset + FRAME_BYTES])
            if realtime:
                due = started + (offset + FRAME_BYTES) / (RATE * SAMPLE_WIDTH)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        run.audio_sent_s = time.monotonic() - started
        if not done.is_set():
            await self._ws.send_bytes(handler)
