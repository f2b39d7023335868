"""End of speech, heard while the audio arrives: Silero VAD over 32 ms frames, its state kept between chunks.

The server ends a command itself when the speaker has been silent long enough after speaking, instead of
waiting for the client's `audio-stop` (Home Assistant's own VAD waits 0.7 s and then still pays for the whole
transcription). A pause is reported as soon as it begins, so the audio so far can be transcribed while the
silence is still being measured; speech that resumes before the end-of-command silence withdraws the pause.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from faster_whisper.vad import get_vad_model

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 512
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
# Silero v5 sees each frame with the last samples of the frame before it.
_CONTEXT_SAMPLES = 64
_STATE_SHAPE = (1, 1, 128)
# Speech ends when the probability falls this far below the threshold (Silero's own hysteresis).
_HYSTERESIS = 0.15


class SpeechEvent(StrEnum):
    """What changed in the audio of one request."""

    SPEECH = "speech"
    """Speech began, or resumed after a pause."""
    PAUSE = "pause"
    """Enough speech was heard, then silence long enough to be more than a gap between words."""
    END = "end"
    """The silence after speech reached the end-of-command length."""


@dataclass(frozen=True)
class EndpointSettings:
    """How speech is told from silence, and how much silence makes a pause and ends a command."""

    threshold: float
    min_speech_s: float
    end_silence_s: float
    pause_s: float = 0.2
    """Silence that makes a pause; at most half the end silence, so that a pause comes well before the end."""


class StreamingVad:
    """Speech probability of each frame, the model's state carried from one chunk of frames to the next.

    faster-whisper's Silero model (ONNX Runtime, which leaves the GIL while it runs) scores a whole recording
    at once; fed the same frames in pieces, this gives the same probabilities.
    """

    def __init__(self) -> None:
        self._session = get_vad_model().session
        self._h = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(_CONTEXT_SAMPLES, dtype=np.float32)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Probabilities for frames of shape (n, FRAME_SAMPLES)."""
        context = np.concatenate((self._context[np.newaxis], frames[:-1, -_CONTEXT_SAMPLES:]))
        window = np.concatenate((context, frames), axis=1)
        probabilities, self._h, self._c = self._session.run(None, {"input": window, "h": self._h, "c": self._c})
        self._context = frames[-1, -_CONTEXT_SAMPLES:].copy()
        return np.asarray(probabilities, dtype=np.float32).reshape(-1)


class Endpointer:
    """Follows one request's 16 kHz mono audio and says when the speaker paused and when they finished."""

    def __init__(self, settings: EndpointSettings) -> None:
        self._settings = settings
        self._vad = StreamingVad()
        self._carry = np.zeros(0, dtype=np.float32)
        self._speech_frames = 0
        self._silent_frames = 0
        self._in_speech = False
        self._paused = False
        self._held_end_s = 0.0
        self.ended = False
        self.samples = 0
        """Samples heard so far (whole frames only)."""
        self.speech_end = 0
        """Sample index where the last speech frame ended."""

    @property
    def in_speech(self) -> bool:
        """The audio heard so far ends in speech (a word may be cut off at its end)."""
        return self._in_speech

    @property
    def speech_seconds(self) -> float:
        """Speech heard so far."""
        return self._speech_frames * FRAME_SECONDS

    @property
    def end_silence_s(self) -> float:
        """Silence that ends the command now (longer while the speaker seems to be mid-sentence)."""
        return max(self._settings.end_silence_s, self._held_end_s)

    @property
    def silence_s(self) -> float:
        """Silence since the last speech frame."""
        return self._silent_frames * FRAME_SECONDS

    @property
    def silent_long_enough(self) -> bool:
        """Speech was heard and the silence after it is long enough to end the command (whether or not it may)."""
        return self.heard_speech and self.silence_s >= self.end_silence_s

    @property
    def heard_speech(self) -> bool:
        """At least the minimum speech duration was heard."""
        return self.speech_seconds >= self._settings.min_speech_s

    def hold_end(self, silence_s: float) -> None:
        """End the command at this pause only after `silence_s` of silence: the speaker seems to be mid-sentence.

        Speech that resumes lets go of it.
        """
        self._held_end_s = silence_s

    def feed(self, audio: np.ndarray, *, may_end: bool = True) -> list[SpeechEvent]:
        """Take the next piece of audio; the events it caused, in order. Nothing is reported after END.

        With `may_end` False, silence of the end-of-command length is only a pause: the audio is not live (it came
        from a buffer or a file), its sender has the rest of it at hand, and ending at a pause would drop what follows.
        """
        if self.ended:
            return []
        samples = np.concatenate((self._carry, audio.astype(np.float32, copy=False)))
        whole = len(samples) - len(samples) % FRAME_SAMPLES
        self._carry = samples[whole:]
        if not whole:
            return []
        events: list[SpeechEvent] = []
        for probability in self._vad(samples[:whole].reshape(-1, FRAME_SAMPLES)):
            self.samples += FRAME_SAMPLES
            event = self._step(float(probability), may_end=may_end)
            if event is not None:
                events.append(event)
                if event is SpeechEvent.END:
                    break
        return events

    def _step(self, probability: float, *, may_end: bool) -> SpeechEvent | None:
        threshold = self._settings.threshold
        if probability >= threshold or (self._in_speech and probability >= threshold - _HYSTERESIS):
            self._speech_frames += 1
            self._silent_frames = 0
            self.speech_end = self.samples
            resumed = not self._in_speech
            self._in_speech = True
            self._held_end_s = 0.0
            if resumed and (self._paused or self._speech_frames == 1):
                self._paused = False
                return SpeechEvent.SPEECH
            return None
        self._in_speech = False
        self._silent_frames += 1
        if not self.heard_speech:
            return None
        if may_end and self.silent_long_enough:
            self.ended = True
            return SpeechEvent.END
        if not self._paused and self.silence_s >= min(self._settings.pause_s, self._settings.end_silence_s / 2):
            self._paused = True
            return SpeechEvent.PAUSE
        return None
