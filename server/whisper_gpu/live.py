"""One request followed while its audio arrives: where the command ends, and the text before it ends.

When the speaker pauses, the audio so far is transcribed at once, below other clients' final transcripts in
priority; if speech resumes that work is dropped, and when the pause turns out to be the end of the command its text
is usually ready already. While the speaker talks, partial transcripts are made the same way, at most one at a time.
All of it happens only while the audio arrives about as fast as it is spoken: audio sent from a buffer or a file is
over before anyone could read partial text or gain from a speculation, which would only hold up the queue, and its
pauses do not end the command (its sender has the rest at hand: ending there would drop words that were said).
Nothing here knows the Wyoming protocol: the handler decides what goes to the client.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .endpoint import SAMPLE_RATE, Endpointer, EndpointSettings, SpeechEvent
from .engine import TranscriptResult
from .errors import RequestError
from .inference import Urgency

_LOGGER = logging.getLogger(__name__)
# With less speech than this, Whisper guesses wildly at audio cut off mid-sentence (measured on base and tiny.en).
_MIN_PARTIAL_SPEECH_S = 2.0
# Audio that came more than this many times faster than it is spoken comes from a buffer or a file. A satellite that
# sends the second it buffered before the wake word at once, then streams, stays below it.
_FASTER_THAN_SPOKEN = 2.0
# Silence that ends a command whose text so far stops mid-sentence ("turn on the...", "set the heating to, uh").
HESITATION_END_S = 1.5
# Whisper marks a thought left open with a trailing ellipsis, comma or dash, in any language.
_OPEN_ENDING = re.compile("(\\.\\.\\.|\u2026|,|-|\u2013|\u2014)\\s*$")  # three dots, ellipsis, comma, dashes
# English words a command does not end on: articles, prepositions, conjunctions, possessives and fillers. Not the
# particles of phrasal verbs ("turn the light on", "turn it off", "turn it up").
_UNFINISHED_ENGLISH = frozenset(
    (
        *("the", "a", "an", "to", "of", "at", "for", "with", "from", "into", "by", "and", "or", "but"),
        *("my", "your", "our", "their", "uh", "um", "uhm", "er", "erm", "hmm", "mm"),
    )
)


class Transcriber(Protocol):
    """What a live request needs from the service."""

    async def transcribe(
        self,
        audio: np.ndarray,
        language: str | None,
        *,
        urgency: Urgency | None = None,
        names: tuple[str, ...] = (),
    ) -> tuple[TranscriptResult, str]:
        """Transcribe 16 kHz mono audio, biased toward the names; the result and the model's name."""

    def promote(self, urgency: Urgency) -> None:
        """Raise background work to final; RequestError (server_busy) when it must wait and the queue is full."""


@dataclass(frozen=True)
class LiveSettings:
    """How a request is followed: end-of-command detection (None: off) and partial transcripts (0: off)."""

    endpoint: EndpointSettings | None
    partial_interval_s: float

    @property
    def active(self) -> bool:
        """Whether there is anything to follow."""
        return self.endpoint is not None or self.partial_interval_s > 0


class LiveRequest:
    """The audio of one request as it arrives, with the speculative and partial work done on it.

    The audio itself stays with its owner, who hands over each new piece and, on demand, all of it so far.
    """

    def __init__(  # noqa: PLR0913 - the request's own language and names beside the shared service and settings
        self,
        service: Transcriber,
        language: str | None,
        settings: LiveSettings,
        audio_so_far: Callable[[], np.ndarray],
        on_partial: Callable[[str], Awaitable[None]],
        *,
        names: tuple[str, ...] = (),
    ) -> None:
        self._service = service
        self._language = language
        self._names = names
        self._settings = settings
        self._on_partial = on_partial
        self._endpointer = Endpointer(settings.endpoint) if settings.endpoint else None
        self._audio = audio_so_far
        self._samples = 0
        self._first_audio_at = 0.0
        self._speculation: asyncio.Task[tuple[TranscriptResult, str]] | None = None
        self._speculation_urgency = Urgency(background=True)
        self._partial: asyncio.Task[None] | None = None
        self._partial_at = 0
        self._last_partial = ""

    @property
    def ended(self) -> bool:
        """The speaker has been silent long enough after speaking: the command is over."""
        return self._endpointer is not None and self._endpointer.ended

    def hear(self, audio: np.ndarray) -> bool:
        """Take newly arrived audio; True when it ended the command."""
        if self.ended or not len(audio):
            return self.ended
        if not self._samples:
            self._first_audio_at = time.monotonic()
        self._samples += len(audio)
        live = not self._faster_than_spoken()
        may_end = live and self._pause_text_known()
        for event in self._endpointer.feed(audio, may_end=may_end) if self._endpointer else ():
            if event is SpeechEvent.PAUSE and live:
                self._speculate()
            elif event is SpeechEvent.SPEECH:
                self._drop_speculation()
        if not self.ended:
            self._maybe_partial()
        return self.ended

    async def final(self, audio: np.ndarray) -> tuple[TranscriptResult, str]:
        """The request's transcript: the speculative one when no speech came after its pause, else a new one."""
        self._drop_partial()
        speculation = self._speculation
        if speculation is not None and not speculation.cancelled():
            try:
                self._service.promote(self._speculation_urgency)  # it is somebody's final answer now
            except Exception:
                self._drop_speculation()
                raise
            try:
                return await speculation
            except asyncio.CancelledError:
                if not speculation.cancelled():
                    raise  # the caller itself was cancelled
        return await self._service.transcribe(audio, self._language, names=self._names)

    def close(self) -> None:
        """Drop background work that nobody will read."""
        self._drop_partial()
        self._drop_speculation()

    def _pause_text_known(self) -> bool:
        """Whether the text of the pause is in (or none is coming), so that the command may end.

        The end waits for it: the transcript could not go out sooner anyway, and the text may show that the speaker
        is mid-sentence. Once the silence is long enough to end the command, the text is what somebody waits for.
        """
        speculation = self._speculation
        if speculation is None or speculation.done():
            return True
        assert self._endpointer is not None  # noqa: S101 - speculations start at the endpointer's pauses
        if self._endpointer.silent_long_enough and self._speculation_urgency.background:
            try:
                self._service.promote(self._speculation_urgency)
            except RequestError:  # a full queue: end now, and the final transcript reports it
                return True
        return False

    def _faster_than_spoken(self) -> bool:
        """The audio came from a buffer or a file: its end, and the final transcript, follow at once."""
        return self._samples / SAMPLE_RATE > _FASTER_THAN_SPOKEN * (time.monotonic() - self._first_audio_at)

    def _speculate(self) -> None:
        """The speaker paused: transcribe what they said so far, in case this is the end."""
        self._drop_speculation()
        self._drop_partial()
        self._speculation_urgency = Urgency(background=True)
        self._speculation = asyncio.create_task(
            self._service.transcribe(
                self._audio(), self._language, urgency=self._speculation_urgency, names=self._names
            )
        )
        self._speculation.add_done_callback(self._hold_if_unfinished)

    def _hold_if_unfinished(self, speculation: asyncio.Task[tuple[TranscriptResult, str]]) -> None:
        """Wait longer for the end of a command whose text so far stops mid-sentence."""
        if speculation is not self._speculation or speculation.cancelled() or speculation.exception() is not None:
            return
        result, _ = speculation.result()
        if self._endpointer is not None and sounds_unfinished(result.text, result.language):
            self._endpointer.hold_end(HESITATION_END_S)

    def _drop_speculation(self) -> None:
        if self._speculation is not None and not self._speculation.done():
            self._speculation.cancel()
        self._speculation = None

    def _maybe_partial(self) -> None:
        """Start a partial transcript when enough new speech came and nothing else is being transcribed."""
        interval = self._settings.partial_interval_s
        if interval <= 0 or (self._partial is not None and not self._partial.done()) or self._speculation:
            return
        if self._endpointer is not None and self._endpointer.speech_seconds < _MIN_PARTIAL_SPEECH_S:
            return
        if (self._samples - self._partial_at) / SAMPLE_RATE < interval:
            return
        if self._faster_than_spoken():
            return
        self._partial_at = self._samples
        mid_word = self._endpointer is None or self._endpointer.in_speech
        self._partial = asyncio.create_task(self._make_partial(self._audio(), mid_word=mid_word))

    async def _make_partial(self, audio: np.ndarray, *, mid_word: bool) -> None:
        try:
            result, _ = await self._service.transcribe(
                audio, self._language, urgency=Urgency(background=True), names=self._names
            )
        except Exception as err:  # noqa: BLE001 - a partial transcript is a courtesy; the final one reports errors
            _LOGGER.debug("Partial transcript failed: %s", err)
            return
        text = result.text.strip()
        if mid_word:
            # Audio cut in the middle of speech ends in half a word, which Whisper guesses at: hold it back.
            text = text.rpartition(" ")[0].rstrip(",;:")
        if text and text != self._last_partial and not self.ended:
            self._last_partial = text
            await self._on_partial(text)

    def _drop_partial(self) -> None:
        if self._partial is not None and not self._partial.done():
            self._partial.cancel()
        self._partial = None


def sounds_unfinished(text: str, language: str) -> bool:
    """Whether a transcript stops mid-sentence: an open ending, or (English) a word no command ends on."""
    text = text.strip()
    if _OPEN_ENDING.search(text):
        return True
    words = re.findall(r"[\w']+", text.lower())
    return language == "en" and bool(words) and words[-1] in _UNFINISHED_ENGLISH
