"""Latency and throughput of a real server on this machine: prints figures, asserts nothing.

Usage: .venv/bin/python scripts/benchmark.py [--model base] [--compute-type int8] [--beam-size 5]
       [--requests 20] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers.server import ServerProcess, transcribe
from helpers.speech import Utterance, synthesize

COMMAND = "turn off the living room lights"  # about 2 s of speech


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        utterance = Utterance(COMMAND, synthesize(COMMAND, root / "speech"), clear=True)
        audio, rate, width, channels = utterance.pcm()
        server_args = ["--compute-type", args.compute_type, "--beam-size", str(args.beam_size)]
        server = ServerProcess(root / "data", model=args.model, args=server_args)
        started = time.monotonic()
        server.start()
        ready_s = time.monotonic() - started
        print(f"model {args.model} ({args.compute_type}, beam {args.beam_size}): ready in {ready_s:.1f} s")
        print(f"command: {utterance.seconds():.2f} s of speech")
        try:
            latencies = []
            for _ in range(args.requests):
                begun = time.monotonic()
                await transcribe(server.wyoming_port, audio, rate, width, channels, chunk_frames=10_000_000)
                latencies.append(time.monotonic() - begun)
            latencies.sort()
            p50 = statistics.median(latencies)
            p90 = latencies[int(0.9 * (len(latencies) - 1))]
            print(
                f"sequential, {args.requests} requests: p50 {p50 * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms, "
                f"real-time factor {p50 / utterance.seconds():.2f}"
            )

            begun = time.monotonic()
            total = args.requests
            per_client = total // args.concurrency

            async def client() -> None:
                for _ in range(per_client):
                    await transcribe(server.wyoming_port, audio, rate, width, channels, chunk_frames=10_000_000)

            await asyncio.gather(*(client() for _ in range(args.concurrency)))
            elapsed = time.monotonic() - begun
            done = per_client * args.concurrency
            print(
                f"{args.concurrency} concurrent clients, {done} requests: {done / elapsed:.2f} requests/s, "
                f"{done * utterance.seconds() / elapsed:.1f} s of audio per second"
            )
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
