"""Recognition quality of the default model on spoken Home Assistant commands."""

from __future__ import annotations

from collections.abc import Callable

import jiwer
from helpers.server import ServerProcess, transcribe
from helpers.speech import Utterance
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcript

normalize = EnglishTextNormalizer()
MAX_WORD_ERROR_RATE = 0.10


async def test_base_model_understands_home_assistant_commands(
    start_server: Callable[..., ServerProcess], commands: list[Utterance]
) -> None:
    """Word error rate over the whole set after Whisper's English normalisation, and the clear ones exact."""
    server = start_server(model="base", args=["--compute-type", "int8"])
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
