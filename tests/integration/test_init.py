"""Setup, unload, migration, availability and the options mirror, with a real server."""

from typing import Any

import pytest
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.whisper_gpu.const import DOMAIN

from .common import OPTION_NAMES, StubControlServer, WhisperGpuServer, mirror, poll, setup_entry, stub_entry

ENTITIES = (
    "stt.whisper_gpu_speech_to_text",
    "select.whisper_gpu_model",
    "sensor.whisper_gpu_model_state",
    "sensor.whisper_gpu_loaded_model",
    "sensor.whisper_gpu_last_request_duration",
)


async def test_setup_unload_reload(
    hass: HomeAssistant,
    server: WhisperGpuServer,
    config_entry: MockConfigEntry,
    device_registry: dr.DeviceRegistry,
    entity_registry: er.EntityRegistry,
) -> None:
    """One service device with its entities; reload and unload leave nothing behind."""
    await setup_entry(hass, config_entry)
    assert config_entry.state is ConfigEntryState.LOADED

    device = device_registry.async_get_device_by_identifier((DOMAIN, server.server_id), config_entry.entry_id)
    assert device is not None
    assert device.entry_type is dr.DeviceEntryType.SERVICE
    assert device.sw_version == "0.1.0"
    assert device.name == "whisper-gpu"
    entities = er.async_entries_for_config_entry(entity_registry, config_entry.entry_id)
    assert sorted(entity.entity_id for entity in entities) == sorted(ENTITIES)
    assert all(entity.device_id == device.id for entity in entities)
    assert all(entity.unique_id.startswith(server.server_id) for entity in entities)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
    assert hass.states.get("sensor.whisper_gpu_loaded_model").state == "tiny.en"
    assert hass.states.get("select.whisper_gpu_model").state == "tiny.en"

    assert await hass.config_entries.async_reload(config_entry.entry_id)
    await hass.async_block_till_done()
    assert config_entry.state is ConfigEntryState.LOADED

    assert await hass.config_entries.async_unload(config_entry.entry_id)
    await hass.async_block_till_done()
    assert config_entry.state is ConfigEntryState.NOT_LOADED
    assert all(hass.states.get(entity_id).state == STATE_UNAVAILABLE for entity_id in ENTITIES)


async def test_setup_retries_while_server_down(hass: HomeAssistant, server: WhisperGpuServer, closed_port: int) -> None:
    """A server that does not answer at start: setup is retried, with the reason."""
    entry = MockConfigEntry(domain=DOMAIN, unique_id=server.server_id, data=server.entry_data(control_port=closed_port))
    await setup_entry(hass, entry)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert entry.error_reason_translation_key == "cannot_connect"


async def test_setup_retries_while_wyoming_down(
    hass: HomeAssistant, server: WhisperGpuServer, closed_port: int
) -> None:
    """The control API answers but the Wyoming port does not: setup is retried."""
    entry = MockConfigEntry(domain=DOMAIN, unique_id=server.server_id, data=server.entry_data(wyoming_port=closed_port))
    await setup_entry(hass, entry)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert entry.error_reason_translation_key == "wyoming_unreachable"


async def test_migration_from_older_minor_version(hass: HomeAssistant, server: WhisperGpuServer) -> None:
    """An entry stored by an older version is brought up to date and loads."""
    config_entry = MockConfigEntry(
        domain=DOMAIN, version=1, minor_version=0, unique_id=server.server_id, data=server.entry_data()
    )
    await setup_entry(hass, config_entry)
    assert config_entry.state is ConfigEntryState.LOADED
    assert (config_entry.version, config_entry.minor_version) == (1, 1)


async def test_migration_refuses_newer_version(
    hass: HomeAssistant, server: WhisperGpuServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry stored by a newer version is not touched."""
    config_entry = MockConfigEntry(domain=DOMAIN, version=2, unique_id=server.server_id, data=server.entry_data())
    await setup_entry(hass, config_entry)
    assert config_entry.state is ConfigEntryState.MIGRATION_ERROR
    assert config_entry.version == 2
    assert "has version 2 which is higher than the current version 1" in caplog.text


async def test_options_follow_the_server(
    hass: HomeAssistant, server: WhisperGpuServer, config_entry: MockConfigEntry
) -> None:
    """A change made on the server (curl, another client) shows up in the options."""
    await setup_entry(hass, config_entry)
    assert config_entry.options == {name: server.settings()[name] for name in OPTION_NAMES}

    status, body = server.request("PATCH", "/api/v1/settings", {"beam_size": 2, "vad_threshold": 0.3})
    assert status == 200, body
    await poll(hass)

    assert config_entry.options["beam_size"] == 2
    assert config_entry.options["vad_threshold"] == 0.3
    assert config_entry.state is ConfigEntryState.LOADED


async def test_unavailable_while_down_and_back_by_itself(
    hass: HomeAssistant,
    own_server: WhisperGpuServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Down: unavailable, logged once. Back (restarted with a new boot value): available, options updated."""
    own_server.start()
    status, body = own_server.request("PATCH", "/api/v1/settings", {"beam_size": 3})
    assert status == 200, body
    entry = MockConfigEntry(
        domain=DOMAIN, title="whisper-gpu", unique_id=own_server.server_id, data=own_server.entry_data()
    )
    await setup_entry(hass, entry)
    assert entry.options["beam_size"] == 3

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
    assert entry.options["beam_size"] == 2
    assert entry.state is ConfigEntryState.LOADED


async def test_reauth_when_token_changes_while_running(hass: HomeAssistant, own_server: WhisperGpuServer) -> None:
    """The server came back with another token: reauth starts by itself."""
    own_server.start()
    entry = MockConfigEntry(
        domain=DOMAIN, title="whisper-gpu", unique_id=own_server.server_id, data=own_server.entry_data()
    )
    await setup_entry(hass, entry)

    own_server.stop()
    await poll(hass)
    own_server.token = "a-new-token"  # noqa: S105
    own_server.start()
    await poll(hass)

    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert [flow["context"]["source"] for flow in flows] == ["reauth"]


async def test_a_failed_switch_raises_no_repair_issue(
    hass: HomeAssistant, own_server: WhisperGpuServer, issue_registry: ir.IssueRegistry
) -> None:
    """A model the offline server cannot get, while another serves: the server is healthy, and says so."""
    own_server.start()
    entry = MockConfigEntry(
        domain=DOMAIN, title="whisper-gpu", unique_id=own_server.server_id, data=own_server.entry_data()
    )
    await setup_entry(hass, entry)

    status, body = own_server.request("PATCH", "/api/v1/settings", {"model": "small.en"})
    assert status == 200, body
    failed = own_server.wait_state("ready")
    assert failed["last_failure"]["model"] == "small.en"
    await poll(hass)

    assert issue_registry.async_get_issue(DOMAIN, f"model_failed_{entry.entry_id}") is None
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
    assert hass.states.get("sensor.whisper_gpu_loaded_model").state == "tiny.en"


async def test_repair_issue_while_no_model_serves(
    hass: HomeAssistant, own_server: WhisperGpuServer, issue_registry: ir.IssueRegistry
) -> None:
    """The server's model cannot be had and nothing serves: a repair issue, gone once a model serves."""
    own_server.model = "small.en"
    own_server.start(wait=False)
    own_server.wait_state("failed")
    entry = MockConfigEntry(
        domain=DOMAIN, title="whisper-gpu", unique_id=own_server.server_id, data=own_server.entry_data()
    )
    await setup_entry(hass, entry)
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
    server: WhisperGpuServer,
    stub_server: StubControlServer,
    route: tuple[str, str],
    answer: tuple[int, Any],
) -> None:
    """An answer the integration cannot read counts as the server being away."""
    mirror(stub_server, server)
    entry = stub_entry(stub_server, server)
    await setup_entry(hass, entry)
    good = stub_server.routes[route]

    stub_server.routes[route] = answer
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == STATE_UNAVAILABLE

    stub_server.routes[route] = good
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
