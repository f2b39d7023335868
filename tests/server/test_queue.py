"""The bounded queue, through the real server and the Wyoming client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from helpers.server import ServerProcess, transcribe
from helpers.speech import Utterance
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcript
from wyoming.error import Error

normalize = EnglishTextNormalizer()


async def test_a_full_queue_answers_server_busy_at_once(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    """One request runs, one waits; the others arriving together are refused rather than queued."""
    server = start_server(args=["--compute-type", "int8", "--max-queue", "1", "--max-batch", "1"])
    audio, rate, width, channels = kitchen.pcm()
    answers = await asyncio.gather(*(transcribe(server.wyoming_port, audio, rate, width, channels) for _ in range(8)))
    busy = [Error.from_event(a) for a in answers if Error.is_type(a.type)]
    heard = [normalize(Transcript.from_event(a).text) for a in answers if Transcript.is_type(a.type)]
    assert busy, "eight requests at once with room for one waiting: some must be refused"
    assert {error.code for error in busy} == {"server_busy"}
    assert len(heard) >= 2, "the one running and the one waiting are answered"
    assert set(heard) == {"turn on the kitchen light"}
    _, metrics = server.get("/metrics")
    assert f"whisper_gpu_busy_rejections_total {float(len(busy))}" in metrics
