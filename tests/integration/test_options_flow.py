"""Options flow: the server's settings, read from it and pushed back to it."""

from typing import Any

import pytest
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType, section
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.selector import BooleanSelector, LanguageSelector
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.whisper_gpu.const import DOMAIN

from .common import (
    DETECT_LANGUAGE,
    FORM_FIELDS,
    LOCAL_OPTIONS,
    OPTIONS_FORM,
    SECOND_MODEL,
    TEST_MODEL,
    StubControlServer,
    WhisperGpuServer,
    mirror,
    poll,
    setup_integration,
)


def form_input(settings: dict[str, Any], **changes: Any) -> dict[str, dict[str, Any]]:
    """Return the options form's input: the server's settings with changes, in sections.

    The language `auto` is the switch on and the picker at English, as the form shows it.
    """
    values = {**LOCAL_OPTIONS, **settings, **changes}
    if DETECT_LANGUAGE not in values:
        values[DETECT_LANGUAGE] = values["language"] == "auto"
    if values["language"] == "auto":
        values["language"] = "en"
    return {section_key: {name: values[name] for name in names} for section_key, names in OPTIONS_FORM.items()}


async def test_options_form_is_built_from_the_server(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry
) -> None:
    """Sections with the server's models, languages and ranges; a change is sent, mirrored and kept as desired."""
    await setup_integration(hass, mock_config_entry)
    settings = server.settings()

    result = await hass.config_entries.options.async_init(mock_config_entry.entry_id)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "init"
    schema = result["data_schema"].schema
    assert [str(key) for key in schema] == list(OPTIONS_FORM)
    sections = {str(key): value for key, value in schema.items()}
    assert all(isinstance(value, section) for value in sections.values())
    assert sections["voice_activity_detection"].options == {"collapsed": True}
    fields = {str(key): (key, value) for value in sections.values() for key, value in value.schema.schema.items()}
    assert list(fields) == list(FORM_FIELDS)
    _, body = server.request("GET", "/api/v1/info")
    model_key, model_selector = fields["model"]
    assert model_selector.config["options"] == [model["name"] for model in body["models"] if model["usable"]]
    assert model_key.description == {"suggested_value": settings["model"]}
    # Languages by name (the frontend names each code); `auto` is the switch before the picker.
    assert isinstance(fields["language"][1], LanguageSelector)
    assert fields["language"][1].config["languages"] == [code for code in body["languages"] if code != "auto"]
    assert isinstance(fields[DETECT_LANGUAGE][1], BooleanSelector)
    assert fields[DETECT_LANGUAGE][0].description == {"suggested_value": settings["language"] == "auto"}
    beam_key, _ = fields["beam_size"]
    assert beam_key.description == {"suggested_value": settings["beam_size"]}
    vad_selector = fields["vad_threshold"][1]
    assert (vad_selector.config["min"], vad_selector.config["max"], vad_selector.config["mode"]) == (0, 1, "slider")
    assert isinstance(fields["endpointing"][1], BooleanSelector)
    end_selector = fields["end_of_speech_s"][1]
    assert (end_selector.config["min"], end_selector.config["max"]) == (0.2, 5.0)
    keep_alive_selector = fields["keep_alive_s"][1]
    assert (keep_alive_selector.config["min"], keep_alive_selector.config["unit_of_measurement"]) == (0, "s")

    changes = {
        "beam_size": 3,
        "vad_threshold": 0.4,
        "speech_pad_ms": 300,
        "endpointing": False,
        "end_of_speech_s": 0.8,
        "keep_alive_s": 600.0,
    }
    result = await hass.config_entries.options.async_configure(result["flow_id"], form_input(settings, **changes))
    await hass.async_block_till_done()

    assert result["type"] is FlowResultType.CREATE_ENTRY
    new_settings = server.settings()
    assert {name: new_settings[name] for name in changes} == changes
    assert type(new_settings["speech_pad_ms"]) is int
    assert mock_config_entry.options == {**LOCAL_OPTIONS, "desired_settings": changes}, "what the user changed is kept"
    assert mock_config_entry.state is ConfigEntryState.LOADED


async def test_sending_names_is_an_option_of_home_assistant(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_server: StubControlServer,
) -> None:
    """Turning the names off changes nothing on the server and stays off after the next poll."""
    mirror(stub_server, server)
    settings = server.settings()
    entry = mock_config_entry
    await setup_integration(hass, entry, control_port=stub_server.port)

    result = await hass.config_entries.options.async_init(entry.entry_id)
    send_names = next(
        key for value in result["data_schema"].schema.values() for key in value.schema.schema if key == "send_names"
    )
    assert send_names.description == {"suggested_value": True}
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], form_input(settings, send_names=False)
    )
    await poll(hass)

    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert [request for request in stub_server.requests if request[0] == "PATCH"] == []
    assert entry.options == {"send_names": False}


async def test_options_sends_only_changes(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_server: StubControlServer,
) -> None:
    """Unchanged values are not sent: a setting the operator changed stays the operator's."""
    mirror(stub_server, server)
    settings = server.settings()
    stub_server.routes["PATCH", "/api/v1/settings"] = (
        200,
        {"settings": {**settings, "beam_size": 1}, "changed": ["beam_size"], "reload": False},
    )
    entry = mock_config_entry
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data=server.entry_data(control_port=stub_server.port))

    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(result["flow_id"], form_input(settings))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert [request for request in stub_server.requests if request[0] == "PATCH"] == []

    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(result["flow_id"], form_input(settings, beam_size=1))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert [request for request in stub_server.requests if request[0] == "PATCH"] == [
        ("PATCH", "/api/v1/settings", {"beam_size": 1})
    ]


async def test_options_unknown_model_on_real_server(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry
) -> None:
    """A typed-in model the server does not know: the error shows on the model section."""
    mock_config_entry.add_to_hass(hass)
    settings = server.settings()

    result = await hass.config_entries.options.async_init(mock_config_entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], form_input(settings, model="no-such-model")
    )

    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"model_settings": "unknown_model"}
    assert server.settings()["model"] == settings["model"]
    # The form keeps what the user typed.
    model_key = next(key for value in result["data_schema"].schema.values() for key in value.schema.schema)
    assert model_key.description == {"suggested_value": "no-such-model"}


@pytest.mark.parametrize(
    ("answer", "errors"),
    [
        ((400, {"errors": {"base": "invalid_json"}}), {"base": "invalid_json"}),
        ((400, {"errors": {"device": "unknown_field"}}), {"base": "unknown_field"}),
        ((400, {"errors": {"beam_size": "not_runtime"}}), {"decoding": "not_runtime"}),
        ((400, {"errors": {"beam_size": "invalid_value"}}), {"decoding": "invalid_value"}),
        ((400, {"errors": {"vad_threshold": "out_of_range"}}), {"voice_activity_detection": "out_of_range"}),
        ((400, {"errors": {"model": "unknown_model"}}), {"model_settings": "unknown_model"}),
        ((400, {"errors": {"compute_type": "not_supported_on_device"}}), {"model_settings": "not_supported_on_device"}),
        ((400, {"errors": {"language": "not_supported_by_model"}}), {"decoding": "not_supported_by_model"}),
        ((400, {"errors": {"model": "insufficient_memory"}}), {"model_settings": "insufficient_memory"}),
        ((400, {"errors": {"model": "something_new"}}), {"model_settings": "unknown_setting_error"}),
        ((400, {"no": "errors"}), {"base": "unknown_setting_error"}),
        ((409, {"error": "reload_in_progress"}), {"base": "reload_in_progress"}),
        ((413, {"error": "body_too_large"}), {"base": "body_too_large"}),
        ((413, None), {"base": "unknown_setting_error"}),
        ((507, {"error": "save_failed", "message": "No space left on device"}), {"base": "save_failed"}),
        ((500, {"error": "save_failed", "message": "Read-only file system"}), {"base": "save_failed"}),
        ((400, {"errors": {"model": "path_not_allowed"}}), {"model_settings": "path_not_allowed"}),
        ((401, {"error": "unauthorized"}), {"base": "invalid_auth"}),
        ((500, None), {"base": "cannot_connect"}),
    ],
)
async def test_options_server_errors(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_server: StubControlServer,
    answer: tuple[int, Any],
    errors: dict[str, str],
) -> None:
    """Every error the server answers becomes a translated form error."""
    mirror(stub_server, server)
    stub_server.routes["PATCH", "/api/v1/settings"] = answer
    entry = mock_config_entry
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data=server.entry_data(control_port=stub_server.port))
    settings = server.settings()

    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(result["flow_id"], form_input(settings, beam_size=2))

    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == errors
    reauth = list(hass.config_entries.flow.async_progress_by_handler(DOMAIN))
    assert len(reauth) == (1 if answer[0] == 401 else 0)
    assert entry.options == {}


async def test_options_server_gone_after_opening(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_server: StubControlServer,
) -> None:
    """The server went away while the form was open: cannot_connect, then success once it is back."""
    mirror(stub_server, server)
    entry = mock_config_entry
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data=server.entry_data(control_port=stub_server.port))
    settings = server.settings()
    result = await hass.config_entries.options.async_init(entry.entry_id)

    await stub_server.stop()
    result = await hass.config_entries.options.async_configure(result["flow_id"], form_input(settings, beam_size=2))
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect"}


async def test_options_server_down(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer, closed_port: int
) -> None:
    """The server does not answer: the options cannot be shown."""
    entry = mock_config_entry
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data=server.entry_data(control_port=closed_port))

    result = await hass.config_entries.options.async_init(entry.entry_id)

    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "cannot_connect"


async def test_options_form_follows_the_servers_schema(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_server: StubControlServer,
) -> None:
    """A server with fewer settings (older, say) gets a form with only those; its model shows."""
    mirror(stub_server, server)
    _, info = stub_server.routes["GET", "/api/v1/info"]
    info["settings"] = {name: info["settings"][name] for name in ("model", "compute_type", "language", "beam_size")}
    info["settings"]["beam_size"] = {"type": "integer", "default": 5}
    _, settings = stub_server.routes["GET", "/api/v1/settings"]
    settings["settings"]["model"] = "/models/my-finetune"
    entry = mock_config_entry
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data=server.entry_data(control_port=stub_server.port))

    result = await hass.config_entries.options.async_init(entry.entry_id)

    assert result["type"] is FlowResultType.FORM
    schema = result["data_schema"].schema
    assert [str(key) for key in schema] == ["model_settings", "decoding", "assist"], "the integration's own stays"
    sections = {str(key): value for key, value in schema.items()}
    model_selector = next(iter(sections["model_settings"].schema.schema.values()))
    assert model_selector.config["options"][-1] == "/models/my-finetune"
    beam_selector = sections["decoding"].schema.schema
    beam = next(value for key, value in beam_selector.items() if str(key) == "beam_size")
    number = beam.validators[0]
    assert "min" not in number.config
    assert "max" not in number.config


async def test_options_model_switch_shows_the_load_and_ends_when_it_serves(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry
) -> None:
    """A new model: the dialog shows the load's progress and says it is done only once the model serves."""
    await setup_integration(hass, mock_config_entry)
    settings = server.settings()

    result = await hass.config_entries.options.async_init(mock_config_entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], form_input(settings, model=SECOND_MODEL)
    )

    assert result["type"] is FlowResultType.SHOW_PROGRESS
    assert (result["step_id"], result["progress_action"]) == ("load", "load")
    assert result["description_placeholders"] == {"model": SECOND_MODEL}
    await hass.async_block_till_done(wait_background_tasks=True)
    result = await hass.config_entries.options.async_configure(result["flow_id"])

    assert result["type"] is FlowResultType.CREATE_ENTRY
    _, status = server.request("GET", "/api/v1/status")
    assert (status["state"], status["model"]["name"], status["target"]) == ("ready", SECOND_MODEL, None)
    await hass.async_block_till_done(wait_background_tasks=True)
    assert hass.states.get("sensor.whisper_gpu_loaded_model").state == SECOND_MODEL


async def test_options_model_that_cannot_be_had_offline(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry, issue_registry: ir.IssueRegistry
) -> None:
    """The load fails: back at the form with the translated reason; the server, sensor and repairs say all is well.

    Choosing the serving model again then ends the dialog without a stale failure anywhere.
    """
    await setup_integration(hass, mock_config_entry)
    settings = server.settings()
    wanted = "nobody/whisper-nowhere"

    result = await hass.config_entries.options.async_init(mock_config_entry.entry_id)
    result = await hass.config_entries.options.async_configure(result["flow_id"], form_input(settings, model=wanted))
    assert result["type"] is FlowResultType.SHOW_PROGRESS
    await hass.async_block_till_done(wait_background_tasks=True)
    result = await hass.config_entries.options.async_configure(result["flow_id"])

    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "init"
    assert result["errors"] == {"model_settings": "model_not_available_offline"}
    assert result["description_placeholders"]["model"] == wanted
    assert "offline mode forbids downloading it" in result["description_placeholders"]["message"]
    # The form shows what the server kept: the serving model.
    model_key = next(key for value in result["data_schema"].schema.values() for key in value.schema.schema)
    assert model_key.description == {"suggested_value": TEST_MODEL}
    _, status = server.request("GET", "/api/v1/status")
    assert (status["state"], status["model"]["name"], status["last_failure"]["model"]) == ("ready", TEST_MODEL, wanted)
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
    assert hass.states.get("sensor.whisper_gpu_loaded_model").state == TEST_MODEL
    assert issue_registry.async_get_issue(DOMAIN, f"model_failed_{mock_config_entry.entry_id}") is None

    result = await hass.config_entries.options.async_configure(result["flow_id"], form_input(server.settings()))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"
    assert issue_registry.async_get_issue(DOMAIN, f"model_failed_{mock_config_entry.entry_id}") is None


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("insufficient_memory", "model_insufficient_memory"),
        ("checksum_mismatch", "model_checksum_mismatch"),
        ("something_new", "model_load_failed"),
    ],
)
async def test_options_failed_load_reasons(
    hass: HomeAssistant, server: WhisperGpuServer, stub_server: StubControlServer, code: str, error: str
) -> None:
    """Each reason the server gives for a failed load becomes its translated text; an unknown one a general one."""
    mirror(stub_server, server)
    settings = server.settings()
    stub_server.routes["PATCH", "/api/v1/settings"] = (
        200,
        {"settings": {**settings, "model": SECOND_MODEL}, "changed": ["model"], "reload": True},
    )
    _, status = stub_server.routes["GET", "/api/v1/status"]
    failure = {"code": code, "message": "Why.", "model": SECOND_MODEL, "compute_type": "int8", "time": "T"}
    after_load = {**status, "last_failure": failure}
    stub_server.then["PATCH", "/api/v1/settings"] = {("GET", "/api/v1/status"): (200, after_load)}
    entry = MockConfigEntry(domain=DOMAIN, data=server.entry_data(control_port=stub_server.port))
    entry.add_to_hass(hass)

    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], form_input(settings, model=SECOND_MODEL)
    )
    await hass.async_block_till_done(wait_background_tasks=True)
    result = await hass.config_entries.options.async_configure(result["flow_id"])

    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"model_settings": error}
    assert result["description_placeholders"] == {"model": SECOND_MODEL, "message": "Why"}


async def test_options_language_detection_switch(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry
) -> None:
    """The switch on sends `auto`; off again, the language picked."""
    await setup_integration(hass, mock_config_entry)
    settings = server.settings()
    assert settings["language"] == "en"

    result = await hass.config_entries.options.async_init(mock_config_entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], form_input(settings, detect_language=True)
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert server.settings()["language"] == "auto"

    result = await hass.config_entries.options.async_init(mock_config_entry.entry_id)
    sections = {str(key): value for key, value in result["data_schema"].schema.items()}
    keys = {str(key): key for key in sections["decoding"].schema.schema}
    assert keys["detect_language"].description == {"suggested_value": True}
    # While the language is detected, the picker offers Home Assistant's language.
    assert keys["language"].description == {"suggested_value": "en"}
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], form_input(server.settings(), detect_language=False, language="en")
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert server.settings()["language"] == "en"
