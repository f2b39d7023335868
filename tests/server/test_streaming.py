"""End of speech and streaming: real speech streamed in real time, followed by microphone-like silence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers.server import ServerProcess
from helpers.speech import Utterance, synthesize
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe, Info

normalize = EnglishTextNormalizer()
RATE = 16_000
CHUNK_SAMPLES = 1024  # 64 ms, about what a satellite sends
END_OF_SPEECH_S = 0.5
# Beyond the end-of-command silence: VAD frames, the decode left after the speculative one, a loaded CPU.
MARGIN_S = 1.2
TRAILING_SILENCE_S = 3.0


def spoken(text: str, speech_dir: Path) -> np.ndarray:
    """16-bit samples of the words alone (espeak-ng's own silence around them cut off)."""
    pcm = Utterance(text, synthesize(text, speech_dir), clear=True).pcm()[0]
    samples = np.frombuffer(pcm, dtype="<i2")
    loud = np.nonzero(np.abs(samples) > 300)[0]
    return samples[loud[0] : loud[-1] + 1]


def silence(seconds: float) -> np.ndarray:
    """Microphone-like silence: a little noise, not digital zeros."""
    rng = np.random.default_rng(7)
    return (rng.normal(0, 30, int(seconds * RATE))).astype("<i2")


@dataclass
class Exchange:
    """What a client saw: each event with the seconds since the last word was sent, and when audio-stop went."""

    events: list[tuple[float, Event]] = field(default_factory=list)
    stop_sent_at: float | None = None

    def of(self, kind: str) -> list[tuple[float, Event]]:
        return [(at, event) for at, event in self.events if event.type == kind]

    @property
    def transcript(self) -> tuple[float, str]:
        (at, event), *_ = self.of("transcript")
        return at, Transcript.from_event(event).text


async def stream_in_real_time(
    port: int, speech: np.ndarray, trailing_s: float = TRAILING_SILENCE_S, *, speed: float = 1.0
) -> Exchange:
    """Send speech then silence at the pace a microphone makes them (`speed` times faster), reading the server's events
    meanwhile."""
    audio = np.concatenate((silence(0.3), speech, silence(trailing_s))).tobytes()
    speech_ends = (0.3 * RATE + len(speech)) / RATE
    exchange = Exchange()
    async with AsyncTcpClient("127.0.0.1", port) as client:
        started = time.monotonic()
        ends_at = started + speech_ends

        async def read() -> None:
            while (event := await client.read_event()) is not None:
                exchange.events.append((time.monotonic() - ends_at, event))
                if event.type in ("transcript-stop", "error") or (
                    event.type == "transcript" and not any(e.type == "transcript-start" for _, e in exchange.events)
                ):
                    return

        reader = asyncio.create_task(read())
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        step = CHUNK_SAMPLES * 2
        for index, offset in enumerate(range(0, len(audio), step)):
            await client.write_event(
                AudioChunk(rate=RATE, width=2, channels=1, audio=audio[offset : offset + step]).event()
            )
            await asyncio.sleep(max(0.0, started + (index + 1) * CHUNK_SAMPLES / RATE / speed - time.monotonic()))
        await client.write_event(AudioStop().event())
        exchange.stop_sent_at = time.monotonic() - ends_at
        await asyncio.wait_for(reader, timeout=60)
    return exchange


@pytest.fixture(scope="module")
def streaming_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    server = ServerProcess(
        tmp_path_factory.mktemp("streaming") / "data",
        model="tiny.en",
        args=["--compute-type", "int8", "--partial-interval-s", "0.5", "--end-of-speech-s", str(END_OF_SPEECH_S)],
    )
    server.start()
    yield server
    server.stop()


async def test_describe_says_the_server_ends_commands_and_streams(streaming_server: ServerProcess) -> None:
    async with AsyncTcpClient("127.0.0.1", streaming_server.wyoming_port) as client:
        await client.write_event(Describe().event())
        event = await client.read_event()
    assert event is not None
    program = Info.from_event(event).asr[0]
    assert program.requires_external_vad is False
    assert program.supports_transcript_streaming is True


async def test_the_transcript_comes_once_the_speaker_is_silent_not_at_audio_stop(
    streaming_server: ServerProcess, speech_dir: Path
) -> None:
    exchange = await stream_in_real_time(streaming_server.wyoming_port, spoken("turn on the kitchen light", speech_dir))

    at, text = exchange.transcript
    assert normalize(text) == "turn on the kitchen light"
    assert END_OF_SPEECH_S <= at <= END_OF_SPEECH_S + MARGIN_S, f"transcript {at:.2f} s after the speech ended"
    assert exchange.stop_sent_at is not None
    assert at < exchange.stop_sent_at, "the server waited for audio-stop"
    # The answer came from the transcription started at the pause: its stages count as the request's.
    encoder = streaming_server.metric("whisper_gpu_stage_seconds_count", '{stage="encoder"}')
    assert encoder is not None
    assert encoder >= 1


async def test_a_pause_inside_a_command_does_not_cut_it(streaming_server: ServerProcess, speech_dir: Path) -> None:
    speech = np.concatenate(
        (spoken("set the living room lights", speech_dir), silence(0.3), spoken("to blue", speech_dir))
    )

    exchange = await stream_in_real_time(streaming_server.wyoming_port, speech)

    text = normalize(exchange.transcript[1])
    assert text.startswith("set the living room"), text
    assert text.endswith("to blue"), f"the command was cut at the pause: {text!r}"


async def test_a_speaker_who_stops_mid_sentence_is_given_longer(
    streaming_server: ServerProcess, speech_dir: Path
) -> None:
    """'Turn off the lights in the', then silence longer than END_OF_SPEECH_S, then 'kitchen': the text at the pause
    stops mid-sentence, so that pause needs the longer silence before it ends the command."""
    speech = np.concatenate(
        (
            spoken("turn off the lights in the", speech_dir),
            silence(END_OF_SPEECH_S + 0.4),
            spoken("kitchen", speech_dir),
        )
    )

    exchange = await stream_in_real_time(streaming_server.wyoming_port, speech)

    text = normalize(exchange.transcript[1])
    assert text.startswith("turn off"), text
    assert text.endswith("lights in the kitchen"), f"the command ended at the pause: {text!r}"


async def test_partial_text_arrives_before_the_final_text_and_leads_to_it(
    streaming_server: ServerProcess, speech_dir: Path
) -> None:
    words = "set the thermostat in the living room to twenty one degrees and turn off the kitchen lights"
    exchange = await stream_in_real_time(streaming_server.wyoming_port, spoken(words, speech_dir))

    kinds = [event.type for _, event in exchange.events]
    assert kinds[0] == "transcript-start"
    assert kinds[-2:] == ["transcript", "transcript-stop"]
    partials = [
        normalize(TranscriptChunk.from_event(event).text).split() for _, event in exchange.of("transcript-chunk")
    ]
    assert partials, "no partial text while the speaker talked"
    first_partial_at = exchange.of("transcript-chunk")[0][0]
    assert first_partial_at < 0, "the first partial came after the speech ended"
    # Early partials may guess at a cut-off sentence; the one with the most speech must lead to the final text.
    final = normalize(exchange.transcript[1]).split()
    last = partials[-1]
    assert last[:2] == final[:2], f"the last partial {last} does not lead to {final}"
    assert sum(word in final for word in last) >= 0.7 * len(last), f"the last partial {last} strays from {final}"


async def test_audio_sent_much_faster_than_spoken_gets_no_partial_transcription(
    streaming_server: ServerProcess, speech_dir: Path
) -> None:
    """Audio from a buffer or a file: partial text could not be read before the transcript, and the model's time
    goes to transcripts somebody waits for (this one, other clients')."""
    words = "set the thermostat in the living room to twenty one degrees and turn off the kitchen lights"
    runs_before = model_runs(streaming_server)

    exchange = await stream_in_real_time(streaming_server.wyoming_port, spoken(words, speech_dir), speed=20)

    assert not exchange.of("transcript-chunk")
    assert normalize(exchange.transcript[1]).split()[:3] == ["set", "the", "thermostat"]
    assert model_runs(streaming_server) == runs_before + 1, "one run of the model: the transcript's"


async def test_a_pause_in_audio_sent_much_faster_than_spoken_does_not_cut_it(
    streaming_server: ServerProcess, speech_dir: Path
) -> None:
    """A file or a buffer sent at once: its pauses are no end of command (the rest was sent already), and the
    transcript holds the words after a pause far longer than the end-of-command silence."""
    speech = np.concatenate(
        (
            spoken("turn off the living room lights", speech_dir),
            silence(1.5),
            spoken("and open the garage door", speech_dir),
        )
    )

    exchange = await stream_in_real_time(streaming_server.wyoming_port, speech, speed=20)

    text = normalize(exchange.transcript[1])
    assert text.startswith("turn off the living room"), text
    assert text.endswith("open the garage door"), f"the audio was cut at its pause: {text!r}"
    assert exchange.stop_sent_at is not None
    assert exchange.transcript[0] > exchange.stop_sent_at, "the server answered before the sender was done"


def model_runs(server: ServerProcess) -> float:
    """Batches the model has run (whisper_gpu_batch_size_count): transcripts, partial and speculative ones."""
    runs = server.metric("whisper_gpu_batch_size_count")
    assert runs is not None, "the batch size histogram is exported"
    return runs


async def test_a_client_that_does_not_stream_gets_one_transcript(
    start_server: Callable[..., ServerProcess], speech_dir: Path
) -> None:
    server = start_server(args=["--compute-type", "int8", "--partial-interval-s", "0"])

    exchange = await stream_in_real_time(server.wyoming_port, spoken("open the garage door", speech_dir))

    assert [event.type for _, event in exchange.events] == ["transcript"]
    assert normalize(exchange.transcript[1]) == "open the garage door"


async def test_endpointing_off_waits_for_audio_stop_as_before(
    start_server: Callable[..., ServerProcess], speech_dir: Path
) -> None:
    server = start_server(args=["--compute-type", "int8", "--no-endpointing", "--partial-interval-s", "0"])
    async with AsyncTcpClient("127.0.0.1", server.wyoming_port) as client:
        await client.write_event(Describe().event())
        event = await client.read_event()
    assert event is not None
    assert Info.from_event(event).asr[0].requires_external_vad is True

    exchange = await stream_in_real_time(server.wyoming_port, spoken("lock the front door", speech_dir), trailing_s=1.5)

    at, text = exchange.transcript
    assert normalize(text) == "lock the front door"
    assert exchange.stop_sent_at is not None
    assert at > exchange.stop_sent_at
