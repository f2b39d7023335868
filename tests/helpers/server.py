"""A real whisper-gpu server in a subprocess, started through its console script, and a Wyoming client for it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from helpers.tls import CertificateFiles

STREAMING_EVENT = re.compile(r"^transcript-(start|chunk|stop)$")
TOKEN = "test-token-0123456789abcdef"  # noqa: S105 - a test credential
READY_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_command() -> list[str]:
    """The console script beside this interpreter, else `python -m whisper_gpu` (source checkouts)."""
    script = Path(sys.executable).with_name("whisper-gpu")
    if script.is_file():
        return [str(script)]
    found = shutil.which("whisper-gpu")
    return [found] if found else [sys.executable, "-m", "whisper_gpu"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a `whisper-gpu` subcommand in a clean environment and capture its output."""
    return subprocess.run(
        [*server_command(), *args],
        capture_output=True,
        text=True,
        env=clean_environment(env),
        timeout=timeout,
        check=False,
    )


def clean_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without whisper-gpu settings (bare or prefixed), plus extra."""
    from whisper_gpu.settings import ENV_PREFIX, SETTINGS  # noqa: PLC0415 - imported where the server is

    bare = {spec.env for spec in SETTINGS.values()}
    env = {key: value for key, value in os.environ.items() if key not in bare and not key.startswith(ENV_PREFIX)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    """One server: its ports, data directory and log."""

    data_dir: Path
    model: str = "tiny.en"
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    token: str | None = TOKEN
    offline: bool = True
    wyoming_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    tls: CertificateFiles | None = None
    process: subprocess.Popen[bytes] | None = None
    # The loopback address it listens on: several servers on the same ports stand for the replicas of one name.
    address: str = "127.0.0.1"

    @property
    def control_url(self) -> str:
        """Base URL of the control API (https when the server was given a certificate)."""
        return f"{'https' if self.tls else 'http'}://{self.address}:{self.control_port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context that trusts exactly the server's certificate (None for plain HTTP)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.cert))
        # The test CA of helpers.tls.issued_by_a_ca has no key usage extension, which strict checks require.
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
        return context

    @property
    def log_path(self) -> Path:
        """Where the server's stderr goes."""
        return self.data_dir.parent / f"{self.data_dir.name}-{self.wyoming_port}.log"

    def command(self) -> list[str]:
        """The full command line."""
        command = [
            *server_command(),
            "serve",
            "--host",
            self.address,
            "--wyoming-port",
            str(self.wyoming_port),
            "--control-port",
            str(self.control_port),
            "--data-dir",
            str(self.data_dir),
            "--zeroconf",
            "off",
        ]
        if self.offline:
            command.append("--offline")
        if self.model:
            command += ["--model", self.model]
        if self.token:
            command += ["--control-token", self.token]
        if self.tls:
            command += ["--control-tls-cert", str(self.tls.cert), "--control-tls-key", str(self.tls.key)]
        return command + self.args

    def start(self, *, wait: bool = True) -> ServerProcess:
        """Start, and by default wait until `/readyz` answers 200."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=clean_environment(self.env)
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll `/readyz`; fail with the log when the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                msg = f"server exited with {self.process.returncode}:\n{self.log()}"
                raise RuntimeError(msg)
            status, _ = self.get("/readyz")
            if status == 200:
                return
            time.sleep(0.1)
        msg = f"server not ready after {timeout} s:\n{self.log()}"
        raise RuntimeError(msg)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        """Everything the server wrote."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def metric(self, name: str, labels: str = "") -> float | None:
        """A sample's value on /metrics (labels as exported: '{outcome="ok"}'); None when it is not there."""
        _, text = self.get("/metrics")
        match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else None

    def get(self, path: str) -> tuple[int, Any]:
        """GET from the control port: status and decoded JSON (or text); status 0 when nothing answers."""
        return self.request("GET", path)

    def request(self, method: str, path: str, body: object = None, *, token: str | None = None) -> tuple[int, Any]:
        """One HTTP request to the control port."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.control_url + path, data=data, method=method)  # noqa: S310
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.ssl_context()) as response:  # noqa: S310
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as err:
            return err.code, _decode(err.read())
        except OSError:
            return 0, None


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


async def transcribe(
    port: int,
    audio: bytes,
    rate: int = 16_000,
    width: int = 2,
    channels: int = 1,
    *,
    language: str | None = None,
    chunk_frames: int = 1024,
    names: list[str] | None = None,
) -> Event:
    """Send one request the way Home Assistant does and return the server's answer (transcript or error)."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await _send_request(client, audio, (rate, width, channels), language, chunk_frames, names)
        return await read_answer(client)


async def timed_transcript(port: int, pcm: bytes, *, names: list[str] | None = None) -> tuple[str, float]:
    """One English request of 16 kHz speech in 1 s chunks: its text, and milliseconds from `audio-stop` to it."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await _send_request(client, pcm, (16_000, 2, 1), "en", 16_000, names)
        stopped = time.perf_counter()
        answer = await read_answer(client, timeout=300)
        waited = (time.perf_counter() - stopped) * 1000
    if not Transcript.is_type(answer.type):
        msg = f"no transcript: {answer}"
        raise RuntimeError(msg)
    return Transcript.from_event(answer).text, waited


async def _send_request(
    client: AsyncTcpClient,
    audio: bytes,
    audio_format: tuple[int, int, int],
    language: str | None,
    chunk_frames: int,
    names: list[str] | None,
) -> None:
    rate, width, channels = audio_format
    await client.write_event(Transcribe(language=language, transcript_names=names).event())
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    step = chunk_frames * width * channels
    for start in range(0, len(audio), step):
        chunk = AudioChunk(rate=rate, width=width, channels=channels, audio=audio[start : start + step])
        await client.write_event(chunk.event())
    await client.write_event(AudioStop().event())


async def read_answer(client: AsyncTcpClient, timeout: float = 120) -> Event:
    """The transcript or error that answers a request, past the streaming events around it (as clients do)."""
    async with asyncio.timeout(timeout):
        while (event := await client.read_event()) is not None:
            if not STREAMING_EVENT.match(event.type):
                return event
    msg = "the server closed the connection without an answer"
    raise AssertionError(msg)
