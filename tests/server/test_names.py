"""Names of the home in `transcribe` (transcript_names / transcript_terms) become Whisper's prompt, on tiny.en.

The spoken command says "Kaia" the way it sounds ("Kaya"); without the names tiny.en writes "car room", with them
the home's spelling. The names and commands are the benchmark's test set (tests/data/names.json).
"""

from __future__ import annotations

import dataclasses
import json
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.server import ServerProcess, read_answer, transcribe
from helpers.speech import COMMANDS, Utterance, synthesize
from whisper_gpu.engine import CpuThreads, DecodeOptions, Device, WhisperEngine, is_unusual, select_names
from whisper_gpu.models import ModelCache
from whisper_gpu.names import NameSpeller, PromptEcho
from wyoming.asr import Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

TEST_SET = json.loads((Path(__file__).parents[1] / "data" / "names.json").read_text(encoding="utf-8"))
HOME: list[str] = TEST_SET["home"]
# Spoken as it sounds, written as the home writes it.
KAIA = ("turn off the lights in Kaia's room", "turn off the lights in Kaya's room")
SIOBHAN = ("turn on the lights in Siobhán's room", "turn on the lights in Siobhán's room")


def speech(text_and_spoken: tuple[str, str], directory: Path, *, silence_s: float = 1.0) -> bytes:
    """The command as 16 kHz 16-bit mono PCM, with silence after it (the server hears the end of the command)."""
    text, spoken = text_and_spoken
    pcm, _, _, _ = Utterance(text, synthesize(spoken, directory), clear=False).pcm()
    return pcm + bytes(int(silence_s * 32_000))


async def text_of(server: ServerProcess, pcm: bytes, names: list[str] | None) -> str:
    answer = await transcribe(server.wyoming_port, pcm, language="en", names=names)
    assert Transcript.is_type(answer.type), answer
    return str(Transcript.from_event(answer).text)


async def test_a_name_of_the_home_is_spelled_as_the_home_spells_it(
    whisper_server: ServerProcess, speech_dir: Path
) -> None:
    """With the names each command comes back with the home's spelling; without them at least one does not.

    The silence after the command ends it on the server (endpointing), so the answer is the live path's: the
    transcription started at the pause, with the request's names. (Which names tiny.en happens to spell right
    unaided depends on the CPU's arithmetic: with AVX-512 it wrote "Kaia's" once without help.)
    """
    misspelled_without = []
    for command, name in ((KAIA, "Kaia's"), (SIOBHAN, "Siobhán's")):
        pcm = speech(command, speech_dir)
        assert name in await text_of(whisper_server, pcm, HOME)
        if name not in await text_of(whisper_server, pcm, None):
            misspelled_without.append(name)
    assert misspelled_without, "tiny.en spelled every name right without the names: the test shows nothing"


async def test_use_names_off_restores_the_old_behaviour(
    start_server: Callable[..., ServerProcess], whisper_server: ServerProcess, speech_dir: Path
) -> None:
    """USE_NAMES=false: names sent or not, the text is what the server gives without names."""
    server = start_server(args=["--compute-type", "int8", "--no-use-names"])
    pcm = speech(KAIA, speech_dir)
    without = await text_of(whisper_server, pcm, None)
    assert await text_of(server, pcm, HOME) == await text_of(server, pcm, None) == without
    assert await text_of(whisper_server, pcm, HOME) != without, "the names change nothing even where they are used"


async def test_oversized_lists_are_trimmed_not_refused(whisper_server: ServerProcess, speech_dir: Path) -> None:
    """Thousands of names, names too long to be names, blanks and repeats: the names that fit still work.

    (The event as a whole stays within the 64 KiB of data any Wyoming event may carry here.)
    """
    pcm = speech(KAIA, speech_dir)
    names = ["Kaia's Room", "", "   ", "x" * 5_000, *HOME, *HOME, *(f"Lamp {n}" for n in range(3_000))]
    assert "Kaia's" in await text_of(whisper_server, pcm, names)


async def send_raw_transcribe(port: int, data: dict[str, Any], pcm: bytes) -> Event:
    """A request whose `transcribe` data is written by hand (the library's class types its fields)."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Event(type="transcribe", data=data))
        await client.write_event(AudioStart(rate=16_000, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=16_000, width=2, channels=1, audio=pcm).event())
        await client.write_event(AudioStop().event())
        return await read_answer(client)


def invalid_names_count(server: ServerProcess) -> float:
    return server.metric("whisper_gpu_protocol_errors_total", '{code="invalid_names"}') or 0.0


@pytest.mark.parametrize(
    "data",
    [
        {"transcript_names": "Kaia's Room"},
        {"transcript_names": [1, 2]},
        {"transcript_names": {"name": "Kaia's Room"}},
        {"transcript_terms": ["Kaia's Room", None]},
    ],
)
async def test_malformed_names_are_ignored_and_counted(
    whisper_server: ServerProcess, speech_dir: Path, data: dict[str, Any]
) -> None:
    """Names are a hint: a field of the wrong type is dropped (logged, counted), the command is still transcribed."""
    pcm = speech(KAIA, speech_dir)
    before = invalid_names_count(whisper_server)
    answer = await send_raw_transcribe(whisper_server.wyoming_port, {"language": "en", **data}, pcm)
    assert Transcript.is_type(answer.type), answer
    without_names = await send_raw_transcribe(whisper_server.wyoming_port, {"language": "en"}, pcm)
    assert Transcript.from_event(answer).text == Transcript.from_event(without_names).text
    assert invalid_names_count(whisper_server) == before + 1


async def test_terms_are_used_after_names(whisper_server: ServerProcess, speech_dir: Path) -> None:
    """transcript_terms count too (after the names), as the `transcribe` event defines them."""
    pcm = speech(KAIA, speech_dir)
    answer = await send_raw_transcribe(
        whisper_server.wyoming_port, {"language": "en", "transcript_terms": ["Kaia's Room"]}, pcm
    )
    assert "Kaia's" in Transcript.from_event(answer).text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WhisperEngine]:
    path = ModelCache(tmp_path_factory.mktemp("tiny")).ensure("tiny.en", offline=True)
    engine = WhisperEngine(
        name="tiny.en", path=path, device=Device("cpu"), compute_type="int8", cpu_threads=CpuThreads(2)
    )
    yield engine
    engine.close()


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0


def test_batched_with_different_names_gives_the_same_text_as_one_by_one(tiny: WhisperEngine, speech_dir: Path) -> None:
    """Requests with the home's names, other names, none, and other beam sizes in one batch: each keeps its own."""
    commands = TEST_SET["commands"][:8]
    choices: list[tuple[str, ...]] = [(), tuple(HOME), ("Kaia's Room", "Kühlschrank")]
    requests = []
    for index, command in enumerate(commands):
        path = synthesize(command.get("say", command["text"]), speech_dir)
        with wave.open(str(path)) as wav:
            audio = samples(wav.readframes(wav.getnframes()))
        options = DecodeOptions("en", 1 if index % 4 == 0 else 5, 0.5, 250, 30.0, 400, window_s=10.0)
        requests.append((audio, dataclasses.replace(options, names=choices[index % 3])))
    alone = [tiny.transcribe(audio, options).text for audio, options in requests]
    together = [result.text for result in tiny.transcribe_batch(requests)]
    assert together == alone
    assert "Kühlschrank" in alone[1], "the names took effect"


def test_names_leave_a_clearly_heard_command_as_it_was(tiny: WhisperEngine, commands: list[Utterance]) -> None:
    """A command the model hears surely without names comes back with the same words with them (a name's capitals
    aside: "Set the Thermostat" is the home's spelling).

    The names come in only where a decode without them is unsure (it is decoded again, with them). The unsure ones
    must exist too, or the names would never be used.
    """
    options = DecodeOptions("en", 5, 0.5, 250, 30.0, 400, window_s=10.0)
    sure = unsure = 0
    for command in commands:
        audio = samples(command.pcm()[0])
        plain = tiny.transcribe(audio, options)
        with_names = tiny.transcribe(audio, dataclasses.replace(options, names=tuple(HOME)))
        if plain.fallbacks:
            unsure += 1
        else:
            sure += 1
            assert with_names.text.casefold() == plain.text.casefold(), command.text
    assert sure, "no command was heard surely"
    assert unsure, "no command was decoded again: the names would never be used"


def test_the_prompt_keeps_to_its_budget_unusual_names_first_without_repeats(tiny: WhisperEngine) -> None:
    tokenizer = tiny._tokenizer("en")
    tokens = select_names(["Kitchen Light", "kaia's room", *HOME, "Kaia's Room"], tokenizer.encode, 64)
    text = tokenizer.decode(tokens)
    assert len(tokens) <= 64
    assert text.startswith(" kaia's room, "), "in the order given, the first spelling of a name"
    assert "Siobhán's room" in text, "words the tokenizer knows in lower case"
    assert "Grünewald lamp" in text
    assert text.endswith(".")
    assert text.casefold().count("kaia's room") == 1
    assert "Kitchen Light" not in text, "names of common words come last, and these did not fit"
    assert select_names([], tokenizer.encode, 64) == []


def home_speller(engine: WhisperEngine) -> NameSpeller:
    encode = engine._tokenizer("en").encode
    return NameSpeller(name for name in HOME if is_unusual(name, encode))


def test_words_written_almost_like_a_name_are_spelled_as_the_name(tiny: WhisperEngine) -> None:
    """What base and tiny.en wrote for the test set's commands, and the name each one meant."""
    speller = home_speller(tiny)
    assert speller.spell("Turn off Mother's Fan.") == "Turn off Wouter's Fan."
    assert speller.spell("Turn off the harga's lamp.") == "Turn off the Hinata's Lamp."
    assert speller.spell("Turn off the Rubblewski Heater.") == "Turn off the Wróblewski Heater."
    assert speller.spell("Turn off the lights in Kaya's room!") == "Turn off the lights in Kaia's Room!"
    assert speller.spell("Turn off the kühlschrank") == "Turn off the Kühlschrank"


def test_ordinary_commands_are_left_alone(tiny: WhisperEngine) -> None:
    """No name is made out of ordinary words, nor out of part of a misheard name."""
    speller = home_speller(tiny)
    for text, _ in COMMANDS:
        assert speller.spell(text).casefold() == text.casefold()
    for text in ("turn off the cool shrank", "Kim Kim is light.", "Turn on the trot free moe.", "turn on the fan"):
        assert speller.spell(text) == text
    assert speller.spell("Vimper bedroom light, Oosterhout 50%").endswith("50%"), "a number is not part of a name"
    assert not NameSpeller(["Fan", "TV"]), "too short to compare"


def test_the_names_closest_to_a_first_hearing_are_found(tiny: WhisperEngine) -> None:
    """A redo's prompt starts with these: names that did not fit the usual prompt get their chance."""
    speller = home_speller(tiny)
    assert "Järvinen Heater" in speller.closest("Shit, my arm I don't need her to 20 degrees.", 4)
    assert "Väinämöinen Speaker" in speller.closest("Play music on the meaner mind and speaker.", 4)
    assert speller.closest("Turn on the trot free moe.", 4)[0] == "Tradfri Bulb", (
        "it sounds alike, though spelled unlike"
    )
    assert speller.closest("Turn off the rebels' key, though.", 4)[0] == "Wróblewski Heater"
    assert speller.closest("", 4) == []


def test_a_decode_that_repeats_the_prompt_is_told_from_one_that_uses_it(tiny: WhisperEngine) -> None:
    """What tiny.en and base wrote for unclear ordinary commands when given the names: redone without them."""
    encode = tiny._tokenizer("en").encode
    echo = PromptEcho(HOME, lambda word: is_unusual(word, encode))
    assert echo("Järvinen Heater")
    assert echo("Sauna, Thermostat, Kotatsu 21 degrees.")
    assert echo("Sauna, timer 410 minutes.")
    assert echo("Shit, Thermostat, Kotatsu, 21 degrees."), "a list of names, though it starts with another word"
    assert echo("Dimper bedroom Light, Oosterhout Light, 50%")
    assert echo("Dimper bedroom light, Oosterhout Light 50%"), "two names side by side, only a comma between them"
    assert echo("Grzegorz Light."), "words of the names, one of them without its possessive"
    assert echo("Dimper bedroom light, Oosterhout 50%"), "after a comma, a word that marks a name on its own"
    assert not echo("Turn off the Järvinen Heater.")
    assert not echo("Turn on the lights in Kaia's Room, please.")
    assert not echo("Set the Thermostat to 21 degrees."), "a name used in a command"
    assert not echo("And Järvinen Heater, 20 degrees."), "a comma after a name, but no name after it"
    assert not echo("Set the Living Room Light, W."), "no name after the comma"
    assert not echo("Okay, living is good."), "the first word of a name, but one that does not mark it"
    assert not echo("")
