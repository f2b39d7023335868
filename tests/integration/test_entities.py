"""The model select and the sensors, on a real server."""

import asyncio
from typing import Any

import pytest
from homeassistant.components import stt
from homeassistant.components.select import ATTR_OPTION, ATTR_OPTIONS, SERVICE_SELECT_OPTION
from homeassistant.components.select import DOMAIN as SELECT_DOMAIN
from homeassistant.const import ATTR_ENTITY_ID, ATTR_UNIT_OF_MEASUREMENT
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.whisper_gpu.const import DOMAIN, SCAN_INTERVAL

from .common import (
    SECOND_MODEL,
    STARTUP_TIMEOUT,
    TEST_MODEL,
    StubControlServer,
    WhisperGpuServer,
    audio_stream,
    metadata,
    mirror,
    poll,
    setup_integration,
)

STT_ENTITY_ID = "stt.whisper_gpu_speech_to_text"

SELECT_ENTITY_ID = "select.whisper_gpu_model"


async def select_model(hass: HomeAssistant, option: str) -> None:
    """Call select.select_option on the model select."""
    await hass.services.async_call(
        SELECT_DOMAIN,
        SERVICE_SELECT_OPTION,
        {ATTR_ENTITY_ID: SELECT_ENTITY_ID, ATTR_OPTION: option},
        blocking=True,
    )


async def test_select_switches_model(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry
) -> None:
    """Selecting a model switches the server; languages follow the new model."""
    await setup_integration(hass, mock_config_entry)
    state = hass.states.get(SELECT_ENTITY_ID)
    assert state.state == TEST_MODEL
    assert SECOND_MODEL in state.attributes[ATTR_OPTIONS]

    await select_model(hass, SECOND_MODEL)
    # The call returns once the new model serves, not before.
    _, status = server.request("GET", "/api/v1/status")
    assert (status["state"], status["model"]["name"], status["target"]) == ("ready", SECOND_MODEL, None)
    assert server.settings()["model"] == SECOND_MODEL
    await poll(hass)

    assert hass.states.get(SELECT_ENTITY_ID).state == SECOND_MODEL
    assert hass.states.get("sensor.whisper_gpu_loaded_model").state == SECOND_MODEL
    entity = stt.async_get_speech_to_text_entity(hass, STT_ENTITY_ID)
    assert entity is not None
    assert "de" in entity.supported_languages


async def test_a_switch_shows_as_soon_as_the_new_model_serves(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry
) -> None:
    """While the server loads a model the entities follow it closely, not at the next 30 s poll."""
    await setup_integration(hass, mock_config_entry)
    started = asyncio.get_running_loop().time()

    await select_model(hass, SECOND_MODEL)
    async with asyncio.timeout(STARTUP_TIMEOUT):
        while hass.states.get("sensor.whisper_gpu_loaded_model").state != SECOND_MODEL:
            await asyncio.sleep(0.1)

    assert asyncio.get_running_loop().time() - started < SCAN_INTERVAL.total_seconds() / 2
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
    assert mock_config_entry.runtime_data.coordinator.update_interval == SCAN_INTERVAL, "back to the slow poll"


@pytest.mark.parametrize(
    ("answer", "translation_key", "reauth"),
    [
        ((400, {"errors": {"model": "insufficient_memory"}}), "setting_rejected", 0),
        ((409, {"error": "reload_in_progress"}), "setting_rejected", 0),
        ((401, {"error": "unauthorized"}), "invalid_auth", 1),
        ((500, None), "cannot_connect", 0),
    ],
)
async def test_select_errors(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_server: StubControlServer,
    answer: tuple[int, Any],
    translation_key: str,
    reauth: int,
) -> None:
    """A refused switch raises a translated error and changes nothing."""
    mirror(stub_server, server)
    stub_server.routes["PATCH", "/api/v1/settings"] = answer
    entry = mock_config_entry
    await setup_integration(hass, entry, control_port=stub_server.port)

    with pytest.raises(HomeAssistantError) as err:
        await select_model(hass, SECOND_MODEL)

    assert err.value.translation_domain == DOMAIN
    assert err.value.translation_key == translation_key
    assert hass.states.get(SELECT_ENTITY_ID).state == TEST_MODEL
    assert entry.runtime_data.coordinator.data.settings["model"] == TEST_MODEL
    assert len(hass.config_entries.flow.async_progress_by_handler(DOMAIN)) == reauth


async def test_select_a_model_that_fails_to_load(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    own_server: WhisperGpuServer,
    issue_registry: ir.IssueRegistry,
) -> None:
    """A listed model that cannot be loaded (a damaged copy, offline): the call fails with the reason.

    The old model keeps serving, the select shows it again and no repair issue is raised.
    """
    damaged = own_server.data_dir / ".cache" / "models" / "someone--whisper-custom"
    damaged.mkdir(parents=True)
    (damaged / "config.json").write_text("{}")
    (damaged / "model.bin").write_bytes(b"\x00" * 4096)
    own_server.start()
    entry = mock_config_entry
    await setup_integration(hass, entry, **own_server.entry_data())
    assert "someone/whisper-custom" in hass.states.get(SELECT_ENTITY_ID).attributes[ATTR_OPTIONS]

    with pytest.raises(HomeAssistantError) as err:
        await select_model(hass, "someone/whisper-custom")

    assert err.value.translation_key == "model_not_available_offline"
    assert err.value.translation_placeholders["model"] == "someone/whisper-custom"
    await poll(hass)
    assert hass.states.get(SELECT_ENTITY_ID).state == TEST_MODEL
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
    assert hass.states.get("sensor.whisper_gpu_loaded_model").state == TEST_MODEL
    assert issue_registry.async_get_issue(DOMAIN, f"model_failed_{entry.entry_id}") is None


async def test_select_keeps_a_model_outside_the_list(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer, stub_server: StubControlServer
) -> None:
    """A model directory set on the server shows as the current option."""
    mirror(stub_server, server)
    status, body = stub_server.routes["GET", "/api/v1/settings"]
    body["settings"]["model"] = "/models/my-finetune"
    stub_server.routes["GET", "/api/v1/settings"] = (status, body)
    entry = mock_config_entry
    await setup_integration(hass, entry, control_port=stub_server.port)

    state = hass.states.get(SELECT_ENTITY_ID)
    assert state.state == "/models/my-finetune"
    assert state.attributes[ATTR_OPTIONS][-1] == "/models/my-finetune"


async def test_sensors(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry, speech_pcm: bytes
) -> None:
    """Model state, loaded model and the last request's duration."""
    await setup_integration(hass, mock_config_entry)
    state = hass.states.get("sensor.whisper_gpu_model_state")
    assert state.state == "ready"
    assert state.attributes["options"] == ["loading", "downloading", "ready", "parked", "failed"]

    entity = stt.async_get_speech_to_text_entity(hass, STT_ENTITY_ID)
    assert entity is not None
    await entity.async_process_audio_stream(metadata(), audio_stream(speech_pcm))
    await poll(hass)

    latency = hass.states.get("sensor.whisper_gpu_last_request_duration")
    assert float(latency.state) > 0
    assert latency.attributes[ATTR_UNIT_OF_MEASUREMENT] == "ms"
    _, status = server.request("GET", "/api/v1/status")
    assert float(latency.state) == pytest.approx(status["last_request"]["duration_ms"])


async def test_unknown_model_state(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer, stub_server: StubControlServer
) -> None:
    """A state this version does not know reads as unknown, not as a wrong value."""
    mirror(stub_server, server)
    status, body = stub_server.routes["GET", "/api/v1/status"]
    stub_server.routes["GET", "/api/v1/status"] = (status, {**body, "state": "warming_up", "last_request": None})
    entry = mock_config_entry
    await setup_integration(hass, entry, control_port=stub_server.port)

    assert hass.states.get("sensor.whisper_gpu_model_state").state == "unknown"
    assert hass.states.get("sensor.whisper_gpu_last_request_duration").state == "unknown"
