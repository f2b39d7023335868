"""Load: many clients at once against a real server, each streaming a spoken command in real time.

Each client must get its transcript or a `server_busy` error; none may hang or be lost. Prints latency
percentiles, refusals and the word error rate; exits 1 when a client hung, was lost or got another error.

Usage: .venv/bin/python scripts/load.py [--clients 100] [--model tiny.en] [--compute-type int8]
       [--rounds 1] [-- extra server flags]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import jiwer
from helpers.load import run_load
from helpers.server import ServerProcess
from helpers.speech import command_set
from whisper_normalizer.english import EnglishTextNormalizer


def peak_memory_mb(server: ServerProcess) -> float:
    pid = server.process.pid if server.process else "self"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(args: argparse.Namespace) -> int:
    normalize = EnglishTextNormalizer()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        utterances = command_set(root / "speech")
        server = ServerProcess(
            root / "data", model=args.model, args=["--compute-type", args.compute_type, *args.server_args]
        )
        server.start()
        print(f"server: {args.model} ({args.compute_type}) {' '.join(args.server_args)}")
        failed = False
        try:
            for round_number in range(1, args.rounds + 1):
                report = await run_load(server.wyoming_port, utterances, args.clients)
                print(f"round {round_number}: {report.summary()}")
                heard = [result for result in report.results if result.outcome == "transcript"]
                if heard:
                    wer = jiwer.wer(
                        [normalize(result.utterance.text) for result in heard],
                        [normalize(result.text) or "-" for result in heard],
                    )
                    print(f"word error rate over the transcripts: {wer:.1%}")
                failed |= any(report.count(outcome) for outcome in ("hung", "lost", "error"))
            print(f"server peak resident memory: {peak_memory_mb(server):.0f} MB")
        finally:
            server.stop()
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("server_args", nargs="*", help="extra `whisper-gpu serve` flags, after --")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
