"""What parking the model costs the first command after idle: restore at `audio-start` against one after the audio.

Each command is streamed in real time over Wyoming, as a microphone makes it, and the clock runs from `audio-stop`
to the `transcript` (endpointing and partial transcripts off, so `audio-stop` ends every command). Three cases:

- warm: the model is resident.
- restore at audio-start: the model was parked (the control API's park action); the server starts bringing it back
  at `transcribe`/`audio-start`, while the audio still streams. This is what the server does.
- restore after the audio: the model was parked, and the client holds the command back while it is spoken and then
  sends it whole, so the server sees `transcribe` and `audio-start` only as the audio ends: the restore cannot
  start earlier. The server is the same; only what it is told, and when, differs. This is also what a server that
  reloads on the next request, without an early start, makes the user wait.

It prints the server's memory before and after parking (resident set; GPU memory on a GPU) and the restore times.

    bench/run --parking   (or: .venv/bin/python scripts/benchmark_parking.py --model base)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from http import HTTPStatus
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.server import TOKEN, ServerProcess
from helpers.speech import COMMANDS, Utterance, synthesize

RATE = 16_000
CHUNK_SAMPLES = 1024
PAD_S = 0.3
LOUD = 300  # where espeak-ng's words begin and end: 16-bit samples louder than this
CASES = ("warm", "restore at audio-start", "restore after the audio")
normalize = EnglishTextNormalizer()


def clip(text: str, directory: Path) -> bytes:
    """A little noise, the words, a little noise: 16-bit samples."""
    samples = np.frombuffer(Utterance(text, synthesize(text, directory), clear=True).pcm()[0], dtype="<i2")
    loud = np.nonzero(np.abs(samples) > LOUD)[0]
    rng = np.random.default_rng(len(text))
    noise = rng.normal(0, 30, int(PAD_S * RATE)).astype("<i2")
    return np.concatenate((noise, samples[loud[0] : loud[-1] + 1], noise)).tobytes()


async def command(port: int, audio: bytes, *, hold_back: bool) -> tuple[float, str]:
    """Seconds from `audio-stop` to the transcript, and its text.

    `hold_back`: wait while the command is spoken, then send it all at once (nothing reaches the server earlier).
    """
    chunks = [audio[offset : offset + CHUNK_SAMPLES * 2] for offset in range(0, len(audio), CHUNK_SAMPLES * 2)]
    async with AsyncTcpClient("127.0.0.1", port) as client:
        started = time.monotonic()
        if hold_back:
            await asyncio.sleep(len(audio) / 2 / RATE)
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        for index, chunk in enumerate(chunks):
            await client.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=chunk).event())
            if not hold_back:
                await asyncio.sleep(max(0.0, started + (index + 1) * CHUNK_SAMPLES / RATE - time.monotonic()))
        await client.write_event(AudioStop().event())
        stopped = time.monotonic()
        while (event := await asyncio.wait_for(client.read_event(), timeout=120)) is not None:
            if Transcript.is_type(event.type):
                return time.monotonic() - stopped, Transcript.from_event(event).text
    msg = "no transcript"
    raise RuntimeError(msg)


def rss_mb(server: ServerProcess) -> float:
    pid = server.process.pid if server.process is not None else "self"
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def gpu_memory_mb(server: ServerProcess) -> float | None:
    """GPU memory in use as the server's metrics report it (None on a CPU)."""
    with urllib.request.urlopen(server.control_url + "/metrics", timeout=10) as response:  # noqa: S310
        for line in response.read().decode().splitlines():
            if line.startswith("whisper_gpu_gpu_memory_used_bytes{"):
                return round(float(line.rsplit(" ", 1)[1]) / 2**20, 1)
    return None


def run_case(server: ServerProcess, case: str, clips: list[tuple[str, bytes]]) -> dict[str, Any]:
    waits, texts, restores, parks, memory = [], [], [], [], []
    for _, audio in clips:
        if case != "warm":
            loaded = (rss_mb(server), gpu_memory_mb(server))
            started = time.monotonic()
            code, status = server.request("POST", "/api/v1/model/park", token=TOKEN)
            parks.append(time.monotonic() - started)
            if code != HTTPStatus.OK or status["state"] != "parked":
                msg = f"the park action answered {code}: {status}"
                raise RuntimeError(msg)
            memory.append({"loaded": loaded, "parked": (rss_mb(server), gpu_memory_mb(server))})
            time.sleep(0.5)
        wait, text = asyncio.run(command(server.wyoming_port, audio, hold_back=case == "restore after the audio"))
        waits.append(wait)
        texts.append(text)
        if case != "warm":
            _, status = server.get("/api/v1/status")
            restores.append(status["parking"]["last_restore"]["seconds"])
    references = [normalize(text) for text, _ in clips]
    figures: dict[str, Any] = {
        "median_s": round(statistics.median(waits), 3),
        "p90_s": round(sorted(waits)[int(0.9 * (len(waits) - 1))], 3),
        "max_s": round(max(waits), 3),
        "word_error_rate": round(jiwer.wer(references, [normalize(text) for text in texts]), 4),
        "waits_s": [round(wait, 3) for wait in waits],
    }
    if restores:
        figures["restore_median_s"] = round(statistics.median(restores), 3)
        figures["park_median_s"] = round(statistics.median(parks), 3)
        figures["memory_mb"] = memory
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--park-mode", default="host_memory", choices=("host_memory", "unload"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--commands", type=int, default=10, help="commands per case")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-parking-"))
    clips = [(text, clip(text, work / "speech")) for text, _ in COMMANDS[: args.commands]]
    server = ServerProcess(
        work / "server",
        model=args.model,
        args=[
            *("--device", args.device, "--compute-type", args.compute_type, "--park-mode", args.park_mode),
            *("--cpu-threads", str(args.threads), "--beam-size", "5", "--language", "en"),
            *("--no-endpointing", "--partial-interval-s", "0"),
        ],
    ).start()
    results: dict[str, Any] = {}
    try:
        asyncio.run(command(server.wyoming_port, clips[0][1], hold_back=False))  # the first request after loading
        for case in CASES:
            results[case] = run_case(server, case, clips)
            print(f"{case}: median {results[case]['median_s']} s", flush=True)
    finally:
        server.stop()

    print(f"\n{args.model} ({args.compute_type}) on {args.device}, park mode {args.park_mode}, {len(clips)} commands")
    print("| case | median s | p90 s | max s | WER | restore s (median) |")
    print("|---|---|---|---|---|---|")
    for case, figures in results.items():
        restore = figures.get("restore_median_s", "")
        print(
            f"| {case} | {figures['median_s']} | {figures['p90_s']} | {figures['max_s']} | "
            f"{figures['word_error_rate']} | {restore} |"
        )
    memory = results[CASES[1]]["memory_mb"][-1]
    print(f"resident set: {memory['loaded'][0]} MB loaded, {memory['parked'][0]} MB parked")
    if memory["loaded"][1] is not None:
        print(f"GPU memory: {memory['loaded'][1]} MB loaded, {memory['parked'][1]} MB parked")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"parking-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {key: str(value) for key, value in vars(args).items()}
    path.write_text(json.dumps({"args": record, "cases": results}, indent=1) + "\n", encoding="utf-8")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
