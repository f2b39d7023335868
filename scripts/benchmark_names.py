"""Names of the home: how often Whisper spells them right with and without them in `transcript_names`.

Every clip is sent twice over Wyoming to one server, once with the home's names and once without, in alternating
order so that a busy machine slows both alike. Clips: the commands with unusual names of tests/data/names.json
(names from German, Finnish, Dutch, Irish, Japanese and Polish, spoken by espeak-ng in English voices, as a user
says them), the ordinary commands of the test suite, and the recorded speech of tests/data/recorded (people, not
commands: what the names do to other speech). Prints, both ways:

- the name error rate: the words of the names in a command that the transcript does not contain, spelled as the
  home spells them (case aside, accents counted);
- the word error rate after Whisper's English normalisation, on the commands with names and on the ordinary ones;
- names that appear in an ordinary command's transcript although nobody said them;
- the time from `audio-stop` to the transcript (median), and the share of requests redone in the full window.

    bench/run --names [--model base] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.server import ServerProcess, timed_transcript
from helpers.speech import COMMANDS, Utterance, recorded_set, synthesize

TEST_SET = Path(__file__).resolve().parents[1] / "tests" / "data" / "names.json"
VOICES = ("en-us+f2", "en-gb+m3", "en-us+m7")
normalize = EnglishTextNormalizer()


@dataclass(frozen=True)
class Clip:
    """One spoken command: the reference text, the names said in it, and 16 kHz mono PCM."""

    text: str
    names: tuple[str, ...]
    pcm: bytes


@dataclass
class Run:
    """Transcripts and latencies of one way of asking."""

    texts: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)


def name_words(text: str) -> list[str]:
    """Words as the home spells them: case folded, accents and apostrophes kept, other punctuation dropped."""
    return re.sub(r"[^\w']+", " ", text.casefold()).split()


def name_errors(clips: list[Clip], texts: list[str]) -> tuple[int, int]:
    """Words of the spoken names missing from the transcripts, and all such words."""
    missing = total = 0
    for clip, text in zip(clips, texts, strict=True):
        heard = set(name_words(text))
        for name in clip.names:
            words = name_words(name)
            total += len(words)
            missing += sum(word not in heard for word in words)
    return missing, total


def wer(clips: list[Clip], texts: list[str]) -> float:
    """Word error rate after Whisper's English normalisation."""
    return float(jiwer.wer([normalize(clip.text) for clip in clips], [normalize(text) or "-" for text in texts]))


def intruders(clips: list[Clip], texts: list[str], home: list[str]) -> list[str]:
    """Transcripts that contain a name of the home the speaker did not say."""

    def spaced(text: str) -> str:
        return f" {' '.join(name_words(text))} "

    found = []
    for clip, text in zip(clips, texts, strict=True):
        heard, said = spaced(text), spaced(clip.text)
        if any(spaced(name) in heard and spaced(name) not in said for name in home):
            found.append(f"{clip.text!r} -> {text!r}")
    return found


def fallbacks(server: ServerProcess) -> float:
    """Pieces redone in the full window so far (whisper_gpu_window_fallbacks_total)."""
    _, text = server.get("/metrics")
    match = re.search(r"^whisper_gpu_window_fallbacks_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def measure(port: int, server: ServerProcess, clips: list[Clip], home: list[str]) -> dict[str, Any]:
    """Every clip with and without the names, alternating which goes first; redo counts for each way."""
    without, with_names = Run(), Run()
    redone = {"without": 0.0, "with": 0.0}
    for index, clip in enumerate(clips):
        order = ((None, without, "without"), (home, with_names, "with"))
        for names, run, key in order if index % 2 == 0 else reversed(order):
            before = fallbacks(server)
            text, latency = await timed_transcript(port, clip.pcm, names=names)
            redone[key] += fallbacks(server) - before
            run.texts.append(text)
            run.latencies_ms.append(latency)
    return {"without": without, "with": with_names, "redone": redone}


def load_clips(directory: Path, voices: tuple[str, ...]) -> tuple[list[str], list[Clip], list[Clip], list[Clip]]:
    """The home's names, the commands with names and the ordinary commands in every voice, and recorded speech."""
    test_set = json.loads(TEST_SET.read_text(encoding="utf-8"))

    def spoken(text: str, say: str, names: tuple[str, ...], voice: str) -> Clip:
        pcm, _, _, _ = Utterance(text, synthesize(say, directory, voice=voice), clear=False).pcm()
        return Clip(text, names, pcm)

    named = [
        spoken(command["text"], command.get("say", command["text"]), tuple(command["names"]), voice)
        for voice in voices
        for command in test_set["commands"]
    ]
    ordinary = [spoken(text, text, (), voice) for voice in voices for text, _ in COMMANDS]
    recorded = [Clip(clip.text, (), clip.pcm()[0]) for clip in recorded_set(directory / "recorded")]
    return test_set["home"], named, ordinary, recorded


def report(label: str, clips: list[Clip], runs: dict[str, Any], home: list[str]) -> dict[str, Any]:
    """Figures of one set of clips, both ways."""
    figures: dict[str, Any] = {}
    for key in ("without", "with"):
        run: Run = runs[key]
        missing, total = name_errors(clips, run.texts)
        figures[key] = {
            "word_error_rate": round(wer(clips, run.texts), 4),
            "name_error_rate": round(missing / total, 4) if total else None,
            "median_ms": round(statistics.median(run.latencies_ms)),
            "mean_ms": round(statistics.fmean(run.latencies_ms)),
            "redone_share": round(runs["redone"][key] / len(clips), 3),
            "unspoken_names": intruders(clips, run.texts, home) if not total else [],
            "texts": run.texts,
        }
    print(f"\n{label} ({len(clips)} clips)")
    print(f"  {'':28}{'without names':>16}{'with names':>14}")
    rows = [
        ("word error rate", "word_error_rate"),
        ("name error rate", "name_error_rate"),
        ("audio-stop to text p50 (ms)", "median_ms"),
        ("audio-stop to text mean (ms)", "mean_ms"),
        ("redone in the full window", "redone_share"),
    ]
    for title, key in rows:
        if figures["without"][key] is not None:
            print(f"  {title:28}{figures['without'][key]:>16}{figures['with'][key]:>14}")
    for line in figures["with"]["unspoken_names"]:
        print(f"  with names, a name nobody said: {line}")
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", help="model the server loads (from the offline package)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--quick", action="store_true", help="one voice only")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    voices = VOICES[:1] if args.quick else VOICES
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        home, named, ordinary, recorded = load_clips(root / "speech", voices)
        server_args = [
            "--compute-type", "int8", "--beam-size", "5", "--cpu-threads", str(args.threads),
            "--device", "cpu", "--language", "en", "--partial-interval-s", "0", "--no-endpointing",
        ]  # fmt: skip
        server = ServerProcess(root / "data", model=args.model, args=server_args)
        server.start()
        try:
            print(f"model {args.model} int8, beam 5, {args.threads} threads; voices {', '.join(voices)}; "
                  f"{len(home)} names in the home")  # fmt: skip
            await timed_transcript(server.wyoming_port, named[0].pcm, names=home)  # the first request warms caches
            results = {
                "names": report(
                    "commands with names", named, await measure(server.wyoming_port, server, named, home), home
                ),
                "ordinary": report(
                    "ordinary commands", ordinary, await measure(server.wyoming_port, server, ordinary, home), home
                ),
                "recorded": report(
                    "recorded speech (not commands)",
                    recorded,
                    await measure(server.wyoming_port, server, recorded, home),
                    home,
                ),
            }
        finally:
            server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"names-{time.strftime('%Y%m%d-%H%M%S')}.json"
    summary = {"model": args.model, "threads": args.threads, "voices": list(voices), **results}
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
