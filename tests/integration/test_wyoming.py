"""The Wyoming conversation of the integration, against a recording stub server."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from homeassistant.components import stt
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from pytest_homeassistant_custom_component.common import MockConfigEntry
from syrupy.assertion import SnapshotAssertion

from .common import StubWyomingServer, WhisperGpuServer, audio_stream, metadata, setup_integration

ENTITY_ID = "stt.whisper_gpu_speech_to_text"
AUDIO = bytes(range(256)) * 24  # 6144 bytes: three chunks of 2048


def recorded(stub: StubWyomingServer) -> list[dict[str, Any]]:
    """The events the stub got, with payload sizes instead of bytes."""
    return [{"type": event.type, "data": event.data, "payload": len(event.payload or b"")} for event in stub.events]


async def test_events_written(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_wyoming: StubWyomingServer,
    snapshot: SnapshotAssertion,
) -> None:
    """Exactly these events go out: describe at setup, then one transcription."""
    await setup_integration(hass, mock_config_entry, wyoming_port=stub_wyoming.port)
    entity = stt.async_get_speech_to_text_entity(hass, ENTITY_ID)
    assert entity is not None
    assert entity.audio_processing == stt.SpeechAudioProcessing(
        requires_external_vad=True, prefers_auto_gain_enabled=False, prefers_noise_reduction_enabled=False
    )

    result = await entity.async_process_audio_stream(metadata(), audio_stream(AUDIO))

    assert result == stt.SpeechResult("stub transcript", stt.SpeechResultState.SUCCESS)
    assert recorded(stub_wyoming) == snapshot


class PlainAsyncIterator:
    """Audio from an async iterator that is not a generator (nothing to close)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = iter(chunks)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None


async def test_plain_async_iterator(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer, stub_wyoming: StubWyomingServer
) -> None:
    """Any async iterable of bytes is streamed."""
    await setup_integration(hass, mock_config_entry, wyoming_port=stub_wyoming.port)
    entity = stt.async_get_speech_to_text_entity(hass, ENTITY_ID)
    assert entity is not None

    result = await entity.async_process_audio_stream(metadata(), PlainAsyncIterator([AUDIO[:2048], AUDIO[2048:]]))

    assert result.text == "stub transcript"
    assert [event.type for event in stub_wyoming.events][-3:] == ["audio-chunk", "audio-chunk", "audio-stop"]


@pytest.mark.parametrize("mode", ["close_on_stop", "cut_on_audio_stop"])
async def test_connection_closed_before_transcript(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_wyoming: StubWyomingServer,
    mode: str,
) -> None:
    """The server hangs up instead of answering, or in the middle of its answer: an error result, no exception."""
    await setup_integration(hass, mock_config_entry, wyoming_port=stub_wyoming.port)
    entity = stt.async_get_speech_to_text_entity(hass, ENTITY_ID)
    assert entity is not None
    stub_wyoming.mode = mode

    result = await entity.async_process_audio_stream(metadata(), audio_stream(AUDIO))

    assert result == stt.SpeechResult(None, stt.SpeechResultState.ERROR)


@pytest.mark.parametrize(
    ("mode", "state"),
    [
        ("ping_first", ConfigEntryState.LOADED),
        ("no_asr", ConfigEntryState.SETUP_RETRY),
        ("close_on_describe", ConfigEntryState.SETUP_RETRY),
        ("cut_on_describe", ConfigEntryState.SETUP_RETRY),
    ],
)
async def test_describe_answers(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_wyoming: StubWyomingServer,
    mode: str,
    state: ConfigEntryState,
) -> None:
    """Other events before info are skipped; no asr program or no answer: setup is retried."""
    stub_wyoming.mode = mode
    entry = mock_config_entry
    await setup_integration(hass, entry, wyoming_port=stub_wyoming.port)
    assert entry.state is state
