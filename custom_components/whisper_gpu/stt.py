"""Speech-to-text entity: streams the pipeline's audio to the server over Wyoming."""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable
from contextlib import aclosing
from typing import Any, override

from homeassistant.components import stt
from homeassistant.components.stt.models import SpeechAudioProcessing
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity import EntityDescription
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .api import WhisperGpuClient, WhisperGpuConnectionError, WhisperGpuError, WhisperGpuTranscriptionError
from .const import CONF_SEND_NAMES, DEFAULT_SEND_NAMES, LOGGER
from .coordinator import WhisperGpuCoordinator
from .data import WhisperGpuConfigEntry
from .entity import WhisperGpuEntity

PARALLEL_UPDATES = 0

# Error codes with which a replica says it cannot serve now (no model loaded yet, a full queue): another may.
REPLICA_ERROR_CODES = frozenset({"model_not_ready", "server_busy"})

STT_DESCRIPTION = EntityDescription(key="stt", translation_key="speech_to_text")
AUTO_LANGUAGE = "auto"
# Partial results came with Home Assistant 2026.11; older releases take only the final one.
PARTIAL_SPEECH_RESULT: type[Any] | None = getattr(stt, "PartialSpeechResult", None)


async def async_setup_entry(
    hass: HomeAssistant,  # noqa: ARG001
    entry: WhisperGpuConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the speech-to-text entity of a server."""
    data = entry.runtime_data
    audio_processing = SpeechAudioProcessing(
        requires_external_vad=data.asr.requires_external_vad,
        prefers_auto_gain_enabled=data.asr.prefers_auto_gain_enabled,
        prefers_noise_reduction_enabled=data.asr.prefers_noise_reduction_enabled,
    )
    async_add_entities([WhisperGpuSpeechToText(data.coordinator, STT_DESCRIPTION, audio_processing)])


class WhisperGpuSpeechToText(WhisperGpuEntity, stt.SpeechToTextEntity):
    """Transcribes the audio of an Assist pipeline on a whisper-gpu server."""

    def __init__(
        self,
        coordinator: WhisperGpuCoordinator,
        description: EntityDescription,
        audio_processing: SpeechAudioProcessing,
    ) -> None:
        """Set up the entity with what the server's Wyoming info asks for."""
        super().__init__(coordinator, description)
        self._audio_processing = audio_processing

    @property
    @override
    def supported_languages(self) -> list[str]:
        """Return the languages of the model the server has loaded."""
        return [language for language in self.coordinator.info.languages if language != AUTO_LANGUAGE]

    @property
    @override
    def supported_formats(self) -> list[stt.AudioFormats]:
        """Return the audio container formats: WAV."""
        return [stt.AudioFormats.WAV]

    @property
    @override
    def supported_codecs(self) -> list[stt.AudioCodecs]:
        """Return the audio codecs: PCM."""
        return [stt.AudioCodecs.PCM]

    @property
    @override
    def supported_bit_rates(self) -> list[stt.AudioBitRates]:
        """Return the sample widths: 16 bit."""
        return [stt.AudioBitRates.BITRATE_16]

    @property
    @override
    def supported_sample_rates(self) -> list[stt.AudioSampleRates]:
        """Return the sample rates: 16 kHz."""
        return [stt.AudioSampleRates.SAMPLERATE_16000]

    @property
    @override
    def supported_channels(self) -> list[stt.AudioChannels]:
        """Return the channel counts: mono."""
        return [stt.AudioChannels.CHANNEL_MONO]

    @property
    @override
    def audio_processing(self) -> SpeechAudioProcessing:
        """Return what the server asks the pipeline to do with the audio."""
        return self._audio_processing

    @override
    async def async_process_audio_stream(
        self, metadata: stt.SpeechMetadata, stream: AsyncIterable[bytes]
    ) -> stt.SpeechResult:
        """Stream the audio to the server while it arrives; return the text (Home Assistant without partials)."""
        async with aclosing(self.async_process_audio_stream_with_progress(metadata, stream)) as results:
            async for result in results:
                if isinstance(result, stt.SpeechResult):
                    return result
        return stt.SpeechResult(None, stt.SpeechResultState.ERROR)  # pragma: no cover - results end final

    async def async_process_audio_stream_with_progress(
        self, metadata: stt.SpeechMetadata, stream: AsyncIterable[bytes]
    ) -> AsyncGenerator[Any]:
        """Stream the audio to the server; yield the text so far while it arrives, then the final result.

        Home Assistant 2026.11 and later call this; partial results exist there only (`PartialSpeechResult`).
        The final result comes as soon as the server sends it, which with its end-of-command detection is before
        the pipeline's audio ends: the audio stops being read then, and the pipeline moves on without waiting for
        its own VAD.
        """
        entry = self.coordinator.config_entry
        names = entry.runtime_data.names.names if entry.options.get(CONF_SEND_NAMES, DEFAULT_SEND_NAMES) else None
        tape = AudioTape(stream)
        try:
            async with aclosing(self._async_transcribe(tape, metadata.language, names)) as results:
                async for result in results:
                    yield result
        finally:
            await tape.aclose()

    async def _async_transcribe(self, tape: AudioTape, language: str, names: list[str] | None) -> AsyncGenerator[Any]:
        """Transcribe on a ready replica in turn (a single server: its host name); if it fails, once on another.

        The coordinator chooses both (see transcription_clients). A replica failed the request when the connection
        broke before the transcript came, or when it answered that it has no model ready or no room in its queue.
        The other replica gets the audio from its start (the tape kept it), then the rest as it arrives. Any other
        error event of the server is about the request itself (its audio, its language) and is not retried.
        """
        clients = self.coordinator.transcription_clients()
        for client, then in zip(clients, [*clients[1:], None], strict=True):
            try:
                async for result in self._async_transcribe_on(client, tape.replay(), language, names):
                    yield result
            except WhisperGpuError as err:
                if then is None or not _replica_failed(err):
                    LOGGER.warning("Speech-to-text on %s failed: %s", self.entity_id, err)
                    yield stt.SpeechResult(None, stt.SpeechResultState.ERROR)
                    return
                LOGGER.warning(
                    "Speech-to-text on %s failed on its replica %s (%s); trying again on %s",
                    self.entity_id,
                    client.host,
                    err,
                    then.host,
                )
                continue
            return

    async def _async_transcribe_on(
        self, client: WhisperGpuClient, audio: AsyncIterable[bytes], language: str, names: list[str] | None
    ) -> AsyncGenerator[Any]:
        """Stream the audio to one server; yield the text so far, then the final result."""
        updates = client.async_transcribe_updates(audio, language, names)
        async with aclosing(updates):
            async for update in updates:
                if update.final:
                    LOGGER.debug("Final transcript on %s: %s", self.entity_id, update.text)
                    yield stt.SpeechResult(update.text, stt.SpeechResultState.SUCCESS)
                    return
                LOGGER.debug("Partial transcript on %s: %s", self.entity_id, update.text)
                if PARTIAL_SPEECH_RESULT is not None:
                    yield PARTIAL_SPEECH_RESULT(text=update.text)


def _replica_failed(err: WhisperGpuError) -> bool:
    """Whether the replica, not the request, failed: the connection broke, or it cannot serve anything now."""
    if isinstance(err, WhisperGpuTranscriptionError):
        return err.code in REPLICA_ERROR_CODES
    return isinstance(err, WhisperGpuConnectionError)


class AudioTape:
    """The pipeline's audio, read once and kept, so that a second connection can be sent it from its start.

    The pipeline's stream is read in a task of its own: a connection that breaks cancels its upload, and that
    must not cancel the read of the pipeline's audio, which the next connection goes on with.
    """

    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        """Keep the stream; nothing is read yet."""
        self._source = aiter(stream)
        self._chunks: list[bytes] = []
        self._ended = False
        self._pending: asyncio.Task[bytes | None] | None = None

    async def _async_next_from_source(self) -> bytes | None:
        return await anext(self._source, None)

    async def _async_chunk(self, index: int) -> bytes | None:
        """Return the chunk at index, reading the stream up to it; None past its end."""
        while index >= len(self._chunks):
            if self._ended:
                return None
            if self._pending is None:
                self._pending = asyncio.create_task(self._async_next_from_source())
            pending = self._pending
            chunk = await asyncio.shield(pending)
            if self._pending is pending:
                self._pending = None
                if chunk is None:
                    self._ended = True
                else:
                    self._chunks.append(chunk)
        return self._chunks[index]

    async def replay(self) -> AsyncGenerator[bytes]:
        """Yield the audio from its start: what was kept, then the rest as the pipeline streams it."""
        index = 0
        while (chunk := await self._async_chunk(index)) is not None:
            yield chunk
            index += 1

    async def aclose(self) -> None:
        """Stop reading the pipeline's audio (the transcript came before it ended)."""
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.gather(self._pending, return_exceptions=True)
            self._pending = None
        if isinstance(self._source, AsyncGenerator):
            await self._source.aclose()
