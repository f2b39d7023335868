"""Diagnostics: what a user attaches to a bug report, without secrets."""

import json
from unittest.mock import AsyncMock

from homeassistant.core import HomeAssistant
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.components.diagnostics import get_diagnostics_for_config_entry
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator
from syrupy.assertion import SnapshotAssertion
from syrupy.filters import props

from .common import WhisperGpuServer, setup_integration


async def test_diagnostics_redact_token_and_host(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    server: WhisperGpuServer,
    mock_config_entry: MockConfigEntry,
) -> None:
    """The server's info, status and settings are there; the token and the host are not."""
    await setup_integration(hass, mock_config_entry)

    diagnostics = await get_diagnostics_for_config_entry(hass, hass_client, mock_config_entry)

    assert diagnostics["entry"]["data"]["token"] == "**REDACTED**"  # noqa: S105
    assert diagnostics["entry"]["data"]["host"] == "**REDACTED**"
    assert diagnostics["entry"]["data"]["wyoming_port"] == server.wyoming_port
    assert diagnostics["server"]["info"]["server_id"] == server.server_id
    assert diagnostics["server"]["status"]["state"] == "ready"
    assert diagnostics["server"]["settings"]["model"] == "tiny.en"
    assert diagnostics["server"]["last_update_success"] is True
    assert diagnostics["replicas"] == [
        {
            "address": "**REDACTED**",  # the host itself: one server
            "state": "ready",
            "model": "tiny.en",
            "settings": diagnostics["server"]["settings"],
            "in_step": True,
            "error": None,
        }
    ]
    assert diagnostics["wyoming_asr"]["requires_external_vad"] is False, "the server ends commands itself"
    assert server.token not in json.dumps(diagnostics)


async def test_diagnostics_snapshot(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    mock_client: AsyncMock,
    mock_config_entry: MockConfigEntry,
    snapshot: SnapshotAssertion,
) -> None:
    """Fast layer: the whole diagnostics of the captured server, as a user would attach them."""
    await setup_integration(hass, mock_config_entry)

    diagnostics = await get_diagnostics_for_config_entry(hass, hass_client, mock_config_entry)

    assert diagnostics == snapshot(exclude=props("entry_id", "created_at", "modified_at"))


async def test_diagnostics_show_whether_a_ca_is_set(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    mock_client: AsyncMock,
    mock_config_entry: MockConfigEntry,
) -> None:
    """Fast layer: HTTPS shows; the CA certificate is public but long, so only that one is set shows."""
    mock_config_entry.add_to_hass(hass)
    pem = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
    data = {**mock_config_entry.data, "tls": True, "ca_pem": pem}
    hass.config_entries.async_update_entry(mock_config_entry, data=data)
    await setup_integration(hass, mock_config_entry)

    diagnostics = await get_diagnostics_for_config_entry(hass, hass_client, mock_config_entry)

    assert diagnostics["entry"]["data"]["tls"] is True
    assert diagnostics["entry"]["data"]["ca_pem"] == "**REDACTED**"
    assert "MIIBfake" not in json.dumps(diagnostics)
