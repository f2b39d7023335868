"""Setup, unload, availability, settings read from the server and repairs, with a real server."""

import dataclasses
from typing import Any
from unittest.mock import AsyncMock

import pytest
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.whisper_gpu.api import WhisperGpuConnectionError
from custom_components.whisper_gpu.const import DOMAIN

from .common import StubControlServer, WhisperGpuServer, mirror, poll, setup_integration

ENTITIES = (
    "stt.whisper_gpu_speech_to_text",
    "button.whisper_gpu_free_gpu_memory",
    "select.whisper_gpu_model",
    "sensor.whisper_gpu_model_state",
    "sensor.whisper_gpu_loaded_model",
    "sensor.whisper_gpu_last_request_duration",
    "sensor.whisper_gpu_ready_replicas",
)


async def test_setup_unload_reload(
    hass: HomeAssistant,
    server: WhisperGpuServer,
    mock_config_entry: MockConfigEntry,
    device_registry: dr.DeviceRegistry,
    entity_registry: er.EntityRegistry,
) -> None:
    """One service device with its entities; reload and unload leave nothing behind."""
    await setup_integration(hass, mock_config_entry)
    assert mock_config_entry.state is ConfigEntryState.LOADED

    device = device_registry.async_get_device_by_identifier((DOMAIN, server.server_id), mock_config_entry.entry_id)
    assert device is not None
    assert device.entry_type is dr.DeviceEntryType.SERVICE
    assert device.sw_version == "0.1.0"
    assert device.name == "whisper-gpu"
    entities = er.async_entries_for_config_entry(entity_registry, mock_config_entry.entry_id)
    assert sorted(entity.entity_id for entity in entities) == sorted(ENTITIES)
    assert all(entity.device_id == device.id for entity in entities)
    assert all(entity.unique_id.startswith(server.server_id) for entity in entities)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
    assert hass.states.get("sensor.whisper_gpu_loaded_model").state == "tiny.en"
    assert hass.states.get("select.whisper_gpu_model").state == "tiny.en"
    ready = hass.states.get("sensor.whisper_gpu_ready_replicas")
    assert (ready.state, ready.attributes["replicas"]) == ("1", 1), "a single server is one replica of one"

    assert await hass.config_entries.async_reload(mock_config_entry.entry_id)
    await hass.async_block_till_done()
    assert mock_config_entry.state is ConfigEntryState.LOADED

    assert await hass.config_entries.async_unload(mock_config_entry.entry_id)
    await hass.async_block_till_done()
    assert mock_config_entry.state is ConfigEntryState.NOT_LOADED
    assert all(hass.states.get(entity_id).state == STATE_UNAVAILABLE for entity_id in ENTITIES)


async def test_setup_retries_while_server_down(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer, closed_port: int
) -> None:
    """A server that does not answer at start: setup is retried, with the reason."""
    entry = mock_config_entry
    await setup_integration(hass, entry, control_port=closed_port)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert entry.error_reason_translation_key == "cannot_connect"


async def test_setup_retries_while_wyoming_down(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer, closed_port: int
) -> None:
    """The control API answers but the Wyoming port does not: setup is retried."""
    entry = mock_config_entry
    await setup_integration(hass, entry, wyoming_port=closed_port)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert entry.error_reason_translation_key == "wyoming_unreachable"


async def test_settings_changed_on_the_server_show_in_the_options_form(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry
) -> None:
    """A change made on the server (curl, another client) is what the options form offers next; no copy is kept."""
    await setup_integration(hass, mock_config_entry)

    status, body = server.request("PATCH", "/api/v1/settings", {"beam_size": 2, "vad_threshold": 0.3})
    assert status == 200, body
    await poll(hass)

    result = await hass.config_entries.options.async_init(mock_config_entry.entry_id)
    suggested = {
        str(key): key.description["suggested_value"]
        for value in result["data_schema"].schema.values()
        for key in value.schema.schema
    }
    assert suggested["beam_size"] == 2
    assert suggested["vad_threshold"] == 0.3
    assert mock_config_entry.options == {}
    assert mock_config_entry.state is ConfigEntryState.LOADED


async def test_unavailable_while_down_and_back_by_itself(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    own_server: WhisperGpuServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Down: unavailable, logged once. Back (restarted with a new boot value): available, settings read again."""
    own_server.start()
    status, body = own_server.request("PATCH", "/api/v1/settings", {"beam_size": 3})
    assert status == 200, body
    entry = mock_config_entry
    await setup_integration(hass, entry, **own_server.entry_data())
    assert entry.runtime_data.coordinator.data.settings["beam_size"] == 3

    own_server.stop()
    await poll(hass)
    await poll(hass)
    assert all(hass.states.get(entity_id).state == STATE_UNAVAILABLE for entity_id in ENTITIES)
    assert caplog.text.count("Error fetching whisper-gpu data") == 1

    # The operator changed the ConfigMap: the boot value wins over the stored change.
    own_server.start("--beam-size", "2")
    await poll(hass)
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
    assert hass.states.get("select.whisper_gpu_model").state == "tiny.en"
    assert caplog.text.count("Fetching whisper-gpu data recovered") == 1
    assert entry.runtime_data.coordinator.data.settings["beam_size"] == 2
    assert entry.state is ConfigEntryState.LOADED


async def test_reauth_when_token_changes_while_running(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, own_server: WhisperGpuServer
) -> None:
    """The server came back with another token: reauth starts by itself."""
    own_server.start()
    entry = mock_config_entry
    await setup_integration(hass, entry, **own_server.entry_data())

    own_server.stop()
    await poll(hass)
    own_server.token = "a-new-token"  # noqa: S105
    own_server.start()
    await poll(hass)

    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert [flow["context"]["source"] for flow in flows] == ["reauth"]


async def test_a_failed_switch_raises_no_repair_issue(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    own_server: WhisperGpuServer,
    issue_registry: ir.IssueRegistry,
) -> None:
    """A model the offline server cannot get, while another serves: the server is healthy, and says so."""
    own_server.start()
    entry = mock_config_entry
    await setup_integration(hass, entry, **own_server.entry_data())

    status, body = own_server.request("PATCH", "/api/v1/settings", {"model": "small.en"})
    assert status == 200, body
    failed = own_server.wait_state("ready")
    assert failed["last_failure"]["model"] == "small.en"
    await poll(hass)

    assert issue_registry.async_get_issue(DOMAIN, f"model_failed_{entry.entry_id}") is None
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
    assert hass.states.get("sensor.whisper_gpu_loaded_model").state == "tiny.en"


async def test_repair_issue_while_no_model_serves(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    own_server: WhisperGpuServer,
    issue_registry: ir.IssueRegistry,
) -> None:
    """The server's model cannot be had and nothing serves: a repair issue, gone once a model serves."""
    own_server.model = "small.en"
    own_server.start(wait=False)
    own_server.wait_state("failed")
    entry = mock_config_entry
    await setup_integration(hass, entry, **own_server.entry_data())
    issue_id = f"model_failed_{entry.entry_id}"

    issue = issue_registry.async_get_issue(DOMAIN, issue_id)
    assert issue is not None
    assert issue.translation_key == "model_failed"
    assert issue.severity is ir.IssueSeverity.ERROR
    assert issue.translation_placeholders["model"] == "small.en"
    assert issue.translation_placeholders["code"] == "not_available_offline"
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "failed"

    # Unloading takes the issue with it; it comes back with the entry.
    assert await hass.config_entries.async_unload(entry.entry_id)
    assert issue_registry.async_get_issue(DOMAIN, issue_id) is None
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert issue_registry.async_get_issue(DOMAIN, issue_id) is not None

    status, body = own_server.request("PATCH", "/api/v1/settings", {"model": "tiny.en"})
    assert status == 200, body
    own_server.wait_state("ready")
    await poll(hass)
    assert issue_registry.async_get_issue(DOMAIN, issue_id) is None
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
    assert hass.states.get("sensor.whisper_gpu_loaded_model").state == "tiny.en"


@pytest.mark.parametrize(
    ("route", "answer"),
    [
        (("GET", "/api/v1/status"), (500, None)),
        (("GET", "/api/v1/status"), (200, {"state": None})),
        (("GET", "/api/v1/settings"), (200, {"no": "settings"})),
        (("GET", "/api/v1/settings"), (404, None)),
    ],
    ids=["status_500", "status_malformed", "settings_missing", "settings_404"],
)
async def test_unexpected_answers_make_entities_unavailable(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_server: StubControlServer,
    route: tuple[str, str],
    answer: tuple[int, Any],
) -> None:
    """An answer the integration cannot read counts as the server being away."""
    mirror(stub_server, server)
    entry = mock_config_entry
    await setup_integration(hass, entry, control_port=stub_server.port)
    good = stub_server.routes[route]

    stub_server.routes[route] = answer
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == STATE_UNAVAILABLE

    stub_server.routes[route] = good
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"


async def test_device_follows_an_upgraded_server(
    hass: HomeAssistant,
    mock_client: AsyncMock,
    mock_config_entry: MockConfigEntry,
    device_registry: dr.DeviceRegistry,
) -> None:
    """Fast layer: a server that comes back upgraded, on a GPU, shows its new version and device."""
    await setup_integration(hass, mock_config_entry)
    info = mock_client.async_get_info.return_value
    device = device_registry.async_get_device_by_identifier((DOMAIN, info.server_id), mock_config_entry.entry_id)
    assert device is not None
    assert (device.sw_version, device.hw_version) == (info.version, "Test CPU")

    status = mock_client.async_get_status.return_value
    mock_client.async_get_status.side_effect = WhisperGpuConnectionError("restarting")
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == STATE_UNAVAILABLE
    mock_client.async_get_status.side_effect = None
    mock_client.async_get_status.return_value = status
    mock_client.async_get_info.return_value = dataclasses.replace(info, version="9.9.9", device_name="NVIDIA L4")
    await poll(hass)

    device = device_registry.async_get_device_by_identifier((DOMAIN, info.server_id), mock_config_entry.entry_id)
    assert device is not None
    assert (device.sw_version, device.hw_version) == ("9.9.9", "NVIDIA L4")
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
