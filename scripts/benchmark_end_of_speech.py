"""What the user waits for: the time from the end of their speech to the transcript, ours against the peer.

Each clip is streamed in real time, as a microphone makes it (a little noise, the words, then 3 s of noise), and
the clock runs from the last word to the `transcript` event. Ours ends the command itself (endpointing, with the
text of the pause usually ready); wyoming-faster-whisper 3.8.1 runs at its best here, with `--vad-endpointing` set
to the same silence. Both load the same model files with the same device, compute type, beam size and threads.
This measures over Wyoming directly: a Home Assistant pipeline adds the same small overhead to both.

    bench/run --end-of-speech   (or: .venv/bin/python scripts/benchmark_end_of_speech.py --peer-python PYTHON)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jiwer
import numpy as np
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.server import ServerProcess, free_port
from helpers.speech import COMMANDS, Utterance, synthesize

RATE = 16_000
CHUNK_SAMPLES = 1024
LEAD_S = 0.3
TRAILING_S = 3.0
# Where espeak-ng's words begin and end: 16-bit samples louder than this.
LOUD = 300
normalize = EnglishTextNormalizer()


def clip(text: str, directory: Path) -> np.ndarray:
    """Noise, the words (espeak-ng's own silence cut off), noise: 16-bit samples."""
    samples = np.frombuffer(Utterance(text, synthesize(text, directory), clear=True).pcm()[0], dtype="<i2")
    loud = np.nonzero(np.abs(samples) > LOUD)[0]
    rng = np.random.default_rng(len(text))

    def noise(seconds: float) -> np.ndarray:
        return rng.normal(0, 30, int(seconds * RATE)).astype("<i2")

    return np.concatenate((noise(LEAD_S), samples[loud[0] : loud[-1] + 1], noise(TRAILING_S)))


async def stream(port: int, audio: np.ndarray) -> tuple[float, str]:
    """Seconds from the end of the words to the transcript, and its text."""
    speech_end = len(audio) / RATE - TRAILING_S
    async with AsyncTcpClient("127.0.0.1", port) as client:
        started = time.monotonic()

        async def answer() -> tuple[float, str]:
            while (event := await client.read_event()) is not None:
                if Transcript.is_type(event.type):
                    return time.monotonic() - started - speech_end, Transcript.from_event(event).text
            msg = "no transcript"
            raise RuntimeError(msg)

        reader = asyncio.create_task(answer())
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        data = audio.tobytes()
        for index, offset in enumerate(range(0, len(data), CHUNK_SAMPLES * 2)):
            if reader.done():
                break
            chunk = data[offset : offset + CHUNK_SAMPLES * 2]
            await client.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=chunk).event())
            await asyncio.sleep(max(0.0, started + (index + 1) * CHUNK_SAMPLES / RATE - time.monotonic()))
        if not reader.done():
            await client.write_event(AudioStop().event())
        return await asyncio.wait_for(reader, timeout=60)


async def measure(name: str, port: int, clips: list[tuple[str, np.ndarray]]) -> dict[str, object]:
    waits, texts = [], []
    for _, audio in clips:
        wait, text = await stream(port, audio)
        waits.append(wait)
        texts.append(text)
    references = [normalize(text) for text, _ in clips]
    figures = {
        "median_s": round(statistics.median(waits), 3),
        "p90_s": round(sorted(waits)[int(0.9 * (len(waits) - 1))], 3),
        "max_s": round(max(waits), 3),
        "word_error_rate": round(jiwer.wer(references, [normalize(text) for text in texts]), 4),
        "waits_s": [round(wait, 3) for wait in waits],
        "texts": texts,
    }
    print(f"{name}: median {figures['median_s']} s, p90 {figures['p90_s']} s, WER {figures['word_error_rate']}")
    return figures


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"the peer exited with {process.returncode}"
            raise RuntimeError(msg)
        try:
            asyncio.run(asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1))
        except OSError:
            time.sleep(0.2)
        else:
            return
    msg = "the peer did not listen in time"
    raise RuntimeError(msg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--silence", type=float, default=0.5, help="end-of-command silence for both (s)")
    parser.add_argument("--peer-python", default="bench/.peer-venv/bin/python")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-eos-"))
    clips = [(text, clip(text, work / "speech")) for text, _ in COMMANDS]
    common = ["--compute-type", "int8", "--beam-size", "5", "--cpu-threads", str(args.threads), "--device", "cpu"]

    ours = ServerProcess(
        work / "ours",
        model=args.model,
        args=[*common, "--language", "en", "--end-of-speech-s", str(args.silence)],
    ).start()
    try:
        figures_ours = asyncio.run(measure("ours", ours.wyoming_port, clips))
    finally:
        ours.stop()

    model_dir = work / "ours" / ".cache" / "models" / args.model
    port = free_port()
    peer = subprocess.Popen(
        [
            args.peer_python,
            "-m",
            "wyoming_faster_whisper",
            "--uri",
            f"tcp://127.0.0.1:{port}",
            "--model",
            str(model_dir),
            "--stt-library",
            "faster-whisper",
            "--data-dir",
            str(work / "peer"),
            "--download-dir",
            str(work / "peer"),
            "--local-files-only",
            *common,
            "--language",
            "en",
            "--vad-endpointing",
            str(args.silence),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, peer)
        asyncio.run(stream(port, clips[0][1]))  # the peer loads its model on the first request
        figures_peer = asyncio.run(measure("wyoming-faster-whisper 3.8.1", port, clips))
    finally:
        peer.terminate()
        peer.wait(30)

    ratio = float(figures_ours["median_s"]) / float(figures_peer["median_s"])  # type: ignore[arg-type]
    print(f"median ratio ours/peer: {ratio:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"silence_s": args.silence, "model": args.model, "ours": figures_ours, "peer": figures_peer}
    result["median_ratio"] = round(ratio, 3)
    path = args.out / f"end-of-speech-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
