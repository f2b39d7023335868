"""The Free GPU memory button parks the real server's model; the sensor and the diagnostics follow."""

import pytest
from homeassistant.components import stt
from homeassistant.components.button import DOMAIN as BUTTON_DOMAIN
from homeassistant.components.button import SERVICE_PRESS
from homeassistant.const import ATTR_ENTITY_ID
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.components.diagnostics import get_diagnostics_for_config_entry
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from .common import (
    UTTERANCE,
    StubControlServer,
    WhisperGpuServer,
    audio_stream,
    metadata,
    mirror,
    setup_integration,
    words,
)

BUTTON_ENTITY_ID = "button.whisper_gpu_free_gpu_memory"
STATE_SENSOR_ID = "sensor.whisper_gpu_model_state"
STT_ENTITY_ID = "stt.whisper_gpu_speech_to_text"


async def press(hass: HomeAssistant) -> None:
    """Press the Free GPU memory button."""
    await hass.services.async_call(BUTTON_DOMAIN, SERVICE_PRESS, {ATTR_ENTITY_ID: BUTTON_ENTITY_ID}, blocking=True)


async def test_the_button_parks_the_server_and_the_next_command_brings_it_back(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    server: WhisperGpuServer,
    mock_config_entry: MockConfigEntry,
    speech_pcm: bytes,
) -> None:
    """Pressed, the server's model is parked at once and the sensor says so; Assist still works afterwards."""
    config_entry = mock_config_entry
    await setup_integration(hass, config_entry)
    assert hass.states.get(STATE_SENSOR_ID).state == "ready"
    assert hass.states.get(BUTTON_ENTITY_ID) is not None

    await press(hass)
    _, status = server.request("GET", "/api/v1/status")
    assert status["state"] == "parked"
    assert status["parking"]["resident"] is False
    assert hass.states.get(STATE_SENSOR_ID).state == "parked"

    entity = stt.async_get_speech_to_text_entity(hass, STT_ENTITY_ID)
    assert entity is not None
    result = await entity.async_process_audio_stream(metadata(), audio_stream(speech_pcm))
    assert result.result is stt.SpeechResultState.SUCCESS
    assert words(result.text) == words(UTTERANCE)
    await hass.config_entries.async_get_entry(config_entry.entry_id).runtime_data.coordinator.async_refresh()
    assert hass.states.get(STATE_SENSOR_ID).state == "ready"

    diagnostics = await get_diagnostics_for_config_entry(hass, hass_client, config_entry)
    restore = diagnostics["server"]["status"]["parking"]["last_restore"]
    assert restore["trigger"] == "request"
    assert restore["seconds"] > 0


async def test_a_refused_park_says_why(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer, stub_server: StubControlServer
) -> None:
    """While the server loads a model it refuses to park; the button reports the server's reason."""
    mirror(stub_server, server)
    stub_server.routes["POST", "/api/v1/model/park"] = (409, {"error": "reload_in_progress", "message": "loading"})
    await setup_integration(hass, mock_config_entry, control_port=stub_server.port)

    with pytest.raises(HomeAssistantError, match="reload_in_progress") as raised:
        await press(hass)
    assert raised.value.translation_key == "park_refused"
    assert ("POST", "/api/v1/model/park", None) in stub_server.requests
