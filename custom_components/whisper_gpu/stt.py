"""Speech-to-text entity: streams the pipeline's audio to the server over Wyoming."""

from collections.abc import AsyncGenerator, AsyncIterable
from contextlib import aclosing
from typing import Any, override

from homeassistant.components import stt
from homeassistant.components.stt.models import SpeechAudioProcessing
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity import EntityDescription
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .api import WhisperGpuError
from .const import CONF_SEND_NAMES, DEFAULT_SEND_NAMES, LOGGER
from .coordinator import WhisperGpuCoordinator
from .data import WhisperGpuConfigEntry
from .entity import WhisperGpuEntity

PARALLEL_UPDATES = 0

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
        updates = self.coordinator.client.async_transcribe_updates(stream, metadata.language, names)
        try:
            async with aclosing(updates):
                async for update in updates:
                    if update.final:
                        LOGGER.debug("Final transcript on %s: %s", self.entity_id, update.text)
                        yield stt.SpeechResult(update.text, stt.SpeechResultState.SUCCESS)
                        return
                    LOGGER.debug("Partial transcript on %s: %s", self.entity_id, update.text)
                    if PARTIAL_SPEECH_RESULT is not None:
                        yield PARTIAL_SPEECH_RESULT(text=update.text)
        except WhisperGpuError as err:
            LOGGER.warning("Speech-to-text on %s failed: %s", self.entity_id, err)
            yield stt.SpeechResult(None, stt.SpeechResultState.ERROR)
