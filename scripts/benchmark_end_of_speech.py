"""What the user waits for: the time from the end of their speech to the transcript, ours against the peer.

Each clip is streamed in real time, as a microphone makes it (a little noise, the words, then 3 s of noise), and
the clock runs from the last word to the `transcript` event. Ours ends the command itself (endpointing, with the
text of the pause usually ready); wyoming-faster-whisper 3.8.1 runs at its best here, with `--vad-endpointing` set
to the same silence. Both load the same model files with the same device, compute type, beam size and threads.

By default this measures over Wyoming directly. With `--home-assistant` it measures what a Home Assistant user
waits for: a real `hass` (the newest release, scripts/ha-e2e-env) runs an Assist pipeline (speech-to-text stage)
per clip over the WebSocket API, with our integration for ours and Home Assistant core's `wyoming` integration for
the peer, and the clock runs from the last word to `stt-end`. Clips alternate between the two.

    bench/run --end-of-speech [--home-assistant]
    (or: .venv/bin/python scripts/benchmark_end_of_speech.py --peer-python PYTHON [--home-assistant])
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
from typing import Any

import jiwer
import numpy as np
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from e2e.harness import spoken_command
from helpers.server import ServerProcess, free_port
from helpers.speech import COMMANDS

RATE = 16_000
CHUNK_SAMPLES = 1024
LEAD_S = 0.3
TRAILING_S = 3.0
normalize = EnglishTextNormalizer()


def clip(text: str, directory: Path) -> np.ndarray:
    """Noise, the words (espeak-ng's own silence cut off), noise: 16-bit samples."""
    command = spoken_command(text, directory, lead_s=LEAD_S, trailing_s=TRAILING_S)
    return np.frombuffer(command.audio, dtype="<i2")


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
    return figures(name, [text for text, _ in clips], waits, texts)


def figures(name: str, references: list[str], waits: list[float], texts: list[str]) -> dict[str, object]:
    """Median, p90 and maximum wait and the word error rate of one side; printed as well."""
    result = {
        "median_s": round(statistics.median(waits), 3),
        "p90_s": round(sorted(waits)[int(0.9 * (len(waits) - 1))], 3),
        "max_s": round(max(waits), 3),
        "word_error_rate": round(
            jiwer.wer([normalize(text) for text in references], [normalize(text) for text in texts]), 4
        ),
        "waits_s": [round(wait, 3) for wait in waits],
        "texts": texts,
    }
    print(f"{name}: median {result['median_s']} s, p90 {result['p90_s']} s, WER {result['word_error_rate']}")
    return result


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


def start_peer(
    args: argparse.Namespace, common: list[str], model_dir: Path, work: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """wyoming-faster-whisper 3.8.1 at its best: ending the command itself after the same silence as ours."""
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
    except BaseException:
        peer.terminate()
        raise
    return peer, port


def over_wyoming(
    args: argparse.Namespace, work: Path, common: list[str]
) -> tuple[dict[str, object], dict[str, object]]:
    """Each side alone, its clips straight over Wyoming."""
    clips = [(text, clip(text, work / "speech")) for text, _ in COMMANDS[: args.clips]]
    ours = ServerProcess(
        work / "ours",
        model=args.model,
        args=[*common, "--language", "en", "--end-of-speech-s", str(args.silence)],
    ).start()
    try:
        figures_ours = asyncio.run(measure("ours", ours.wyoming_port, clips))
    finally:
        ours.stop()
    peer, port = start_peer(args, common, work / "ours" / ".cache" / "models" / args.model, work)
    try:
        asyncio.run(stream(port, clips[0][1]))  # the peer loads its model on the first request
        figures_peer = asyncio.run(measure("wyoming-faster-whisper 3.8.1", port, clips))
    finally:
        peer.terminate()
        peer.wait(30)
    return figures_ours, figures_peer


def in_home_assistant(
    args: argparse.Namespace, work: Path, common: list[str]
) -> tuple[dict[str, object], dict[str, object]]:
    """Both servers running, a real hass with an Assist pipeline for each, the clips alternating between them."""
    ours = ServerProcess(
        work / "ours",
        model=args.model,
        args=[*common, "--language", "en", "--end-of-speech-s", str(args.silence)],
    ).start()
    peer = None
    try:
        peer, peer_port = start_peer(args, common, work / "ours" / ".cache" / "models" / args.model, work)
        warm_up = clip(COMMANDS[0][0], work / "speech")
        for port in (ours.wyoming_port, peer_port):  # the peer loads its model on the first request
            asyncio.run(stream(port, warm_up))
        job = work / "job.json"
        job.write_text(
            json.dumps(
                {
                    "texts": [text for text, _ in COMMANDS[: args.clips]],
                    "ours": {"wyoming_port": ours.wyoming_port, "control_port": ours.control_port, "token": ours.token},
                    "peer_port": peer_port,
                }
            ),
            encoding="utf-8",
        )
        checkout = Path(__file__).resolve().parents[1]
        subprocess.run(
            [checkout / "scripts" / "ha-e2e-run", "python", "scripts/benchmark_end_of_speech.py", "--run-job", job],
            check=True,
            cwd=checkout,
        )
    finally:
        ours.stop()
        if peer is not None:
            peer.terminate()
            peer.wait(30)
    runs = json.loads((work / "runs.json").read_text(encoding="utf-8"))
    references = [text for text, _ in COMMANDS[: args.clips]]
    return (
        figures("ours (whisper_gpu integration)", references, runs["ours"]["waits"], runs["ours"]["texts"]),
        figures(
            "wyoming-faster-whisper 3.8.1 (wyoming integration)",
            references,
            runs["peer"]["waits"],
            runs["peer"]["texts"],
        ),
    )


def run_job(job_path: Path) -> None:
    """Inside the end-to-end environment: start hass, add both servers, run the pipelines, write runs.json."""
    from e2e.harness import HomeAssistant, step  # noqa: PLC0415 - only this environment has Home Assistant

    job = json.loads(job_path.read_text(encoding="utf-8"))
    work = job_path.parent
    hass = HomeAssistant(work / "home-assistant")
    try:
        with step("start hass"):
            hass.start().wait_ready()
        with step("onboarding"):
            hass.onboard()
        with step("add both integrations"):
            ours = ServerProcess(work / "ours", **job["ours"])
            hass.add_whisper_gpu(ours)
            hass.add_wyoming(job["peer_port"])
        runs = asyncio.run(pipeline_runs(hass, job["texts"], work / "speech-hass"))
    except BaseException:
        print(hass.log()[-5000:], file=sys.stderr)
        raise
    finally:
        hass.stop()
    (work / "runs.json").write_text(json.dumps(runs), encoding="utf-8")


async def pipeline_runs(hass: Any, texts: list[str], speech_dir: Path) -> dict[str, dict[str, list[Any]]]:
    """Per side, the seconds from the last word to `stt-end` (or to the error) and the text, clip by clip."""
    commands = [spoken_command(text, speech_dir, lead_s=LEAD_S, trailing_s=TRAILING_S) for text in texts]
    async with hass.websocket() as ws:
        pipelines = {}
        for name, platform in (("ours", "whisper_gpu"), ("peer", "wyoming")):
            for _ in range(100):
                if entities := await ws.entities(platform, "stt"):
                    break
                await asyncio.sleep(0.1)
            pipelines[name] = await ws.create_pipeline(f"bench {name}", entities[0])
        for pipeline in pipelines.values():  # one run each through Home Assistant first, not counted
            await ws.run_stt(pipeline, commands[0].audio, speech_end_s=commands[0].speech_end_s)
        runs: dict[str, dict[str, list[Any]]] = {name: {"waits": [], "texts": []} for name in pipelines}
        for command in commands:
            for name, pipeline in pipelines.items():
                run = await ws.run_stt(pipeline, command.audio, speech_end_s=command.speech_end_s)
                end = "stt-end" if "stt-end" in run.types else "error"
                runs[name]["waits"].append(run.time_of(end) - run.speech_end)
                runs[name]["texts"].append(run.stt_text if end == "stt-end" else "")
                print(f"{name}: {runs[name]['waits'][-1]:.2f} s {runs[name]['texts'][-1]!r}", file=sys.stderr)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--silence", type=float, default=0.5, help="end-of-command silence for both (s)")
    parser.add_argument("--peer-python", default="bench/.peer-venv/bin/python")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--home-assistant", action="store_true", help="measure in a real Home Assistant's Assist pipeline"
    )
    parser.add_argument("--clips", type=int, default=len(COMMANDS), help="how many of the spoken commands to use")
    parser.add_argument("--run-job", type=Path, help=argparse.SUPPRESS)  # the part that runs beside hass
    args = parser.parse_args()
    if args.run_job:
        run_job(args.run_job)
        return
    # Under /tmp: scripts/ha-run shares it with the end-to-end environment.
    work = Path(tempfile.mkdtemp(prefix="bench-eos-", dir="/tmp"))
    common = ["--compute-type", "int8", "--beam-size", "5", "--cpu-threads", str(args.threads), "--device", "cpu"]
    measure_both = in_home_assistant if args.home_assistant else over_wyoming
    figures_ours, figures_peer = measure_both(args, work, common)

    ratio = float(figures_ours["median_s"]) / float(figures_peer["median_s"])  # type: ignore[arg-type]
    print(f"median ratio ours/peer: {ratio:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    where = "home-assistant" if args.home_assistant else "wyoming"
    result = {"silence_s": args.silence, "model": args.model, "measured": where, "ours": figures_ours}
    result |= {"peer": figures_peer, "median_ratio": round(ratio, 3)}
    path = args.out / f"end-of-speech-{where}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
