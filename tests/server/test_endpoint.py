"""End of speech heard while the audio arrives: real speech from espeak-ng, fed the way a client streams it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from faster_whisper.vad import get_vad_model
from helpers.speech import Utterance, synthesize
from whisper_gpu.endpoint import FRAME_SAMPLES, SAMPLE_RATE, Endpointer, EndpointSettings, SpeechEvent, StreamingVad
from whisper_gpu.live import sounds_unfinished

SETTINGS = EndpointSettings(threshold=0.5, min_speech_s=0.25, end_silence_s=0.5)
# The VAD decides on 32 ms frames and needs a few of them to change its mind.
VAD_LAG_S = 0.15
LOUD = 0.01


def spoken(text: str, speech_dir: Path) -> np.ndarray:
    """The words alone: espeak-ng's own leading and trailing silence cut off."""
    pcm = Utterance(text, synthesize(text, speech_dir), clear=True).pcm()[0]
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    loud = np.nonzero(np.abs(audio) > LOUD)[0]
    return audio[loud[0] : loud[-1] + 1]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def stream(endpointer: Endpointer, audio: np.ndarray, chunk: int = 1024) -> list[tuple[SpeechEvent, float]]:
    """Feed audio in client-sized chunks; each event with the seconds of audio heard when it came."""
    events = []
    for start in range(0, len(audio), chunk):
        events += [(event, endpointer.samples / SAMPLE_RATE) for event in endpointer.feed(audio[start : start + chunk])]
    return events


def test_a_command_ends_after_the_silence_that_follows_it(speech_dir: Path) -> None:
    words = spoken("turn on the kitchen light", speech_dir)
    lead = 0.5
    speech_ends_at = lead + len(words) / SAMPLE_RATE

    events = stream(Endpointer(SETTINGS), np.concatenate((silence(lead), words, silence(2.0))))

    assert [event for event, _ in events] == [SpeechEvent.SPEECH, SpeechEvent.PAUSE, SpeechEvent.END]
    (_, speech_at), (_, pause_at), (_, end_at) = events
    assert lead <= speech_at <= lead + VAD_LAG_S
    assert speech_ends_at + SETTINGS.pause_s <= pause_at <= speech_ends_at + SETTINGS.pause_s + VAD_LAG_S
    assert speech_ends_at + SETTINGS.end_silence_s <= end_at <= speech_ends_at + SETTINGS.end_silence_s + VAD_LAG_S


def test_a_pause_inside_a_sentence_does_not_end_it(speech_dir: Path) -> None:
    first, second = spoken("turn on the kitchen light", speech_dir), spoken("and the fan", speech_dir)
    second_starts_at = (len(first) + len(silence(0.3))) / SAMPLE_RATE
    endpointer = Endpointer(SETTINGS)

    events = stream(endpointer, np.concatenate((first, silence(0.3), second, silence(2.0))))

    kinds = [event for event, _ in events]
    assert kinds == [SpeechEvent.SPEECH, SpeechEvent.PAUSE, SpeechEvent.SPEECH, SpeechEvent.PAUSE, SpeechEvent.END]
    assert events[-1][1] > second_starts_at + len(second) / SAMPLE_RATE
    assert endpointer.speech_end / SAMPLE_RATE > second_starts_at


@pytest.mark.parametrize("end_silence_s", [0.3, 0.5, 1.0])
def test_the_setting_decides_how_much_silence_ends_a_command(speech_dir: Path, end_silence_s: float) -> None:
    words = spoken("open the garage door", speech_dir)
    endpointer = Endpointer(EndpointSettings(threshold=0.5, min_speech_s=0.25, end_silence_s=end_silence_s))

    events = stream(endpointer, np.concatenate((words, silence(3.0))))

    end_at = events[-1][1]
    assert events[-1][0] is SpeechEvent.END
    assert end_silence_s <= end_at - endpointer.speech_end / SAMPLE_RATE <= end_silence_s + 2 * 512 / SAMPLE_RATE


def test_silence_and_hum_never_end_anything() -> None:
    time = np.arange(5 * SAMPLE_RATE) / SAMPLE_RATE
    hum = (0.05 * np.sin(2 * np.pi * 50 * time)).astype(np.float32)
    endpointer = Endpointer(SETTINGS)

    assert stream(endpointer, np.concatenate((silence(3.0), hum))) == []
    assert not endpointer.ended


def test_a_click_shorter_than_the_minimum_speech_is_no_command(speech_dir: Path) -> None:
    click = spoken("it", speech_dir)[: int(0.1 * SAMPLE_RATE)]
    endpointer = Endpointer(EndpointSettings(threshold=0.5, min_speech_s=0.5, end_silence_s=0.5))

    events = stream(endpointer, np.concatenate((silence(0.5), click, silence(2.0))))

    assert SpeechEvent.END not in [event for event, _ in events]


@pytest.mark.parametrize("chunk", [160, 512, 1000, 16_000])
def test_chunk_sizes_do_not_change_what_is_heard(speech_dir: Path, chunk: int) -> None:
    audio = np.concatenate((silence(0.3), spoken("lock the front door", speech_dir), silence(1.5)))
    reference = stream(Endpointer(SETTINGS), audio, chunk=1024)

    events = stream(Endpointer(SETTINGS), audio, chunk=chunk)

    # An event is reported with the chunk that completes its frame: at most one chunk later.
    assert [event for event, _ in events] == [event for event, _ in reference]
    for (_, at), (_, expected) in zip(events, reference, strict=True):
        assert expected <= at + 1e-9
        assert at - expected <= max(chunk, 1024) / SAMPLE_RATE


def test_nothing_is_reported_after_the_end(speech_dir: Path) -> None:
    endpointer = Endpointer(SETTINGS)
    stream(endpointer, np.concatenate((spoken("stop the music", speech_dir), silence(1.0))))
    assert endpointer.ended

    assert stream(endpointer, np.concatenate((spoken("and play it again", speech_dir), silence(1.0)))) == []


def test_streamed_probabilities_equal_those_of_the_whole_recording(speech_dir: Path) -> None:
    """The state carried between chunks is the model's own: pieces score exactly as the recording at once."""
    audio = np.concatenate((spoken("what time is it", speech_dir), silence(0.5)))
    frames = audio[: len(audio) - len(audio) % FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    vad = StreamingVad()

    pieces = [vad(frames[start : start + 3]) for start in range(0, len(frames), 3)]

    np.testing.assert_array_equal(np.concatenate(pieces), get_vad_model()(frames.reshape(-1).copy()).reshape(-1))


def test_a_held_pause_ends_the_command_only_after_the_longer_silence(speech_dir: Path) -> None:
    """The text so far stopped mid-sentence ("turn on the..."): this pause needs the longer silence to end it."""
    words = spoken("turn on the", speech_dir)
    endpointer = Endpointer(SETTINGS)
    assert [event for event, _ in stream(endpointer, np.concatenate((words, silence(0.25))))] == [
        SpeechEvent.SPEECH,
        SpeechEvent.PAUSE,
    ]

    endpointer.hold_end(1.5)
    events = stream(endpointer, silence(2.0))

    assert [event for event, _ in events] == [SpeechEvent.END]
    assert 1.5 <= events[0][1] - endpointer.speech_end / SAMPLE_RATE <= 1.5 + 2 * 512 / SAMPLE_RATE


def test_speech_that_resumes_lets_go_of_a_held_pause(speech_dir: Path) -> None:
    endpointer = Endpointer(SETTINGS)
    stream(endpointer, np.concatenate((spoken("turn on the", speech_dir), silence(0.25))))
    endpointer.hold_end(1.5)

    stream(endpointer, np.concatenate((silence(0.4), spoken("kitchen light", speech_dir))))
    events = stream(endpointer, silence(1.0))

    assert [event for event, _ in events][-1] is SpeechEvent.END
    assert events[-1][1] - endpointer.speech_end / SAMPLE_RATE <= SETTINGS.end_silence_s + 2 * 512 / SAMPLE_RATE


def test_silence_that_may_not_end_the_command_is_only_a_pause(speech_dir: Path) -> None:
    """Audio sent faster than spoken: the silence is measured, and the end comes once the audio may end."""
    endpointer = Endpointer(SETTINGS)
    audio = np.concatenate((spoken("open the garage door", speech_dir), silence(1.0)))

    held = [
        event
        for start in range(0, len(audio), 1024)
        for event in endpointer.feed(audio[start : start + 1024], may_end=False)
    ]

    assert SpeechEvent.END not in held
    assert endpointer.silence_s >= SETTINGS.end_silence_s
    assert endpointer.feed(silence(0.064)) == [SpeechEvent.END]


@pytest.mark.parametrize(
    ("text", "language", "unfinished"),
    [
        ("Turn on the...", "en", True),
        ("Turn on the", "en", True),
        ("Set the heating to, uh", "en", True),
        ("Turn off the lights,", "en", True),
        ("Schalte das Licht im…", "de", True),
        ("Turn on the kitchen light.", "en", False),
        ("Turn the light on.", "en", False),
        ("What time is it?", "en", False),
        ("Schalte das Licht an.", "de", False),
        ("", "en", False),
    ],
)
def test_text_that_stops_mid_sentence_is_told_apart(text: str, language: str, unfinished: bool) -> None:
    assert sounds_unfinished(text, language) is unfinished
