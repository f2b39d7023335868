"""Soak: thousands of sequential requests against a real server; resident memory and open files must stay flat.

Most requests are ordinary commands; one in twenty is cut off mid-stream and one in twenty is a malformed event,
so that the error paths are soaked too. Prints the server's resident memory (VmRSS) and open file descriptors
every `--every` requests and the change from the first sample (after warm-up) to the last.

Usage: .venv/bin/python scripts/soak.py [--requests 2000] [--every 100] [--model tiny.en] [--compute-type int8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers.server import ServerProcess, transcribe
from helpers.speech import Utterance, command_set
from wyoming.asr import Transcript
from wyoming.audio import AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.error import Error

FAULT_EVERY = 20


def memory_and_files(server: ServerProcess) -> tuple[float, int]:
    """Resident memory in MB and open file descriptors of the server process."""
    pid = server.process.pid if server.process else os.getpid()
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return rss_kb / 1024, sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


async def cut_off_mid_stream(port: int, utterance: Utterance) -> None:
    """Start a request, send half the audio and the start of a chunk, then vanish."""
    audio, rate, width, channels = utterance.pcm()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    start = AudioStart(rate=rate, width=width, channels=channels).event()
    writer.write(json.dumps({"type": start.type, "data": start.data}).encode() + b"\n")
    header = {"type": "audio-chunk", "data": start.data, "payload_length": len(audio)}
    writer.write(json.dumps(header).encode() + b"\n" + audio[: len(audio) // 2])
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def malformed(port: int) -> bool:
    """A header nested too deeply: the answer must be an error event."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        assert client._writer is not None  # noqa: SLF001, S101 - raw bytes on the library's connection
        client._writer.write(b'{"type": "transcribe", "data": ' + b"[" * 30_000 + b"\n")  # noqa: SLF001
        event = await asyncio.wait_for(client.read_event(), timeout=30)
    return event is not None and Error.is_type(event.type)


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        utterances = command_set(root / "speech")
        server = ServerProcess(root / "data", model=args.model, args=["--compute-type", args.compute_type])
        server.start()
        samples: list[tuple[int, float, int]] = []
        failures = 0
        started = time.monotonic()
        try:
            for number in range(1, args.requests + 1):
                utterance = utterances[number % len(utterances)]
                if number % FAULT_EVERY == 0:
                    await cut_off_mid_stream(server.wyoming_port, utterance)
                elif number % FAULT_EVERY == FAULT_EVERY // 2:
                    failures += not await malformed(server.wyoming_port)
                else:
                    audio, rate, width, channels = utterance.pcm()
                    event = await transcribe(server.wyoming_port, audio, rate, width, channels)
                    failures += not Transcript.is_type(event.type)
                if number % args.every == 0:
                    rss, files = memory_and_files(server)
                    samples.append((number, rss, files))
                    elapsed = time.monotonic() - started
                    line = f"{number:6d} requests  {elapsed:7.0f} s  RSS {rss:7.1f} MB  open files {files:4d}"
                    print(line, flush=True)
        finally:
            server.stop()
    first, last = samples[0], samples[-1]
    peak = max(sample[1] for sample in samples)
    print(
        f"from request {first[0]} to {last[0]}: RSS {first[1]:.1f} -> {last[1]:.1f} MB "
        f"({last[1] - first[1]:+.1f} MB, peak {peak:.1f} MB), open files {first[2]} -> {last[2]} "
        f"({last[2] - first[2]:+d}); requests that failed: {failures}"
    )
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--compute-type", default="int8")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
