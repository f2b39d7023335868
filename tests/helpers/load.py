"""Many Wyoming clients at once, each streaming a spoken command in real time the way a satellite does."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event

from .server import STREAMING_EVENT
from .speech import Utterance

CHUNK_FRAMES = 1024  # 64 ms at 16 kHz, about what Home Assistant sends
REFUSALS = ("server_busy",)


@dataclass
class ClientResult:
    """What one client got: a transcript, an error code, or nothing (hung or lost)."""

    utterance: Utterance
    outcome: str  # "transcript", "refused", "error", "hung", "lost"
    text: str = ""
    code: str = ""
    latency_s: float = 0.0  # from audio-stop (or the refusal's arrival) to the answer


@dataclass
class LoadReport:
    """All clients of one run."""

    results: list[ClientResult] = field(default_factory=list)
    wall_s: float = 0.0

    def count(self, outcome: str) -> int:
        """Clients with this outcome."""
        return sum(result.outcome == outcome for result in self.results)

    def latencies(self) -> list[float]:
        """Seconds from audio-stop to transcript, sorted."""
        return sorted(result.latency_s for result in self.results if result.outcome == "transcript")

    def summary(self) -> str:
        """One paragraph of figures."""
        latencies = self.latencies()
        lines = [
            (
                f"{len(self.results)} clients in {self.wall_s:.1f} s: {self.count('transcript')} transcripts, "
                f"{self.count('refused')} refused (server_busy), {self.count('error')} other errors, "
                f"{self.count('hung')} hung, {self.count('lost')} lost"
            ),
        ]
        if latencies:
            lines.append(
                "latency audio-stop -> transcript: "
                f"p50 {percentile(latencies, 50):.2f} s, p95 {percentile(latencies, 95):.2f} s, "
                f"p99 {percentile(latencies, 99):.2f} s, max {latencies[-1]:.2f} s"
            )
        errors = sorted({result.code for result in self.results if result.outcome in ("refused", "error")})
        if errors:
            lines.append(f"error codes: {', '.join(errors)}")
        return "\n".join(lines)


def percentile(ordered: list[float], percent: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


async def one_client(port: int, utterance: Utterance, answer_timeout_s: float) -> ClientResult:
    """Stream one command in real time, then wait for the answer; a refusal may come at any point."""
    audio, rate, width, channels = utterance.pcm()
    step = CHUNK_FRAMES * width * channels
    client = AsyncTcpClient("127.0.0.1", port)
    try:
        await client.connect()
        reading = asyncio.create_task(_answer(client))
        try:
            await client.write_event(Transcribe().event())
            await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
            begun = time.monotonic()
            for number, start in enumerate(range(0, len(audio), step)):
                if reading.done():
                    break  # answered early: refused
                chunk = AudioChunk(rate=rate, width=width, channels=channels, audio=audio[start : start + step])
                await client.write_event(chunk.event())
                # Real time: chunk n is sent when its audio would have been spoken.
                await asyncio.sleep(max(0.0, begun + (number + 1) * CHUNK_FRAMES / rate - time.monotonic()))
            if not reading.done():
                await client.write_event(AudioStop().event())
        except ConnectionError:
            pass  # the server closed after a refusal: its error event is still to be read
        stopped = time.monotonic()
        try:
            event = await asyncio.wait_for(reading, timeout=answer_timeout_s)
        except TimeoutError:
            return ClientResult(utterance, "hung")
        latency = time.monotonic() - stopped
    except (ConnectionError, asyncio.IncompleteReadError):
        return ClientResult(utterance, "lost")
    finally:
        with contextlib.suppress(ConnectionError):
            await client.disconnect()
    if event is None:
        return ClientResult(utterance, "lost")
    if Transcript.is_type(event.type):
        return ClientResult(utterance, "transcript", text=Transcript.from_event(event).text, latency_s=latency)
    if Error.is_type(event.type):
        code = Error.from_event(event).code or ""
        return ClientResult(utterance, "refused" if code in REFUSALS else "error", code=code, latency_s=latency)
    return ClientResult(utterance, "error", code=f"unexpected {event.type}")


async def _answer(client: AsyncTcpClient) -> Event | None:
    """The transcript or error, past the streaming events before it (transcript-start, transcript-chunk)."""
    while (event := await client.read_event()) is not None:
        if not STREAMING_EVENT.match(event.type):
            return event
    return None


async def run_load(port: int, utterances: list[Utterance], clients: int, answer_timeout_s: float = 300.0) -> LoadReport:
    """`clients` clients that all start at once, cycling through the utterances."""
    started = time.monotonic()
    results = await asyncio.gather(
        *(one_client(port, utterances[number % len(utterances)], answer_timeout_s) for number in range(clients))
    )
    return LoadReport(list(results), time.monotonic() - started)
