"""Recognition quality of the default model on spoken Home Assistant commands."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jiwer
import pytest
from helpers.server import ServerProcess, transcribe
from helpers.speech import Utterance, synthesize
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcript

normalize = EnglishTextNormalizer()
MAX_WORD_ERROR_RATE = 0.10


@pytest.fixture(scope="module")
def base_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default model, multilingual, on the CPU's int8, with LANGUAGE=auto."""
    server = ServerProcess(
        tmp_path_factory.mktemp("base") / "data", model="base", args=["--compute-type", "int8", "--language", "auto"]
    )
    server.start()
    yield server
    server.stop()


async def test_base_model_understands_home_assistant_commands(
    base_server: ServerProcess, commands: list[Utterance]
) -> None:
    """Word error rate over the whole set after Whisper's English normalisation, and the clear ones exact."""
    server = base_server
    references, hypotheses = [], []
    for utterance in commands:
        audio, rate, width, channels = utterance.pcm()
        event = await transcribe(server.wyoming_port, audio, rate, width, channels, language="en")
        assert Transcript.is_type(event.type), event
        references.append(normalize(utterance.text))
        hypotheses.append(normalize(Transcript.from_event(event).text))

    misheard = [(ref, hyp) for ref, hyp in zip(references, hypotheses, strict=True) if ref != hyp]
    assert jiwer.wer(references, hypotheses) <= MAX_WORD_ERROR_RATE, misheard
    clear = [
        (normalize(utterance.text), hypothesis)
        for utterance, hypothesis in zip(commands, hypotheses, strict=True)
        if utterance.clear
    ]
    assert len(clear) >= 8
    assert [hypothesis for _, hypothesis in clear] == [reference for reference, _ in clear]


async def test_the_language_of_each_request_is_honoured(base_server: ServerProcess, speech_dir: Path) -> None:
    german = Utterance(
        "Schalte das Licht in der Küche ein",
        synthesize("Schalte das Licht in der Küche ein", speech_dir, voice="de"),
        clear=False,
    )
    audio, rate, width, channels = german.pcm()
    detected = Transcript.from_event(await transcribe(base_server.wyoming_port, audio, rate, width, channels))
    assert detected.language == "de"  # LANGUAGE=auto: detected per request
    assert "licht" in detected.text.lower()
    forced = Transcript.from_event(
        await transcribe(base_server.wyoming_port, audio, rate, width, channels, language="en")
    )
    assert forced.language == "en"
    assert forced.text != detected.text  # decoded as English, as this request asked


async def test_silence_with_language_detection_is_empty(base_server: ServerProcess) -> None:
    event = await transcribe(base_server.wyoming_port, bytes(3 * 16_000 * 2))
    assert Transcript.from_event(event).text == ""
