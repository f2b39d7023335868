"""Parking the model when idle (KEEP_ALIVE_S, the park and restore actions) with the real model on the CPU.

On a CPU a parked model is unloaded completely and read from disk again; moving weights to host memory
(`park_mode: host_memory`) applies to GPUs only, which this machine has none of.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jiwer
import numpy as np
import pytest
from helpers.server import TOKEN, ServerProcess, read_answer, transcribe
from helpers.speech import Utterance
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient

normalize = EnglishTextNormalizer()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = ["--compute-type", "int8"]
# tiny.en's int8 weights are about 40 MB (loaded twice on two cores: the workers' copy and a lone request's
# encoder's); what an unload gives back is less than the whole process.
RSS_DROP_MB = 25
KEEP_ALIVE_S = 1.0
MAX_WORD_ERROR_RATE = 0.25


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def call(
    http: aiohttp.ClientSession, server: ServerProcess, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, server.control_url + path, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body


async def status_of(http: aiohttp.ClientSession, server: ServerProcess) -> dict[str, Any]:
    _, body = await call(http, server, "GET", "/api/v1/status")
    return body  # type: ignore[no-any-return]


async def wait_for(
    http: aiohttp.ClientSession, server: ServerProcess, done: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = await status_of(http, server)
        if done(status):
            return status
        await asyncio.sleep(0.05)
    pytest.fail(f"status never reached the expected state: {status}")


async def metric(http: aiohttp.ClientSession, server: ServerProcess, name: str) -> float:
    _, text = await call(http, server, "GET", "/metrics")
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def rss_mb(server: ServerProcess) -> float:
    """The server process's resident memory."""
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.fail("no VmRSS")


async def say(server: ServerProcess, utterance: Utterance) -> str:
    audio, rate, width, channels = utterance.pcm()
    event = await transcribe(server.wyoming_port, audio, rate, width, channels)
    assert Transcript.is_type(event.type), event
    return normalize(Transcript.from_event(event).text)


def parked(status: dict[str, Any]) -> bool:
    return status["state"] == "parked" and status["parking"]["resident"] is False


def resident(status: dict[str, Any]) -> bool:
    return status["state"] == "ready" and status["parking"]["resident"] is True


async def test_an_idle_model_is_parked_and_the_next_request_brings_it_back(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance
) -> None:
    server = start_server(args=TINY)
    assert await say(server, kitchen) == normalize(kitchen.text)
    loaded_mb = rss_mb(server)
    status, body = await call(http, server, "PATCH", "/api/v1/settings", json={"keep_alive_s": 3}, headers=AUTH)
    assert (status, body["changed"]) == (200, ["keep_alive_s"])
    # Requests closer together than the idle time keep it resident: the timer restarts on each.
    for _ in range(3):
        await asyncio.sleep(1.5)
        assert await say(server, kitchen) == normalize(kitchen.text)
    assert resident(await status_of(http, server))
    assert await metric(http, server, 'whisper_gpu_model_parks_total{trigger="idle"}') == 0

    idle = await wait_for(http, server, parked, timeout=30)
    assert idle["parking"]["parked_at"] is not None
    assert idle["model"]["name"] == "tiny.en"
    assert loaded_mb - rss_mb(server) > RSS_DROP_MB
    status, ready = await call(http, server, "GET", "/readyz")
    assert (status, ready) == (200, {"status": "ready", "model": "tiny.en", "state": "parked"})
    assert await metric(http, server, "whisper_gpu_model_resident") == 0
    assert await metric(http, server, 'whisper_gpu_model_parks_total{trigger="idle"}') == 1

    assert await say(server, kitchen) == normalize(kitchen.text)
    back = await status_of(http, server)
    assert resident(back)
    assert back["parking"]["last_restore"]["trigger"] == "request"
    assert back["parking"]["last_restore"]["seconds"] > 0
    assert await metric(http, server, "whisper_gpu_model_resident") == 1
    assert await metric(http, server, 'whisper_gpu_model_restores_total{trigger="request"}') == 1
    assert await metric(http, server, "whisper_gpu_model_restore_duration_seconds_count") == 1
    # Idle again, it is parked again.
    await wait_for(http, server, parked, timeout=30)
    assert await metric(http, server, 'whisper_gpu_model_parks_total{trigger="idle"}') == 2


async def test_audio_start_brings_the_model_back_while_the_audio_still_arrives(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance
) -> None:
    server = start_server(args=TINY)
    status, _ = await call(http, server, "POST", "/api/v1/model/park", headers=AUTH)
    assert status == 200
    audio, rate, width, channels = kitchen.pcm()
    async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        # No audio yet: the model comes back all the same.
        restored = await wait_for(
            http, server, lambda status: resident(status) and status["parking"]["last_restore"], timeout=30
        )
        assert restored["parking"]["last_restore"]["trigger"] == "request"
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
        await client.write_event(AudioStop().event())
        answer = await read_answer(client)
    assert Transcript.is_type(answer.type), answer
    assert normalize(Transcript.from_event(answer).text) == normalize(kitchen.text)
    assert await metric(http, server, 'whisper_gpu_model_restores_total{trigger="request"}') == 1


async def test_requests_arriving_during_a_restore_wait_for_it_and_share_it(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, commands: list[Utterance]
) -> None:
    server = start_server(args=TINY)
    status, _ = await call(http, server, "POST", "/api/v1/model/park", headers=AUTH)
    assert status == 200
    clear = [utterance for utterance in commands if utterance.clear][:4]
    # Sent at once, whole: each transcription is ready to run while the first request's restore is under way.
    heard = await asyncio.gather(*(say(server, utterance) for utterance in clear))
    assert heard == [normalize(utterance.text) for utterance in clear]
    assert await metric(http, server, 'whisper_gpu_model_restores_total{trigger="request"}') == 1
    assert 'whisper_gpu_requests_total{outcome="ok"} 4.0' in (await call(http, server, "GET", "/metrics"))[1]


async def test_the_park_and_restore_actions_need_the_token_and_free_memory(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance
) -> None:
    server = start_server(args=TINY)
    assert await say(server, kitchen) == normalize(kitchen.text)
    for action in ("park", "restore"):
        status, body = await call(http, server, "POST", f"/api/v1/model/{action}")
        assert (status, body) == (401, {"error": "unauthorized"})
        status, body = await call(
            http, server, "POST", f"/api/v1/model/{action}", headers={"Authorization": "Bearer wrong"}
        )
        assert status == 401
    assert resident(await status_of(http, server))

    loaded_mb = rss_mb(server)
    status, body = await call(http, server, "POST", "/api/v1/model/park", headers=AUTH)
    assert status == 200
    assert parked(body)
    parked_mb = rss_mb(server)
    assert loaded_mb - parked_mb > RSS_DROP_MB
    assert await metric(http, server, 'whisper_gpu_model_parks_total{trigger="control"}') == 1
    status, again = await call(http, server, "POST", "/api/v1/model/park", headers=AUTH)
    assert (status, again["state"]) == (200, "parked")
    assert await metric(http, server, 'whisper_gpu_model_parks_total{trigger="control"}') == 1

    status, body = await call(http, server, "POST", "/api/v1/model/restore", headers=AUTH)
    assert status == 200
    assert resident(body)
    assert body["parking"]["last_restore"]["trigger"] == "control"
    # The weights are back; the buffers of a full-window decode come with the first request that needs them.
    assert rss_mb(server) - parked_mb > RSS_DROP_MB
    status, again = await call(http, server, "POST", "/api/v1/model/restore", headers=AUTH)
    assert (status, again["state"]) == (200, "ready")
    assert await metric(http, server, 'whisper_gpu_model_restores_total{trigger="control"}') == 1
    assert await say(server, kitchen) == normalize(kitchen.text)


async def test_a_park_waits_for_the_transcription_in_flight(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, commands: list[Utterance]
) -> None:
    """A park asked for while a long transcription runs answers after it; the transcription is not cut."""
    server = start_server(args=TINY)
    clear = [utterance for utterance in commands if utterance.clear]
    pieces = [np.frombuffer(utterance.pcm()[0], dtype="<i2") for utterance in clear]
    long_audio = np.concatenate(pieces).tobytes()
    expected = normalize(" ".join(utterance.text for utterance in clear))
    finished: dict[str, float] = {}

    async def long_request() -> str:
        event = await transcribe(server.wyoming_port, long_audio, language="en")
        finished["transcript"] = time.monotonic()
        assert Transcript.is_type(event.type), event
        return normalize(Transcript.from_event(event).text)

    talking = asyncio.create_task(long_request())
    await wait_for(http, server, lambda status: status["requests"]["in_flight"] == 1, timeout=30)
    status, body = await call(http, server, "POST", "/api/v1/model/park", headers=AUTH)
    finished["park"] = time.monotonic()
    assert status == 200
    assert parked(body)
    heard = await talking
    assert finished["transcript"] <= finished["park"]
    # Every sentence is there: the model was not taken away mid-way.
    assert heard.split() == expected.split()
    assert (await status_of(http, server))["requests"]["total"] == 1


async def test_a_model_switch_while_parked_serves_the_new_model(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, kitchen: Utterance
) -> None:
    server = start_server(args=TINY)
    status, _ = await call(http, server, "POST", "/api/v1/model/park", headers=AUTH)
    assert status == 200
    status, body = await call(http, server, "PATCH", "/api/v1/settings", json={"compute_type": "float32"}, headers=AUTH)
    assert (status, body["reload"]) == (200, True)
    status, body = await call(http, server, "POST", "/api/v1/model/park", headers=AUTH)
    assert (status, body["error"]) == (409, "reload_in_progress")
    switched = await wait_for(
        http, server, lambda status: status["model"]["compute_type"] == "float32" and status["target"] is None
    )
    assert resident(switched)
    assert await say(server, kitchen) == normalize(kitchen.text)
    assert await metric(http, server, "whisper_gpu_model_resident") == 1


async def test_parking_settings_are_checked(whisper_server: ServerProcess, http: aiohttp.ClientSession) -> None:
    for change, code in (
        ({"keep_alive_s": -1}, "out_of_range"),
        ({"keep_alive_s": "soon"}, "invalid_value"),
        ({"park_mode": "swap"}, "invalid_value"),
    ):
        status, body = await call(http, whisper_server, "PATCH", "/api/v1/settings", json=change, headers=AUTH)
        assert (status, body) == (400, {"errors": {next(iter(change)): code}})
    _, info = await call(http, whisper_server, "GET", "/api/v1/info")
    assert info["settings"]["keep_alive_s"]["default"] == 0
    assert info["settings"]["park_mode"]["choices"] == ["host_memory", "unload"]


async def test_the_idle_timer_never_parks_a_transcription_in_flight(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, commands: list[Utterance]
) -> None:
    """With an idle time shorter than a long transcription, no park is even asked for while it runs.

    One thread and no live transcripts make the transcription one long job; the idle time starts after it.
    """
    one_long_job = [
        *("--cpu-threads", "1", "--beam-size", "10", "--encoder-window-s", "30"),
        *("--no-endpointing", "--partial-interval-s", "0"),
    ]
    server = start_server(args=[*TINY, "--keep-alive-s", str(KEEP_ALIVE_S), *one_long_job])
    await wait_for(http, server, parked, timeout=30)
    # Brought back first, so that the transcription's job starts at once and the idle time runs out during it.
    status, _ = await call(http, server, "POST", "/api/v1/model/restore", headers=AUTH)
    assert status == 200
    long_audio = np.concatenate([np.frombuffer(utterance.pcm()[0], dtype="<i2") for utterance in commands]).tobytes()
    started = time.monotonic()
    event = await transcribe(server.wyoming_port, long_audio, language="en")
    took = time.monotonic() - started
    assert Transcript.is_type(event.type), event
    # Every command is there (tiny.en mishears a few words of the less clear ones): nothing was cut off.
    reference = normalize(" ".join(utterance.text for utterance in commands))
    assert jiwer.wer(reference, normalize(Transcript.from_event(event).text)) < MAX_WORD_ERROR_RATE
    assert took > 1.2 * KEEP_ALIVE_S, "the request outlasted the idle time"
    # Only the park before the request: none asked for while it ran (it would follow right after the job).
    await asyncio.sleep(KEEP_ALIVE_S / 3)
    assert resident(await status_of(http, server))
    assert await metric(http, server, 'whisper_gpu_model_parks_total{trigger="idle"}') == 1
    await wait_for(http, server, parked, timeout=30)
    assert await metric(http, server, 'whisper_gpu_model_parks_total{trigger="idle"}') == 2
