"""whisper-gpu against wyoming-faster-whisper 3.8.1, one after the other, on the same model files and settings.

Both servers get the same utterances over Wyoming. Prints a table and writes JSON and a PNG plot: latency from
`audio-stop` to `transcript` (p50/p95) for one client and for 4, 8 and 16 at once, throughput, the first request
after start, real-time factor, peak resident memory, word error rate after Whisper's English normalisation (for
each set of utterances), and for whisper-gpu where a request's time goes (from its `whisper_gpu_stage_seconds`
metric).

Utterances: Home Assistant commands spoken by espeak-ng in three voices, and 47 clips of recorded English speech
(tests/data/recorded, sources and licences in its SOURCES.md). Latency figures are over both sets together.
Run it through `bench/run`, which prepares the peer's own virtual environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import jiwer
from helpers.server import ServerProcess, free_port, timed_transcript
from helpers.speech import COMMANDS, Utterance, recorded_set, synthesize
from whisper_normalizer.english import EnglishTextNormalizer

VOICES = ("en-us+f2", "en-gb+m3", "en-us+m7")
SYNTHETIC, RECORDED = "espeak-ng", "recorded"
ALL = "both sets"  # one word error rate over every utterance
CONCURRENCY = (4, 8, 16)
normalize = EnglishTextNormalizer()


@dataclass
class Clip:
    """One utterance as raw 16 kHz mono PCM."""

    text: str
    kind: str
    """SYNTHETIC or RECORDED: word error rates are given for each."""
    pcm: bytes

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 32_000


@dataclass
class Figures:
    """What one server did."""

    name: str
    ready_s: float = 0.0
    first_ms: float = 0.0
    single: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    concurrent: dict[int, dict[str, float]] = field(default_factory=dict)
    rtf: float = 0.0
    wer: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    stages_ms: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "ready_s": round(self.ready_s, 2),
            "first_request_ms": round(self.first_ms),
            "warm_p50_ms": round(_pct(self.single, 50)),
            "warm_p95_ms": round(_pct(self.single, 95)),
            "concurrent": self.concurrent,
            "real_time_factor": round(self.rtf, 3),
            "word_error_rate": {kind: round(rate, 4) for kind, rate in self.wer.items()},
            "peak_rss_mb": round(self.peak_rss_mb),
            "stages_ms": self.stages_ms,
            "texts": self.texts,
        }


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def drive(
    port: int, clips: list[Clip], figures: Figures, rounds: int, after_single: Callable[[], None] = lambda: None
) -> None:
    """First request, then every clip one at a time, then each concurrency level."""
    _, figures.first_ms = await timed_transcript(port, clips[0].pcm)
    for clip in clips:
        text, latency = await timed_transcript(port, clip.pcm)
        figures.texts.append(text)
        figures.single.append(latency)
    after_single()
    figures.rtf = statistics.median(lat / 1000 / clip.seconds for lat, clip in zip(figures.single, clips, strict=True))
    for kind in (SYNTHETIC, RECORDED, ALL):
        pairs = [(c.text, t) for c, t in zip(clips, figures.texts, strict=True) if kind in (c.kind, ALL)]
        if pairs:
            figures.wer[kind] = jiwer.wer([normalize(ref) for ref, _ in pairs], [normalize(t) or "-" for _, t in pairs])
    for clients in CONCURRENCY:
        latencies: list[float] = []

        async def client(offset: int, clients: int = clients, latencies: list[float] = latencies) -> None:
            for step in range(rounds):
                _, latency = await timed_transcript(port, clips[(offset + step * clients) % len(clips)].pcm)
                latencies.append(latency)

        begun = time.perf_counter()
        await asyncio.gather(*(client(offset) for offset in range(clients)))
        elapsed = time.perf_counter() - begun
        figures.concurrent[clients] = {
            "p50_ms": round(_pct(latencies, 50)),
            "p95_ms": round(_pct(latencies, 95)),
            "requests_per_s": round(len(latencies) / elapsed, 2),
        }


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a running process."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def stage_sums(server: ServerProcess) -> dict[str, tuple[float, float]]:
    _, text = server.get("/metrics")
    sums: dict[str, tuple[float, float]] = {}
    for kind, stage, value in re.findall(r'whisper_gpu_stage_seconds_(sum|count)\{stage="(\w+)"\} (\S+)', text):
        total, count = sums.get(stage, (0.0, 0.0))
        sums[stage] = (float(value), count) if kind == "sum" else (total, float(value))
    return sums


async def bench_ours(args: argparse.Namespace, model_dir: Path, data: Path, clips: list[Clip]) -> Figures:
    figures = Figures("whisper-gpu")
    server_args = [
        "--compute-type", "int8", "--beam-size", "5", "--cpu-threads", str(args.threads),
        "--device", "cpu", "--language", "en",
    ]  # fmt: skip
    server = ServerProcess(data, model=str(model_dir), args=server_args)
    started = time.perf_counter()
    server.start()
    figures.ready_s = time.perf_counter() - started
    try:
        before = stage_sums(server)

        def stages_of_single_client() -> None:
            for stage, (total, count) in stage_sums(server).items():
                old_total, old_count = before.get(stage, (0.0, 0.0))
                if count > old_count:
                    figures.stages_ms[stage] = round((total - old_total) / (count - old_count) * 1000, 1)

        await drive(server.wyoming_port, clips, figures, args.rounds, stages_of_single_client)
        if server.process is not None:
            figures.peak_rss_mb = peak_rss_mb(server.process.pid)
    finally:
        server.stop()
    return figures


async def bench_peer(args: argparse.Namespace, model_dir: Path, data: Path, clips: list[Clip]) -> Figures:
    figures = Figures("wyoming-faster-whisper 3.8.1")
    port = free_port()
    command = [
        args.peer_python, "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{port}",
        "--model", str(model_dir), "--stt-library", "faster-whisper", "--data-dir", str(data),
        "--download-dir", str(data), "--local-files-only", "--device", "cpu", "--compute-type", "int8",
        "--beam-size", "5", "--cpu-threads", str(args.threads), "--language", "en",
    ]  # fmt: skip
    data.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before the clock starts
    with (data / "peer.log").open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        try:
            while True:
                if process.poll() is not None:
                    msg = f"the peer exited; see {data / 'peer.log'}"
                    raise RuntimeError(msg)
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    await asyncio.sleep(0.2)
            figures.ready_s = time.perf_counter() - started
            await drive(port, clips, figures, args.rounds)
            figures.peak_rss_mb = peak_rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return figures


def table(ours: Figures, peer: Figures) -> str:
    rows = [("", ours.name, peer.name, "ours/peer")]

    def row(label: str, a: float, b: float, unit: str = "") -> None:
        rows.append((label, f"{a:g}{unit}", f"{b:g}{unit}", f"{a / b:.2f}x" if b else "-"))

    row("ready after start (s)", round(ours.ready_s, 1), round(peer.ready_s, 1))
    row("first request (ms)", round(ours.first_ms), round(peer.first_ms))
    row("1 client p50 (ms)", round(_pct(ours.single, 50)), round(_pct(peer.single, 50)))
    row("1 client p95 (ms)", round(_pct(ours.single, 95)), round(_pct(peer.single, 95)))
    for clients in CONCURRENCY:
        a, b = ours.concurrent[clients], peer.concurrent[clients]
        row(f"{clients} clients p50 (ms)", a["p50_ms"], b["p50_ms"])
        row(f"{clients} clients p95 (ms)", a["p95_ms"], b["p95_ms"])
        row(f"{clients} clients throughput (req/s)", a["requests_per_s"], b["requests_per_s"])
    row("real-time factor (p50)", round(ours.rtf, 3), round(peer.rtf, 3))
    row("peak resident memory (MB)", round(ours.peak_rss_mb), round(peer.peak_rss_mb))
    for kind in (k for k in (SYNTHETIC, RECORDED, ALL) if k in ours.wer or k in peer.wer):
        row(f"word error rate, {kind}", round(ours.wer.get(kind, 0), 4), round(peer.wer.get(kind, 0), 4))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)) for r in rows]
    stages = ", ".join(f"{stage} {ms:g} ms" for stage, ms in ours.stages_ms.items())
    return "\n".join([*lines, f"whisper-gpu, mean per request (1 client): {stages}"])


def plot(ours: Figures, peer: Figures, path: Path) -> None:
    import matplotlib as mpl  # noqa: PLC0415 - only the benchmark needs it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    levels = [1, *CONCURRENCY]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for figures, colour in ((ours, "tab:green"), (peer, "tab:grey")):
        p50 = [_pct(figures.single, 50)] + [figures.concurrent[c]["p50_ms"] for c in CONCURRENCY]
        p95 = [_pct(figures.single, 95)] + [figures.concurrent[c]["p95_ms"] for c in CONCURRENCY]
        latency.plot(levels, p50, marker="o", color=colour, label=f"{figures.name} p50")
        latency.plot(levels, p95, marker="x", linestyle="--", color=colour, label=f"{figures.name} p95")
        throughput.plot(
            CONCURRENCY, [figures.concurrent[c]["requests_per_s"] for c in CONCURRENCY], marker="o", color=colour
        )
    latency.set(xlabel="concurrent clients", ylabel="audio-stop to transcript (ms)", xticks=levels)
    latency.legend(fontsize="small")
    throughput.set(xlabel="concurrent clients", ylabel="requests per second", xticks=list(CONCURRENCY))
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def make_clips(directory: Path, quick: bool) -> list[Clip]:
    """The commands in each voice, then the recorded clips (all of them, --quick or not)."""
    utterances = [
        (SYNTHETIC, Utterance(text, synthesize(text, directory, voice=voice), clear=False))
        for voice in (VOICES[:1] if quick else VOICES)
        for text, _ in COMMANDS
    ]
    utterances += [(RECORDED, utterance) for utterance in recorded_set(directory / "recorded")]
    return [Clip(utterance.text, kind, utterance.pcm()[0]) for kind, utterance in utterances]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", help="model both servers load (from the offline package)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client at each concurrency level")
    parser.add_argument("--quick", action="store_true", help="one voice only")
    parser.add_argument("--only", choices=("ours", "peer"), help="run one server (for development)")
    parser.add_argument("--peer-python", default="bench/.peer-venv/bin/python")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    from whisper_gpu.models import ModelCache  # noqa: PLC0415 - the server's own cache assembles the model

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model_dir = ModelCache(root / "models").ensure(args.model, offline=True)
        clips = make_clips(root / "speech", args.quick)
        print(f"{len(clips)} utterances, {sum(c.seconds for c in clips):.0f} s; model {args.model} int8, beam 5, "
              f"{args.threads} threads; model files {model_dir}")  # fmt: skip
        empty = Figures("-")
        ours = await bench_ours(args, model_dir, root / "ours", clips) if args.only != "peer" else empty
        peer = await bench_peer(args, model_dir, root / "peer", clips) if args.only != "ours" else empty
    for figures in (ours, peer):
        figures.concurrent = figures.concurrent or {
            c: {"p50_ms": 0, "p95_ms": 0, "requests_per_s": 0} for c in CONCURRENCY
        }
    print(table(ours, peer))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {
        "utterances": "espeak-ng commands, voices "
        + ", ".join(VOICES[:1] if args.quick else VOICES)
        + "; recorded speech, tests/data/recorded",
        "model": args.model,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "ours": ours.summary(),
        "peer": peer.summary(),
    }
    report = json.dumps(result, indent=2) + "\n"
    (args.out / f"bench-{stamp}.json").write_text(report, encoding="utf-8")
    plot(ours, peer, args.out / f"bench-{stamp}.png")
    print(f"wrote {args.out}/bench-{stamp}.json and .png")


if __name__ == "__main__":
    asyncio.run(main())
