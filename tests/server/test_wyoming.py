"""The Wyoming side, driven by the `wyoming` library's client against the real server and model."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jiwer
import pytest
from helpers.server import ServerProcess, transcribe
from helpers.speech import Utterance, raw_pcm, synthesize
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info

normalize = EnglishTextNormalizer()
# tiny.en on synthetic speech: the base model's accuracy is tested in test_accuracy.py.
MAX_TINY_WORD_ERROR_RATE = 0.25


def heard(event: Event) -> str:
    assert Transcript.is_type(event.type), f"expected a transcript, got {event}"
    return normalize(Transcript.from_event(event).text)


def error_code(event: Event | None) -> str | None:
    assert event is not None, "the server closed the connection without an error event"
    assert Error.is_type(event.type), f"expected an error, got {event}"
    return Error.from_event(event).code


async def raw_exchange(port: int, data: bytes) -> list[Event]:
    """Write raw bytes and read events until the server closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    events = []
    client = AsyncTcpClient("127.0.0.1", port)
    client._reader, client._writer = reader, writer
    while True:
        try:
            event = await asyncio.wait_for(client.read_event(), timeout=5)
        except TimeoutError:
            break
        if event is None:
            break
        events.append(event)
    writer.close()
    return events


def metric(server: ServerProcess, name: str, labels: str = "") -> float:
    _, text = server.get("/metrics")
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_describe_announces_an_asr_program_with_the_model(whisper_server: ServerProcess) -> None:
    async with AsyncTcpClient("127.0.0.1", whisper_server.wyoming_port) as client:
        await client.write_event(Describe().event())
        event = await client.read_event()
    assert event is not None
    info = Info.from_event(event)
    assert len(info.asr) == 1
    program = info.asr[0]
    assert program.name == "whisper-gpu"
    assert program.installed
    assert program.requires_external_vad is True
    assert program.version
    assert [model.name for model in program.models] == ["tiny.en"]
    assert program.models[0].languages == ["en"]


async def test_transcribes_a_spoken_command(whisper_server: ServerProcess, kitchen: Utterance) -> None:
    audio, rate, width, channels = kitchen.pcm()
    event = await transcribe(whisper_server.wyoming_port, audio, rate, width, channels)
    assert heard(event) == normalize(kitchen.text)
    assert Transcript.from_event(event).language == "en"


@pytest.mark.parametrize(
    ("rate", "channels", "width"),
    [(8_000, 2, 2), (44_100, 1, 4), (22_050, 1, 1), (48_000, 2, 2)],
    ids=["8kHz-stereo-16bit", "44kHz-mono-32bit", "22kHz-mono-8bit", "48kHz-stereo-16bit"],
)
async def test_converts_any_pcm_format(
    whisper_server: ServerProcess, speech_dir: Path, rate: int, channels: int, width: int
) -> None:
    text = "turn on the kitchen light"
    path = synthesize(text, speech_dir, rate=rate, channels=channels, width=width)
    audio = raw_pcm(path, rate=rate, channels=channels, width=width)
    event = await transcribe(whisper_server.wyoming_port, audio, rate, width, channels)
    assert heard(event) == normalize(text)


async def test_several_requests_on_one_connection(whisper_server: ServerProcess, commands: list[Utterance]) -> None:
    chosen = [utterance for utterance in commands if utterance.clear][:3]
    async with AsyncTcpClient("127.0.0.1", whisper_server.wyoming_port) as client:
        for utterance in chosen:
            audio, rate, width, channels = utterance.pcm()
            await client.write_event(Transcribe(language="en").event())
            await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
            await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
            await client.write_event(AudioStop().event())
            event = await client.read_event()
            assert event is not None
            assert heard(event) == normalize(utterance.text)


async def test_eight_concurrent_clients_each_get_their_own_transcript(
    whisper_server: ServerProcess, commands: list[Utterance]
) -> None:
    chosen = commands[:8]

    async def one(utterance: Utterance) -> str:
        audio, rate, width, channels = utterance.pcm()
        return heard(await transcribe(whisper_server.wyoming_port, audio, rate, width, channels))

    alone = [await one(utterance) for utterance in chosen]
    together = await asyncio.gather(*(one(utterance) for utterance in chosen))
    assert together == alone
    assert len(set(together)) == 8
    assert jiwer.wer([normalize(utterance.text) for utterance in chosen], together) <= MAX_TINY_WORD_ERROR_RATE


async def test_silence_gives_an_empty_transcript(whisper_server: ServerProcess) -> None:
    silence = bytes(16_000 * 2 * 2)
    event = await transcribe(whisper_server.wyoming_port, silence)
    assert Transcript.from_event(event).text == ""


@pytest.mark.parametrize("language", ["en", "en-US", "en_GB", "EN"])
async def test_a_request_language_as_code_or_locale_is_accepted(
    whisper_server: ServerProcess, kitchen: Utterance, language: str
) -> None:
    audio, rate, width, channels = kitchen.pcm()
    event = await transcribe(whisper_server.wyoming_port, audio, rate, width, channels, language=language)
    assert heard(event) == normalize(kitchen.text)


@pytest.mark.parametrize("language", ["de", "xx", "de-DE"])
async def test_a_language_the_model_cannot_speak_is_refused(
    whisper_server: ServerProcess, kitchen: Utterance, language: str
) -> None:
    audio, rate, width, channels = kitchen.pcm()
    event = await transcribe(whisper_server.wyoming_port, audio, rate, width, channels, language=language)
    assert error_code(event) == "unsupported_language"
    assert language.partition("-")[0] in Error.from_event(event).text


@pytest.mark.parametrize(
    ("audio_format", "problem"),
    [
        ({"rate": 0, "width": 2, "channels": 1}, "rate"),
        ({"rate": 16000, "width": 3, "channels": 1}, "width"),
        ({"rate": 16000, "width": 2, "channels": 0}, "channels"),
        ({"rate": 16000, "width": 2}, "channels"),
    ],
    ids=["rate-0", "width-3", "no-channels", "channels-missing"],
)
async def test_invalid_audio_format_is_refused_and_the_connection_stays_usable(
    whisper_server: ServerProcess, kitchen: Utterance, audio_format: dict[str, int], problem: str
) -> None:
    audio, rate, width, channels = kitchen.pcm()
    async with AsyncTcpClient("127.0.0.1", whisper_server.wyoming_port) as client:
        await client.write_event(Transcribe().event())
        await client.write_event(Event("audio-start", data=audio_format))
        event = await client.read_event()
        assert error_code(event) == "invalid_audio_format"
        assert event is not None
        assert problem in Error.from_event(event).text
        # The rest of the refused request is dropped; the next request on the connection works.
        await client.write_event(Event("audio-chunk", data=audio_format, payload=b"\x00\x01" * 100))
        await client.write_event(AudioStop().event())
        await client.write_event(Transcribe().event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
        await client.write_event(AudioStop().event())
        assert heard(await client.read_event()) == normalize(kitchen.text)


async def test_audio_chunk_without_audio_start_is_an_error_not_a_crash(
    whisper_server: ServerProcess, kitchen: Utterance
) -> None:
    audio, rate, width, channels = kitchen.pcm()
    async with AsyncTcpClient("127.0.0.1", whisper_server.wyoming_port) as client:
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio[:2048]).event())
        assert error_code(await client.read_event()) == "audio_chunk_without_start"
        await client.write_event(AudioStop().event())
        assert error_code(await client.read_event()) == "audio_stop_without_start"
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
        await client.write_event(AudioStop().event())
        assert heard(await client.read_event()) == normalize(kitchen.text)


async def test_a_chunk_of_partial_frames_is_refused(whisper_server: ServerProcess) -> None:
    async with AsyncTcpClient("127.0.0.1", whisper_server.wyoming_port) as client:
        await client.write_event(AudioStart(rate=16000, width=2, channels=2).event())
        await client.write_event(AudioChunk(rate=16000, width=2, channels=2, audio=b"\x00" * 6).event())
        event = await client.read_event()
        assert error_code(event) == "invalid_audio_format"
        assert event is not None
        assert "whole number" in Error.from_event(event).text


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"this is not json\n", "malformed_event"),
        (b'["a", "list"]\n', "malformed_event"),
        (b'{"data": {}}\n', "malformed_event"),
        (b'{"type": "audio-chunk", "payload_length": -5}\n', "malformed_event"),
        (b'{"type": "audio-chunk", "payload_length": 1000000000}\n', "payload_too_large"),
        (b'{"type": "transcribe", "data_length": 10000000}\n', "data_too_large"),
        (b'{"type": "transcribe", "data_length": 5}\nnope!', "malformed_event"),
        (b'{"type": "' + b"x" * 70_000 + b'"}\n', "header_too_large"),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-type",
        "negative-length",
        "huge-payload",
        "huge-data",
        "bad-data",
        "huge-header",
    ],
)
async def test_malformed_events_get_an_error_and_the_server_stays_up(
    whisper_server: ServerProcess, kitchen: Utterance, raw: bytes, code: str
) -> None:
    before = metric(whisper_server, "whisper_gpu_protocol_errors_total", f'{{code="{code}"}}')
    events = await raw_exchange(whisper_server.wyoming_port, raw)
    assert [error_code(event) for event in events] == [code]
    assert metric(whisper_server, "whisper_gpu_protocol_errors_total", f'{{code="{code}"}}') == before + 1
    audio, rate, width, channels = kitchen.pcm()
    assert heard(await transcribe(whisper_server.wyoming_port, audio, rate, width, channels)) == normalize(kitchen.text)


async def test_a_client_that_vanishes_mid_stream_costs_nothing(
    whisper_server: ServerProcess, kitchen: Utterance
) -> None:
    before = metric(whisper_server, "whisper_gpu_requests_total", '{outcome="disconnected"}')
    audio, rate, width, channels = kitchen.pcm()
    reader, writer = await asyncio.open_connection("127.0.0.1", whisper_server.wyoming_port)
    for event in (Transcribe().event(), AudioStart(rate=rate, width=width, channels=channels).event()):
        writer.write(json.dumps({"type": event.type, "data": event.data}).encode() + b"\n")
    header = {"type": "audio-chunk", "data": {"rate": rate, "width": width, "channels": channels}}
    writer.write(json.dumps({**header, "payload_length": 4000}).encode() + b"\n" + audio[:1000])  # cut mid-payload
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    del reader
    assert heard(await transcribe(whisper_server.wyoming_port, audio, rate, width, channels)) == normalize(kitchen.text)
    for _ in range(50):
        if metric(whisper_server, "whisper_gpu_requests_total", '{outcome="disconnected"}') == before + 1:
            break
        await asyncio.sleep(0.1)
    assert metric(whisper_server, "whisper_gpu_requests_total", '{outcome="disconnected"}') == before + 1


async def test_a_stalled_client_does_not_delay_others(whisper_server: ServerProcess, kitchen: Utterance) -> None:
    audio, rate, width, channels = kitchen.pcm()
    staller = AsyncTcpClient("127.0.0.1", whisper_server.wyoming_port)
    await staller.connect()
    await staller.write_event(Transcribe().event())
    await staller.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    await staller.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
    # The staller never sends audio-stop; another client is served as if it were alone.
    started = time.monotonic()
    event = await transcribe(whisper_server.wyoming_port, audio, rate, width, channels)
    assert heard(event) == normalize(kitchen.text)
    assert time.monotonic() - started < 30
    await staller.disconnect()


async def test_endless_audio_stops_at_the_limit_with_what_came(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8", "--max-audio-s", "3"])
    audio, rate, width, channels = kitchen.pcm()
    silence = bytes(rate * width * channels // 2)
    async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as client:
        await client.write_event(Transcribe().event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        # 20 s of audio and no audio-stop: the answer comes once 3 s have arrived.
        for _ in range(20):
            await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
            await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=silence).event())
        event = await asyncio.wait_for(client.read_event(), timeout=60)
        assert event is not None
        assert normalize(kitchen.text) in heard(event)
    assert metric(server, "whisper_gpu_requests_total", '{outcome="truncated"}') == 1
    assert "stopped at the 3 s limit" in server.log()


async def test_request_log_line_has_the_numbers_and_no_transcript_by_default(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8"])
    audio, rate, width, channels = kitchen.pcm()
    await transcribe(server.wyoming_port, audio, rate, width, channels)
    line = next(line for line in server.log().splitlines() if "request from 127.0.0.1" in line)
    assert re.search(
        r"request from 127\.0\.0\.1:\d+: 1\.\d\d s audio, \d+ ms, RTF \d\.\d\d, model tiny\.en, outcome ok", line
    )
    assert "kitchen" not in server.log()

    status, _ = server.request("PATCH", "/api/v1/settings", {"log_transcripts": True}, token=server.token)
    assert status == 200
    await transcribe(server.wyoming_port, audio, rate, width, channels)
    assert "kitchen light" in server.log()


async def test_sigterm_finishes_the_request_in_flight_and_exits_0(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8", "--beam-size", "5"])
    audio, rate, width, channels = kitchen.pcm()
    async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as client:
        await client.write_event(Transcribe().event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
        await client.write_event(Describe().event())  # its answer proves the server has read the audio so far
        assert Info.is_type((await client.read_event() or Event("none")).type)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # New connections are refused while the request in flight still gets its answer.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", server.wyoming_port)
        await client.write_event(AudioStop().event())
        event = await asyncio.wait_for(client.read_event(), timeout=60)
    assert heard(event) == normalize(kitchen.text)
    assert server.process.wait(timeout=30) == 0
    assert "Stopped" in server.log()


async def test_sigterm_gives_up_on_a_stalled_request_after_the_grace_period(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8", "--shutdown-grace-s", "1"])
    audio, rate, width, channels = kitchen.pcm()
    async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as client:
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
        await client.write_event(Describe().event())
        assert Info.is_type((await client.read_event() or Event("none")).type)
        started = time.monotonic()
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    assert 0.9 < time.monotonic() - started < 10
    assert "still in flight after the grace period" in server.log()
