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
    start_server: Callable[..., ServerProcess], kitchen: Utterance, commands: list[Utterance]
) -> None:
    """One request runs, one waits; the others arriving together are refused rather than queued.

    The running one is long (every command of the set; no endpointing or partial text, the full window) and has
    started before the others arrive, so which one waits does not depend on how fast the machine picks up work.
    """
    server = start_server(
        args=[
            *("--compute-type", "int8", "--max-queue", "1", "--max-batch", "1"),
            *("--no-endpointing", "--partial-interval-s", "0", "--encoder-window-s", "30"),
        ]
    )
    long_audio = b"".join(utterance.pcm()[0] for utterance in commands)
    audio, rate, width, channels = kitchen.pcm()
    running = asyncio.create_task(transcribe(server.wyoming_port, long_audio, rate, width, channels))
    while server.get("/api/v1/status")[1]["requests"]["in_flight"] == 0:
        assert not running.done(), running.result()
        await asyncio.sleep(0.05)
    answers = await asyncio.gather(*(transcribe(server.wyoming_port, audio, rate, width, channels) for _ in range(7)))
    busy = [Error.from_event(a) for a in answers if Error.is_type(a.type)]
    heard = [normalize(Transcript.from_event(a).text) for a in answers if Transcript.is_type(a.type)]
    assert {error.code for error in busy} == {"server_busy"}
    assert (len(heard), len(busy)) == (1, 6), "room for one waiting: that one is answered, the others refused"
    assert set(heard) == {"turn on the kitchen light"}
    assert Transcript.is_type((await running).type)
    _, metrics = server.get("/metrics")
    assert f"whisper_gpu_busy_rejections_total {float(len(busy))}" in metrics
