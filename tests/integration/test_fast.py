"""Fast layer: the flows, the select, speech-to-text and polling, with the client patched to the captured answers.

Each test here has a slower twin against the real server (test_config_flow.py, test_options_flow.py,
test_entities.py, test_stt.py, test_init.py); these run in milliseconds and reach the error paths directly.
"""

import dataclasses
from ipaddress import ip_address
from typing import Any
from unittest.mock import ANY, AsyncMock, patch

import pytest
from helpers import api_fixtures
from homeassistant.components import stt
from homeassistant.components.select import ATTR_OPTION, SERVICE_SELECT_OPTION
from homeassistant.components.select import DOMAIN as SELECT_DOMAIN
from homeassistant.config_entries import SOURCE_HASSIO, SOURCE_USER, SOURCE_ZEROCONF, ConfigEntryState
from homeassistant.const import ATTR_ENTITY_ID, CONF_HOST, CONF_TOKEN, STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.whisper_gpu.api import (
    WhisperGpuAuthError,
    WhisperGpuCertificateError,
    WhisperGpuConnectionError,
    WhisperGpuInvalidCaError,
    WhisperGpuResponseError,
    WhisperGpuSettingsError,
    WhisperGpuTranscriptionError,
)
from custom_components.whisper_gpu.const import CONF_CA_PEM, CONF_CONTROL_PORT, CONF_TLS, CONF_WYOMING_PORT, DOMAIN
from custom_components.whisper_gpu.data import create_client

from .common import (
    FIXTURE_ENTRY_DATA,
    UTTERANCE,
    audio_stream,
    metadata,
    poll,
    setup_integration,
    transcript_updates,
)

pytestmark = pytest.mark.usefixtures("mock_client")

SELECT_ENTITY_ID = "select.whisper_gpu_model"
STT_ENTITY_ID = "stt.whisper_gpu_speech_to_text"
# A CA certificate as the user pastes it; never parsed here (the client is patched).
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
HTTPS_ENTRY_DATA = {**FIXTURE_ENTRY_DATA, CONF_TLS: True, CONF_CA_PEM: CA_PEM}
# An entry made before the control port could speak HTTPS: no HTTPS keys.
ENTRY_DATA_BEFORE_HTTPS = {
    key: FIXTURE_ENTRY_DATA[key] for key in (CONF_HOST, CONF_WYOMING_PORT, CONF_CONTROL_PORT, CONF_TOKEN)
}


async def start_user_flow(hass: HomeAssistant, data: dict[str, Any]) -> dict[str, Any]:
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    return dict(await hass.config_entries.flow.async_configure(result["flow_id"], data))


async def test_user_flow_creates_the_entry(hass: HomeAssistant) -> None:
    """The typed-in server is checked and becomes an entry keyed by its id."""
    result = await start_user_flow(hass, FIXTURE_ENTRY_DATA)

    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "whisper-gpu"
    assert result["data"] == FIXTURE_ENTRY_DATA
    assert result["result"].unique_id == api_fixtures.SERVER_ID


@pytest.mark.parametrize(
    ("method", "error", "shown"),
    [
        ("async_get_info", WhisperGpuConnectionError("refused"), "cannot_connect"),
        ("async_get_info", WhisperGpuResponseError("not json"), "not_whisper_gpu"),
        ("async_check_auth", WhisperGpuAuthError("401"), "invalid_auth"),
        ("async_describe", WhisperGpuConnectionError("closed"), "wyoming_unreachable"),
    ],
)
async def test_user_flow_errors_then_recovers(
    hass: HomeAssistant, mock_client: AsyncMock, method: str, error: Exception, shown: str
) -> None:
    """Each failed check shows its error; the next try, with the server fine, creates the entry."""
    getattr(mock_client, method).side_effect = error
    result = await start_user_flow(hass, FIXTURE_ENTRY_DATA)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": shown}

    getattr(mock_client, method).side_effect = None
    result = dict(await hass.config_entries.flow.async_configure(result["flow_id"], FIXTURE_ENTRY_DATA))
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_user_flow_updates_a_known_server(hass: HomeAssistant, mock_config_entry: MockConfigEntry) -> None:
    """A known server typed in at a new address: the entry takes it, no second entry."""
    mock_config_entry.add_to_hass(hass)
    moved = {**FIXTURE_ENTRY_DATA, "host": "192.0.2.7"}

    result = await start_user_flow(hass, moved)

    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert mock_config_entry.data == moved


def zeroconf_info(**properties: str) -> ZeroconfServiceInfo:
    """What zeroconf hands over for the fixtures' server at 192.0.2.8, with more TXT properties if given."""
    return ZeroconfServiceInfo(
        ip_address=ip_address("192.0.2.8"),
        ip_addresses=[ip_address("192.0.2.8")],
        port=api_fixtures.WYOMING_PORT,
        hostname="whisper-gpu.local.",
        type="_whisper-gpu._tcp.local.",
        name="whisper-gpu._whisper-gpu._tcp.local.",
        properties={"id": api_fixtures.SERVER_ID, "control_port": str(api_fixtures.CONTROL_PORT), **properties},
    )


async def test_zeroconf_then_token(hass: HomeAssistant) -> None:
    """A discovered server asks for its token only."""
    info = zeroconf_info()
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_ZEROCONF}, data=info)
    assert result["step_id"] == "zeroconf_confirm"

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {CONF_TOKEN: "fixture-token"})

    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"]["host"] == "192.0.2.8"


async def test_hassio_confirm(hass: HomeAssistant) -> None:
    """The add-on's server is confirmed without typing."""
    info = HassioServiceInfo(
        config={**FIXTURE_ENTRY_DATA, "id": api_fixtures.SERVER_ID}, name="Whisper GPU", slug="whisper_gpu", uuid="1"
    )
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_HASSIO}, data=info)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})

    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Whisper GPU"
    assert result["data"] == FIXTURE_ENTRY_DATA


async def test_reauth_and_reconfigure(
    hass: HomeAssistant, mock_client: AsyncMock, mock_config_entry: MockConfigEntry
) -> None:
    """A new token, then a new address: both are checked, stored and the entry reloads."""
    await setup_integration(hass, mock_config_entry)

    result = await mock_config_entry.start_reauth_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {CONF_TOKEN: "new-token"})
    assert result["reason"] == "reauth_successful"
    assert mock_config_entry.data[CONF_TOKEN] == "new-token"

    result = await mock_config_entry.start_reconfigure_flow(hass)
    moved = {**mock_config_entry.data, "host": "192.0.2.9"}
    result = await hass.config_entries.flow.async_configure(result["flow_id"], moved)
    assert result["reason"] == "reconfigure_successful"
    assert mock_config_entry.data["host"] == "192.0.2.9"
    assert mock_config_entry.state is ConfigEntryState.LOADED

    info = mock_client.async_get_info.return_value
    mock_client.async_get_info.return_value = dataclasses.replace(info, server_id="another-server")
    result = await mock_config_entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {**moved, "host": "192.0.2.10"})
    assert result["reason"] == "wrong_server"
    assert mock_config_entry.data["host"] == "192.0.2.9"


@pytest.mark.parametrize(
    ("tls", "error", "speaks_tls", "shown"),
    [
        (True, WhisperGpuCertificateError("self-signed certificate"), None, {"base": "untrusted_certificate"}),
        (True, WhisperGpuInvalidCaError("no PEM certificate"), None, {CONF_CA_PEM: "invalid_ca"}),
        (False, WhisperGpuConnectionError("Server disconnected"), True, {"base": "tls_required"}),
        (True, WhisperGpuConnectionError("wrong version number"), False, {"base": "tls_not_supported"}),
        (True, WhisperGpuConnectionError("refused"), None, {"base": "cannot_connect"}),
        (False, WhisperGpuConnectionError("reset"), False, {"base": "cannot_connect"}),
    ],
    ids=["untrusted", "invalid_ca", "https_port_asked_http", "http_port_asked_https", "closed", "broken_http"],
)
async def test_user_flow_https_errors_then_recovers(
    hass: HomeAssistant,
    mock_client: AsyncMock,
    tls: bool,
    error: Exception,
    speaks_tls: bool | None,
    shown: dict[str, str],
) -> None:
    """Each HTTPS failure has its own error; the right input then creates an entry that speaks HTTPS with its CA."""
    mock_client.async_get_info.side_effect = error
    mock_client.async_probe_tls.return_value = speaks_tls
    result = await start_user_flow(hass, {**FIXTURE_ENTRY_DATA, CONF_TLS: tls, CONF_CA_PEM: CA_PEM})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == shown

    mock_client.async_get_info.side_effect = None
    result = dict(await hass.config_entries.flow.async_configure(result["flow_id"], HTTPS_ENTRY_DATA))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"] == HTTPS_ENTRY_DATA


async def test_the_ca_is_kept_with_https_only(hass: HomeAssistant) -> None:
    """A CA pasted while HTTPS is off is not kept; one pasted without its last newline is kept with it."""
    result = await start_user_flow(hass, {**FIXTURE_ENTRY_DATA, CONF_CA_PEM: CA_PEM})
    assert result["data"] == FIXTURE_ENTRY_DATA
    result = await start_user_flow(hass, {**FIXTURE_ENTRY_DATA, CONF_TLS: True, CONF_CA_PEM: f"  {CA_PEM.strip()}"})
    assert result["reason"] == "already_configured"
    assert result["type"] is FlowResultType.ABORT
    entry = hass.config_entries.async_entries(DOMAIN)[0]
    assert entry.data == HTTPS_ENTRY_DATA


@pytest.mark.parametrize(
    ("data", "tls", "ca_pem"),
    [
        (ENTRY_DATA_BEFORE_HTTPS, False, None),
        (FIXTURE_ENTRY_DATA, False, None),
        ({**FIXTURE_ENTRY_DATA, CONF_TLS: True}, True, None),
        (HTTPS_ENTRY_DATA, True, CA_PEM),
    ],
    ids=["entry_from_before_https", "http", "https_system_cas", "https_own_ca"],
)
async def test_the_client_speaks_https_as_the_entry_says(
    hass: HomeAssistant, data: dict[str, Any], tls: bool, ca_pem: str | None
) -> None:
    """Each replica's client verifies the certificate for the entry's host name; old entries stay on HTTP."""
    with patch("custom_components.whisper_gpu.data.WhisperGpuClient") as client_class:
        create_client(hass, data, "10.0.0.1")
    client_class.assert_called_once_with(
        ANY,
        "10.0.0.1",
        wyoming_port=data[CONF_WYOMING_PORT],
        control_port=data[CONF_CONTROL_PORT],
        token=data[CONF_TOKEN],
        tls=tls,
        ca_pem=ca_pem,
        server_hostname=data[CONF_HOST],
    )


async def test_an_entry_from_before_https_loads(hass: HomeAssistant) -> None:
    """An entry without the HTTPS keys needs no migration: it loads, over plain HTTP."""
    entry = MockConfigEntry(
        domain=DOMAIN, title="whisper-gpu", unique_id=api_fixtures.SERVER_ID, data=ENTRY_DATA_BEFORE_HTTPS
    )

    await setup_integration(hass, entry)

    assert entry.state is ConfigEntryState.LOADED


@pytest.mark.parametrize(
    ("properties", "tls"),
    [({"control_tls": "true"}, True), ({"control_tls": "false"}, False), ({}, False)],
    ids=["https", "http", "server_from_before_https"],
)
async def test_zeroconf_takes_https_from_the_announcement(
    hass: HomeAssistant, properties: dict[str, str], tls: bool
) -> None:
    """A server that announces HTTPS is set up with it, and its form offers the CA field; others ask the token only."""
    info = zeroconf_info(**properties)
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_ZEROCONF}, data=info)
    assert set(result["data_schema"].schema) == ({CONF_TOKEN, CONF_CA_PEM} if tls else {CONF_TOKEN})

    user_input = {CONF_TOKEN: "fixture-token", **({CONF_CA_PEM: CA_PEM} if tls else {})}
    result = await hass.config_entries.flow.async_configure(result["flow_id"], user_input)

    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_TLS] is tls
    assert result["data"][CONF_CA_PEM] == (CA_PEM if tls else "")


async def test_reconfigure_turns_https_on_and_off(hass: HomeAssistant, mock_config_entry: MockConfigEntry) -> None:
    """HTTPS with a CA, then back to HTTP: the CA goes with it."""
    await setup_integration(hass, mock_config_entry)

    result = await mock_config_entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], HTTPS_ENTRY_DATA)
    assert result["reason"] == "reconfigure_successful"
    assert mock_config_entry.data == HTTPS_ENTRY_DATA

    result = await mock_config_entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {**HTTPS_ENTRY_DATA, CONF_TLS: False})
    assert result["reason"] == "reconfigure_successful"
    assert mock_config_entry.data == FIXTURE_ENTRY_DATA


async def test_options_flow_sends_only_what_changed(
    hass: HomeAssistant, mock_client: AsyncMock, mock_config_entry: MockConfigEntry
) -> None:
    """The form shows the server's settings; only the changed value is sent, and kept as the desired setting."""
    await setup_integration(hass, mock_config_entry)
    settings = mock_client.async_get_settings.return_value

    # The form's own fields beside the server's settings: the language switch and sending the names.
    shown = {**settings, "detect_language": settings["language"] == "auto", "send_names": True}
    if shown["detect_language"]:
        shown["language"] = "en"

    result = await hass.config_entries.options.async_init(mock_config_entry.entry_id)
    form = {
        str(section_key): {str(key): shown[str(key)] for key in section.schema.schema}
        for section_key, section in result["data_schema"].schema.items()
    }
    form["decoding"]["beam_size"] = settings["beam_size"] + 1
    mock_client.async_update_settings.return_value = {**settings, "beam_size": settings["beam_size"] + 1}
    result = await hass.config_entries.options.async_configure(result["flow_id"], form)

    assert result["type"] is FlowResultType.CREATE_ENTRY
    mock_client.async_update_settings.assert_awaited_once_with({"beam_size": settings["beam_size"] + 1})
    assert mock_config_entry.options == {
        "send_names": True,
        "desired_settings": {"beam_size": settings["beam_size"] + 1},
    }, "the integration's own option and the setting the user changed"


@pytest.mark.parametrize(
    ("error", "translation_key"),
    [
        (WhisperGpuSettingsError({"model": "insufficient_memory"}), "setting_rejected"),
        (WhisperGpuAuthError("401"), "invalid_auth"),
        (WhisperGpuConnectionError("gone"), "cannot_connect"),
    ],
)
async def test_select_errors_are_translated(
    hass: HomeAssistant,
    mock_client: AsyncMock,
    mock_config_entry: MockConfigEntry,
    error: Exception,
    translation_key: str,
) -> None:
    """A refused switch raises a translated error; a rejected token starts reauthentication."""
    await setup_integration(hass, mock_config_entry)
    mock_client.async_update_settings.side_effect = error

    with pytest.raises(HomeAssistantError) as raised:
        await hass.services.async_call(
            SELECT_DOMAIN,
            SERVICE_SELECT_OPTION,
            {ATTR_ENTITY_ID: SELECT_ENTITY_ID, ATTR_OPTION: "base"},
            blocking=True,
        )

    assert raised.value.translation_key == translation_key
    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert len(flows) == (1 if translation_key == "invalid_auth" else 0)


async def test_select_asks_the_server(
    hass: HomeAssistant, mock_client: AsyncMock, mock_config_entry: MockConfigEntry
) -> None:
    """Selecting a model sends it to the server and polls again."""
    await setup_integration(hass, mock_config_entry)
    polls = mock_client.async_get_status.await_count

    await hass.services.async_call(
        SELECT_DOMAIN, SERVICE_SELECT_OPTION, {ATTR_ENTITY_ID: SELECT_ENTITY_ID, ATTR_OPTION: "base"}, blocking=True
    )
    await hass.async_block_till_done()

    mock_client.async_update_settings.assert_awaited_once_with({"model": "base"})
    assert mock_client.async_get_status.await_count > polls


async def test_speech_to_text(hass: HomeAssistant, mock_client: AsyncMock, mock_config_entry: MockConfigEntry) -> None:
    """The entity returns the server's text, and an error result when the server refuses."""
    await setup_integration(hass, mock_config_entry)
    entity = stt.async_get_speech_to_text_entity(hass, STT_ENTITY_ID)
    assert entity is not None
    assert entity.supported_languages == ["en"]

    result = await entity.async_process_audio_stream(metadata(), audio_stream(b"\0" * 4096))
    assert result == stt.SpeechResult(UTTERANCE, stt.SpeechResultState.SUCCESS)

    mock_client.async_transcribe_updates.side_effect = transcript_updates(
        WhisperGpuTranscriptionError("no model", "model_not_ready")
    )
    result = await entity.async_process_audio_stream(metadata(), audio_stream(b"\0" * 4096))
    assert result == stt.SpeechResult(None, stt.SpeechResultState.ERROR)


async def test_setup_retries_while_the_wyoming_port_is_closed(
    hass: HomeAssistant, mock_client: AsyncMock, mock_config_entry: MockConfigEntry
) -> None:
    """The control API answers, the Wyoming port does not: setup is retried with the reason."""
    mock_client.async_describe.side_effect = WhisperGpuConnectionError("refused")

    await setup_integration(hass, mock_config_entry)

    assert mock_config_entry.state is ConfigEntryState.SETUP_RETRY
    assert mock_config_entry.error_reason_translation_key == "wyoming_unreachable"


async def test_a_certificate_no_longer_trusted_raises_a_repair_issue(
    hass: HomeAssistant, mock_client: AsyncMock, mock_config_entry: MockConfigEntry, issue_registry: ir.IssueRegistry
) -> None:
    """The server's certificate was renewed by a CA Home Assistant does not trust: unavailable, and a repair issue
    says why, until the certificate is trusted again.
    """
    await setup_integration(hass, mock_config_entry)
    issue_id = f"untrusted_certificate_{mock_config_entry.entry_id}"
    mock_client.async_get_status.side_effect = WhisperGpuCertificateError("certificate verify failed")
    await poll(hass)

    assert hass.states.get("sensor.whisper_gpu_model_state").state == STATE_UNAVAILABLE
    issue = issue_registry.async_get_issue(DOMAIN, issue_id)
    assert issue is not None
    assert issue.translation_key == "untrusted_certificate"
    assert issue.translation_placeholders is not None
    assert "certificate verify failed" in issue.translation_placeholders["error"]

    mock_client.async_get_status.side_effect = None
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_model_state").state != STATE_UNAVAILABLE
    assert issue_registry.async_get_issue(DOMAIN, issue_id) is None


async def test_a_token_rejected_after_a_restart_starts_reauth(
    hass: HomeAssistant, mock_client: AsyncMock, mock_config_entry: MockConfigEntry
) -> None:
    """The server went away and came back with another token: unavailable, then reauthentication."""
    await setup_integration(hass, mock_config_entry)
    mock_client.async_get_status.side_effect = WhisperGpuConnectionError("restarting")
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == STATE_UNAVAILABLE

    mock_client.async_get_status.side_effect = None
    mock_client.async_check_auth.side_effect = WhisperGpuAuthError("401")
    await poll(hass)

    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert [flow["context"]["source"] for flow in flows] == ["reauth"]
