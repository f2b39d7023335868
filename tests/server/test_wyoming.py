"""The Wyoming side, driven by the `wyoming` library's client against the real server and model."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections import Counter
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
from wyoming.ping import Ping, Pong

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
    value = server.metric(name, labels)
    return 0.0 if value is None else value


async def wait_for_metric(
    server: ServerProcess, name: str, wanted: Callable[[float], bool], labels: str = "", timeout: float = 60
) -> float:
    deadline = time.monotonic() + timeout
    while not wanted(value := metric(server, name, labels)):
        assert time.monotonic() < deadline, f"{name}{labels} stayed at {value}"
        await asyncio.sleep(0.05)
    return value


def cpu_seconds(server: ServerProcess) -> float:
    """CPU time the server process has used (all threads): what a transcription costs, whoever waits for it."""
    assert server.process is not None
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_until_idle(server: ServerProcess, timeout: float = 60) -> None:
    """Wait until the server has dealt with what it was sent: it spends no CPU for a while."""
    deadline = time.monotonic() + timeout
    before = cpu_seconds(server)
    while True:
        await asyncio.sleep(0.3)
        now = cpu_seconds(server)
        if now - before < 0.03:
            return
        assert time.monotonic() < deadline, "the server kept busy"
        before = now


def peak_memory_mb(server: ServerProcess) -> float:
    """The server's peak resident memory so far (VmHWM)."""
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert match
    return int(match.group(1)) / 1024


def long_speech(commands: list[Utterance], seconds: float) -> bytes:
    """Spoken commands one after another, 16 kHz mono 16-bit, at least this long."""
    audio = b""
    while len(audio) < seconds * 32_000:
        for utterance in commands:
            audio += utterance.pcm()[0]
    return audio


async def send_request(client: AsyncTcpClient, audio: bytes, *, stop: bool = True, chunk_frames: int = 1024) -> None:
    """Write one 16 kHz mono request without reading the answer."""
    await client.write_event(Transcribe().event())
    await client.write_event(AudioStart(rate=16_000, width=2, channels=1).event())
    for start in range(0, len(audio), chunk_frames * 2):
        piece = audio[start : start + chunk_frames * 2]
        await client.write_event(AudioChunk(rate=16_000, width=2, channels=1, audio=piece).event())
    if stop:
        await client.write_event(AudioStop().event())


async def send_rest(client: AsyncTcpClient, audio: bytes, *, stop: bool) -> None:
    """Write more audio of a request already started, in one chunk."""
    await client.write_event(AudioChunk(rate=16_000, width=2, channels=1, audio=audio).event())
    if stop:
        await client.write_event(AudioStop().event())


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
    assert program.requires_external_vad is False, "the server ends commands itself"
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
        (b'{"type": "transcribe", "data": ' + b"[" * 30_000 + b"\n", "malformed_event"),
        (b'{"type": "audio-chunk", "payload_length": 1' + b"0" * 5000 + b"}\n", "malformed_event"),
        (b'{"type": "transcribe", "data_length": 30000}\n' + b"[" * 30_000, "malformed_event"),
        (b'{"type": "transcribe", "data_length": 5003}\n{"a":' + b"7" * 5000 + b"}", "malformed_event"),
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
        "deep-header",
        "huge-integer-header",
        "deep-data",
        "huge-integer-data",
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


async def test_a_client_cut_off_mid_payload_counts_as_disconnected(
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
    await wait_for_metric(
        whisper_server, "whisper_gpu_requests_total", lambda value: value == before + 1, '{outcome="disconnected"}'
    )


async def test_a_client_that_vanishes_mid_stream_costs_nothing(
    start_server: Callable[..., ServerProcess], commands: list[Utterance]
) -> None:
    """Clients whose requests wait behind another leave: mid-stream (past MAX_AUDIO_S, so already queued) or right
    after audio-stop. None of their audio is transcribed: the server spends the CPU time of the one request that
    stayed, not of seven.
    """
    # base, not tiny.en: the stayer's 30 s keep the model busy for seconds, far longer than the leavers take to
    # queue and leave, even when coverage slows the server's Python code and not the model.
    server = start_server(model="base", args=["--compute-type", "int8", "--max-audio-s", "30"])
    speech = long_speech(commands, 32)
    started = cpu_seconds(server)
    assert heard(await transcribe(server.wyoming_port, speech))
    one_request = cpu_seconds(server) - started
    disconnected = metric(server, "whisper_gpu_requests_total", '{outcome="disconnected"}')

    # The leavers send all but the last seconds first: what the server does with that audio as it comes (the
    # end-of-speech VAD) is over before the stayer reaches the model, which a small model may finish in well under
    # a second. The leavers then only have to cross MAX_AUDIO_S while it is busy.
    started = cpu_seconds(server)
    leavers = [AsyncTcpClient("127.0.0.1", server.wyoming_port) for _ in range(6)]
    head, tail = speech[: 28 * 32_000], speech[28 * 32_000 :]
    for client in leavers:
        await client.connect()
        await send_request(client, head, stop=False)
    await wait_until_idle(server)
    stayer = asyncio.create_task(transcribe(server.wyoming_port, speech))
    await wait_for_metric(server, "whisper_gpu_requests_in_flight", lambda value: value >= 1)
    await asyncio.gather(
        *(
            send_rest(client, tail, stop=number % 2 == 0)  # past 30 s: the request is queued
            for number, client in enumerate(leavers)
        )
    )
    await wait_for_metric(server, "whisper_gpu_requests_queued", lambda value: value == len(leavers))
    for client in leavers:
        await client.disconnect()
    assert heard(await stayer)
    await wait_for_metric(server, "whisper_gpu_requests_queued", lambda value: value == 0)
    await wait_for_metric(server, "whisper_gpu_requests_in_flight", lambda value: value == 0)
    await asyncio.sleep(0.5)
    spent = cpu_seconds(server) - started

    assert metric(server, "whisper_gpu_requests_total", '{outcome="disconnected"}') == disconnected + len(leavers)
    # The leavers' audio still went through the end-of-speech VAD as it came: 1.5x one request here in all, where
    # one request (sent at once, so without partial transcripts) cost 1.6-1.75 s. Six transcriptions more, even
    # batched, would cost over 5x.
    assert spent < 4 * one_request, f"{spent:.1f} s CPU for one request of {one_request:.1f} s and six that left"
    assert server.log().count("left while its request waited for the model") == len(leavers)


async def test_a_stalled_client_does_not_delay_others(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    """A client whose request reached the model stops reading and floods `describe`: the server's writes to it
    back up. Another client is served meanwhile, and the staller is cut off after the idle timeout.
    """
    server = start_server(args=["--compute-type", "int8", "--idle-timeout-s", "4"])
    audio, rate, width, channels = kitchen.pcm()
    _, staller = await asyncio.open_connection("127.0.0.1", server.wyoming_port)
    for event in (
        Transcribe().event(),
        AudioStart(rate=rate, width=width, channels=channels).event(),
        AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event(),
        AudioStop().event(),
    ):
        await async_write(staller, event)
    await wait_for_metric(server, "whisper_gpu_requests_total", lambda value: value == 1, '{outcome="ok"}')
    describe = b'{"type": "describe"}\n'
    staller.write(describe * 200_000)  # megabytes of answers that the staller never reads

    started = time.monotonic()
    event = await transcribe(server.wyoming_port, audio, rate, width, channels)
    assert heard(event) == normalize(kitchen.text)
    assert time.monotonic() - started < 30
    assert metric(server, "whisper_gpu_connections") == 1

    await wait_for_metric(server, "whisper_gpu_connections", lambda value: value == 0, timeout=30)
    assert metric(server, "whisper_gpu_protocol_errors_total", '{code="idle_timeout"}') == 1
    staller.transport.abort()


async def async_write(writer: asyncio.StreamWriter, event: Event) -> None:
    header = {"type": event.type, "data": event.data}
    if event.payload:
        header["payload_length"] = len(event.payload)
    writer.write(json.dumps(header).encode() + b"\n" + (event.payload or b""))
    await writer.drain()


async def test_describe_and_ping_are_answered_while_a_request_waits(
    whisper_server: ServerProcess, commands: list[Utterance]
) -> None:
    speech = long_speech(commands, 20)
    async with AsyncTcpClient("127.0.0.1", whisper_server.wyoming_port) as client:
        await send_request(client, speech)
        await client.write_event(Describe().event())
        await client.write_event(Ping(text="still there?").event())
        answers = [await asyncio.wait_for(client.read_event(), timeout=120) for _ in range(3)]
    assert [event.type if event else None for event in answers] == ["info", "pong", "transcript"]
    assert answers[1] is not None
    assert Pong.from_event(answers[1]).text == "still there?"
    assert heard(answers[2])


async def test_requests_sent_back_to_back_are_answered_in_order(
    whisper_server: ServerProcess, commands: list[Utterance]
) -> None:
    chosen = [utterance for utterance in commands if utterance.clear][:3]
    async with AsyncTcpClient("127.0.0.1", whisper_server.wyoming_port) as client:
        for utterance in chosen:
            await send_request(client, utterance.pcm()[0])
        answers = [heard(await asyncio.wait_for(client.read_event(), timeout=120)) for _ in chosen]
    assert answers == [normalize(utterance.text) for utterance in chosen]


async def test_a_corrected_audio_start_after_a_refused_one_is_served(
    whisper_server: ServerProcess, kitchen: Utterance
) -> None:
    audio, rate, width, channels = kitchen.pcm()
    async with AsyncTcpClient("127.0.0.1", whisper_server.wyoming_port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=rate, width=3, channels=channels).event())
        assert error_code(await client.read_event()) == "invalid_audio_format"
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
        await client.write_event(AudioStop().event())
        assert heard(await asyncio.wait_for(client.read_event(), timeout=60)) == normalize(kitchen.text)


async def test_a_low_rate_stream_of_huge_chunks_costs_little_memory_and_never_blocks_the_server(
    start_server: Callable[..., ServerProcess],
) -> None:
    """1 kHz audio in 4 MiB chunks: each chunk is 35 minutes, 134 MB at 16 kHz, but the request keeps 60 s."""
    server = start_server(args=["--compute-type", "int8"])
    peak_before = peak_memory_mb(server)
    latencies: list[float] = []
    streaming = True

    async def ping_meanwhile() -> None:
        async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as client:
            while streaming:
                sent = time.monotonic()
                await client.write_event(Ping().event())
                assert await asyncio.wait_for(client.read_event(), timeout=30) is not None
                latencies.append(time.monotonic() - sent)
                await asyncio.sleep(0.02)

    pinger = asyncio.create_task(ping_meanwhile())
    await asyncio.sleep(0.2)
    silence = bytes(4 * 1024 * 1024)
    async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as client:
        await client.write_event(AudioStart(rate=1000, width=2, channels=1).event())
        for _ in range(3):
            await client.write_event(AudioChunk(rate=1000, width=2, channels=1, audio=silence).event())
        await client.write_event(AudioStop().event())
        event = await asyncio.wait_for(client.read_event(), timeout=120)
    streaming = False
    await pinger
    assert event is not None
    assert Transcript.is_type(event.type), event
    assert metric(server, "whisper_gpu_requests_total", '{outcome="truncated"}') == 1
    assert peak_memory_mb(server) - peak_before < 40
    assert max(latencies) < 1.0, f"the event loop stalled for {max(latencies):.2f} s"


async def test_a_stream_without_audio_stop_and_an_idle_connection_time_out(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8", "--idle-timeout-s", "2"])
    audio, rate, width, channels = kitchen.pcm()
    async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as client:
        await client.write_event(Transcribe().event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=audio).event())
        event = await asyncio.wait_for(client.read_event(), timeout=30)
        assert error_code(event) == "idle_timeout"
        assert await asyncio.wait_for(client.read_event(), timeout=5) is None, "the connection must close"
    assert metric(server, "whisper_gpu_requests_total", '{outcome="disconnected"}') == 1
    # A connection that never sends anything is closed the same way.
    async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as client:
        assert error_code(await asyncio.wait_for(client.read_event(), timeout=30)) == "idle_timeout"
        assert await asyncio.wait_for(client.read_event(), timeout=5) is None
    assert metric(server, "whisper_gpu_protocol_errors_total", '{code="idle_timeout"}') == 2
    assert metric(server, "whisper_gpu_connections") == 0
    # Waiting for a transcript never counts as idle, and the next client is served.
    assert heard(await transcribe(server.wyoming_port, audio, rate, width, channels)) == normalize(kitchen.text)


async def test_a_payload_one_byte_short_times_out(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(args=["--compute-type", "int8", "--read-timeout-s", "2", "--idle-timeout-s", "60"])
    length = 4 * 1024 * 1024
    header = {"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, "payload_length": length}
    started = time.monotonic()
    events = await raw_exchange(server.wyoming_port, json.dumps(header).encode() + b"\n" + bytes(length - 1))
    assert [error_code(event) for event in events] == ["read_timeout"]
    assert time.monotonic() - started < 30
    await wait_for_metric(server, "whisper_gpu_connections", lambda value: value == 0)
    assert metric(server, "whisper_gpu_protocol_errors_total", '{code="read_timeout"}') == 1


async def test_one_connection_over_the_limit_is_told_the_server_is_busy(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8", "--max-connections", "2"])
    first = AsyncTcpClient("127.0.0.1", server.wyoming_port)
    second = AsyncTcpClient("127.0.0.1", server.wyoming_port)
    for client in (first, second):
        await client.connect()
        await client.write_event(Describe().event())
        assert Info.is_type((await client.read_event() or Event("none")).type)
    async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as third:
        event = await asyncio.wait_for(third.read_event(), timeout=10)
        assert error_code(event) == "server_busy"
        assert event is not None
        assert "2 connections" in Error.from_event(event).text
        assert await asyncio.wait_for(third.read_event(), timeout=5) is None
    assert metric(server, "whisper_gpu_connections_refused_total") == 1
    await first.disconnect()
    await wait_for_metric(server, "whisper_gpu_connections", lambda value: value == 1)
    audio, rate, width, channels = kitchen.pcm()
    assert heard(await transcribe(server.wyoming_port, audio, rate, width, channels)) == normalize(kitchen.text)
    await second.disconnect()


async def test_a_thousand_idle_sockets_are_refused_or_timed_out_and_hold_nothing(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8", "--max-connections", "64", "--idle-timeout-s", "3"])
    assert server.process is not None
    files_before = len(list(Path(f"/proc/{server.process.pid}/fd").iterdir()))

    async def idle_socket() -> str | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.wyoming_port)
        try:
            client = AsyncTcpClient("127.0.0.1", server.wyoming_port)
            client._reader, client._writer = reader, writer
            event = await asyncio.wait_for(client.read_event(), timeout=60)
            assert await asyncio.wait_for(client.read_event(), timeout=10) is None, "the server must close"
            return error_code(event)
        finally:
            writer.close()

    codes = await asyncio.gather(*(idle_socket() for _ in range(1000)), return_exceptions=True)
    assert codes.count("idle_timeout") == 64, Counter(repr(code) for code in codes)
    assert codes.count("server_busy") == 1000 - 64, Counter(repr(code) for code in codes)
    await wait_for_metric(server, "whisper_gpu_connections", lambda value: value == 0)
    assert len(list(Path(f"/proc/{server.process.pid}/fd").iterdir())) <= files_before + 2
    audio, rate, width, channels = kitchen.pcm()
    assert heard(await transcribe(server.wyoming_port, audio, rate, width, channels)) == normalize(kitchen.text)


async def test_endless_audio_stops_at_the_limit_with_what_came(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    # Without endpointing: the silence between the commands would end the request before the limit.
    server = start_server(args=["--compute-type", "int8", "--max-audio-s", "3", "--no-endpointing"])
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
