"""Coverage-guided fuzzing (atheris) of the Wyoming port: reader and handler of a real server, in this process.

The server runs tiny.en (int8, offline) on a thread of its own. Each input is written to a fresh connection,
which is then half-closed; the server must answer with well-formed events and close the connection (after an
`error` event, or cleanly) within a few seconds, log no error, and answer `describe` on the next connection.
A failure stops the run and libFuzzer saves the input as crash-*; at the end it prints `Done N runs`.

Usage (needs the `fuzz` extra: .venv/bin/pip install -e '.[fuzz]'):
    .venv/bin/python scripts/fuzz_wyoming.py -max_total_time=300 [-runs=N] [-max_len=70000] [corpus directory]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import atheris

os.environ["HF_HUB_OFFLINE"] = "1"

with atheris.instrument_imports(include=["whisper_gpu"]):
    from whisper_gpu.boot_settings import resolve_settings
    from whisper_gpu.server import WyomingServer
    from whisper_gpu.service import Service

from wyoming.event import Event, async_read_event

CASE_TIMEOUT_S = 10.0
SILENCE = bytes(3200)


class ErrorLog(logging.Handler):
    """Keeps every error the server logs (tracebacks, unhandled task exceptions)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


class InProcessServer:
    """A real Service and WyomingServer on an event loop in a background thread."""

    def __init__(self, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="server", daemon=True).start()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        boot = resolve_settings(
            {
                "model": "tiny.en",
                "compute_type": "int8",
                "offline": True,
                "zeroconf": "off",
                "data_dir": str(data_dir),
                "host": "127.0.0.1",
                "wyoming_port": self.port,
                # Short so that an input that stops mid-event cannot hold a case for long.
                "read_timeout_s": 2.0,
                "idle_timeout_s": 5.0,
            },
            {},
        )
        asyncio.run_coroutine_threadsafe(self._start(boot), self.loop).result(timeout=600)

    async def _start(self, boot: object) -> None:
        service = Service(boot)  # type: ignore[arg-type]
        loading = await service.start()
        if not await loading:
            msg = "the model did not load"
            raise RuntimeError(msg)
        await WyomingServer(service).start("127.0.0.1", self.port)


def parse_events(received: bytes) -> list[Event]:
    """The events in what the server sent; raises when the bytes are not whole events."""

    async def parse() -> list[Event]:
        reader = asyncio.StreamReader()
        reader.feed_data(received)
        reader.feed_eof()
        events = []
        while (event := await async_read_event(reader)) is not None:
            events.append(event)
        return events

    return asyncio.run(parse())


def exchange(port: int, data: bytes) -> bytes:
    """Write data, half-close, and read until the server closes; raise when it does not close in time."""
    received = b""
    deadline = time.monotonic() + CASE_TIMEOUT_S
    with socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT_S) as connection:
        with contextlib.suppress(OSError):  # the server may close first (framing lost) and reset
            connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)
        while True:
            connection.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                block = connection.recv(65536)
            except TimeoutError as err:
                msg = f"the server neither answered nor closed within {CASE_TIMEOUT_S} s"
                raise AssertionError(msg) from err
            except ConnectionResetError:
                return received
            if not block:
                return received
            received += block


def served(port: int) -> bool:
    """A new client gets `info` for `describe`."""
    with socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT_S) as connection:
        connection.sendall(b'{"type": "describe"}\n')
        connection.shutdown(socket.SHUT_WR)
        received = b""
        while block := connection.recv(65536):
            received += block
    return any(event.type == "info" for event in parse_events(received))


def seeds(directory: Path) -> None:
    """Valid sessions to start from: describe, ping, a whole request, a refused one."""

    def event(kind: str, data: dict[str, object] | None = None, payload: bytes = b"") -> bytes:
        header: dict[str, object] = {"type": kind, "data": data or {}}
        if payload:
            header["payload_length"] = len(payload)
        return json.dumps(header).encode() + b"\n" + payload

    pcm = {"rate": 16000, "width": 2, "channels": 1}
    sessions = {
        "describe": event("describe"),
        "ping": event("ping", {"text": "x"}),
        "request": event("transcribe", {"language": "en"})
        + event("audio-start", pcm)
        + event("audio-chunk", pcm, SILENCE)
        + event("audio-stop"),
        "refused": event("audio-start", {"rate": 0, "width": 2, "channels": 1}) + event("audio-stop"),
        "data": b'{"type": "transcribe", "data_length": 17}\n{"language": "en"}',
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in sessions.items():
        (directory / name).write_bytes(raw)


def main() -> None:
    errors = ErrorLog()
    logging.getLogger().setLevel(logging.ERROR)  # warnings (bad input) are expected by the thousand
    logging.getLogger().addHandler(errors)
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-wyoming-"))
    print("starting the server (tiny.en) ...", flush=True)
    server = InProcessServer(scratch / "data")

    def one_input(data: bytes) -> None:
        parse_events(exchange(server.port, data))
        if not served(server.port):
            msg = "the next client was not served"
            raise AssertionError(msg)
        if errors.records:
            msg = "the server logged an error:\n" + "\n".join(errors.records)
            raise AssertionError(msg)

    arguments = sys.argv
    if not any(not argument.startswith("-") for argument in arguments[1:]):
        seeds(scratch / "corpus")
        arguments = [*arguments, str(scratch / "corpus")]
    atheris.Setup(arguments, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
