"""Config flow: user, zeroconf, hassio, reconfigure and reauth, against a real server."""

from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from helpers.tls import issued_by_a_ca, self_signed
from homeassistant.config_entries import (
    SOURCE_HASSIO,
    SOURCE_USER,
    SOURCE_ZEROCONF,
    ConfigEntryState,
)
from homeassistant.const import CONF_HOST, CONF_TOKEN
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.whisper_gpu.const import (
    CONF_CA_PEM,
    CONF_CONTROL_PORT,
    CONF_TLS,
    CONF_WYOMING_PORT,
    DOMAIN,
)

from .common import HOST, StubControlServer, WhisperGpuServer, setup_integration
from .test_button import STATE_SENSOR_ID, press

OTHER_HOST = "192.0.2.10"  # TEST-NET-1: never contacted, only stored


def zeroconf_info(server: WhisperGpuServer, **properties: Any) -> ZeroconfServiceInfo:
    """Return what Home Assistant's zeroconf hands over for the server."""
    return ZeroconfServiceInfo(
        ip_address=ip_address(server.address),
        ip_addresses=[ip_address(server.address)],
        port=server.wyoming_port,
        hostname="whisper-gpu.local.",
        type="_whisper-gpu._tcp.local.",
        name="whisper-gpu._whisper-gpu._tcp.local.",
        properties={
            "id": server.server_id,
            "version": "0.1.0",
            "wyoming_port": str(server.wyoming_port),
            "control_port": str(server.control_port),
            **properties,
        },
    )


def hassio_info(server: WhisperGpuServer, **config: Any) -> HassioServiceInfo:
    """Return what the Supervisor announces for the add-on's server."""
    return HassioServiceInfo(
        config={
            "host": server.address,
            "wyoming_port": server.wyoming_port,
            "control_port": server.control_port,
            "token": server.token,
            "id": server.server_id,
            **config,
        },
        name="whisper-gpu",
        slug="whisper_gpu",
        uuid="1234",
    )


async def test_user_creates_entry(hass: HomeAssistant, server: WhisperGpuServer) -> None:
    """The user types the address and token; the entry loads."""
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    assert result["errors"] == {}

    result = await hass.config_entries.flow.async_configure(result["flow_id"], server.entry_data())
    await hass.async_block_till_done()

    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "whisper-gpu"
    assert result["data"] == server.entry_data()
    entry = result["result"]
    assert entry.unique_id == server.server_id
    assert entry.state is ConfigEntryState.LOADED
    # The settings stay on the server: the entry keeps no copy of them.
    assert entry.options == {}
    assert entry.runtime_data.coordinator.data.settings == server.settings()


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("closed_port", "cannot_connect"),
        ("wrong_token", "invalid_auth"),
        ("http_404", "not_whisper_gpu"),
        ("foreign_json", "not_whisper_gpu"),
        ("closed_wyoming_port", "wyoming_unreachable"),
    ],
)
async def test_user_errors_then_recovers(
    hass: HomeAssistant,
    server: WhisperGpuServer,
    stub_server: StubControlServer,
    closed_port: int,
    case: str,
    error: str,
) -> None:
    """Each failed check shows its error; correct input then creates the entry."""
    stub_server.routes["GET", "/api/v1/info"] = (200, {"name": "something else", "version": 3})
    bad_input = {
        "closed_port": server.entry_data(control_port=closed_port),
        "wrong_token": server.entry_data(token="wrong"),  # noqa: S106
        "http_404": server.entry_data(control_port=stub_server.port, host=HOST),
        "foreign_json": server.entry_data(control_port=stub_server.port),
        "closed_wyoming_port": server.entry_data(wyoming_port=closed_port),
    }[case]
    if case == "http_404":
        stub_server.routes.clear()

    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    result = await hass.config_entries.flow.async_configure(result["flow_id"], bad_input)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": error}

    result = await hass.config_entries.flow.async_configure(result["flow_id"], server.entry_data())
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_user_already_configured_updates_host(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer
) -> None:
    """A server that moved: the existing entry gets the new address."""
    entry = mock_config_entry
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data=server.entry_data(host=OTHER_HOST, control_port=1))

    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    result = await hass.config_entries.flow.async_configure(result["flow_id"], server.entry_data())

    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data == server.entry_data()


async def test_zeroconf_asks_for_token(hass: HomeAssistant, server: WhisperGpuServer) -> None:
    """A discovered server: only the token is asked for; a wrong one is refused."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(server)
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "zeroconf_confirm"
    assert result["description_placeholders"] == {"host": HOST, "port": str(server.control_port)}
    assert set(result["data_schema"].schema) == {CONF_TOKEN}

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {CONF_TOKEN: "wrong"})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {CONF_TOKEN: server.token})
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"] == server.entry_data()
    assert result["result"].unique_id == server.server_id


async def test_zeroconf_found_twice_is_one_flow(hass: HomeAssistant, server: WhisperGpuServer) -> None:
    """The same server announced twice (IPv4 and IPv6, say) raises one card."""
    first = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(server)
    )
    second = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(server)
    )
    assert first["type"] is FlowResultType.FORM
    assert second["type"] is FlowResultType.ABORT
    assert second["reason"] == "already_in_progress"


async def test_user_adds_a_server_whose_discovery_card_is_open(hass: HomeAssistant, server: WhisperGpuServer) -> None:
    """Typing in a server that discovery also found adds it; the open card does not block the user."""
    discovered = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(server)
    )
    assert discovered["type"] is FlowResultType.FORM

    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    result = await hass.config_entries.flow.async_configure(result["flow_id"], server.entry_data())
    await hass.async_block_till_done()

    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["result"].unique_id == server.server_id


async def test_zeroconf_updates_moved_server(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer
) -> None:
    """A known server announced at a new address: the entry follows it."""
    entry = mock_config_entry
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data=server.entry_data(host=OTHER_HOST))

    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(server)
    )

    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data[CONF_HOST] == HOST
    assert entry.data[CONF_TOKEN] == server.token


@pytest.mark.parametrize("mock_config_entry", [{"source": SOURCE_HASSIO}], indirect=True)
async def test_zeroconf_keeps_addon_address(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer
) -> None:
    """The add-on's entry keeps the address the Supervisor gave it."""
    entry = mock_config_entry
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data=server.entry_data(host="local-whisper-gpu"))

    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(server)
    )

    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data[CONF_HOST] == "local-whisper-gpu"


@pytest.mark.parametrize(
    "properties",
    [{"id": None}, {"control_port": "not a port"}],
    ids=["no_id", "bad_port"],
)
async def test_zeroconf_not_whisper_gpu(
    hass: HomeAssistant, server: WhisperGpuServer, properties: dict[str, Any]
) -> None:
    """An announcement without whisper-gpu's TXT records is not taken."""
    info = zeroconf_info(server, **properties)
    info.properties = {key: value for key, value in info.properties.items() if value is not None}

    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_ZEROCONF}, data=info)

    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "not_whisper_gpu"


async def test_hassio_confirm(hass: HomeAssistant, server: WhisperGpuServer, closed_port: int) -> None:
    """The add-on's server: a confirm step, no typing; an unreachable server shows an error."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_HASSIO}, data=hassio_info(server, control_port=closed_port)
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "hassio_confirm"
    assert result["description_placeholders"] == {"addon": "whisper-gpu"}
    assert result["data_schema"] is None

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect"}
    hass.config_entries.flow.async_abort(result["flow_id"])

    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_HASSIO}, data=hassio_info(server)
    )
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "whisper-gpu"
    assert result["data"] == server.entry_data()
    assert result["result"].unique_id == server.server_id


async def test_hassio_updates_existing(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer
) -> None:
    """The add-on announced again with a new port and token: the entry takes them."""
    entry = mock_config_entry
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data=server.entry_data(control_port=1, token="old"))  # noqa: S106

    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_HASSIO}, data=hassio_info(server)
    )

    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data == server.entry_data()


async def test_hassio_not_whisper_gpu(hass: HomeAssistant, server: WhisperGpuServer) -> None:
    """A discovery without the add-on's config keys is not taken."""
    info = hassio_info(server)
    del info.config["token"]

    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_HASSIO}, data=info)

    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "not_whisper_gpu"


async def test_reconfigure(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry, closed_port: int
) -> None:
    """New address data is checked, then stored, and the entry reloads."""
    mock_config_entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(mock_config_entry, data=server.entry_data(control_port=1))

    result = await mock_config_entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], server.entry_data(control_port=closed_port)
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect"}

    result = await hass.config_entries.flow.async_configure(result["flow_id"], server.entry_data())
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert mock_config_entry.data == server.entry_data()
    assert mock_config_entry.state is ConfigEntryState.LOADED


async def test_reconfigure_other_server(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, server: WhisperGpuServer
) -> None:
    """An address that belongs to another server is refused."""
    entry = mock_config_entry
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, unique_id="another-server", data=server.entry_data(host=OTHER_HOST))

    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], server.entry_data())

    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "wrong_server"
    assert entry.data[CONF_HOST] == OTHER_HOST


async def test_reauth(hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry) -> None:
    """A rejected token at setup starts reauth; the new token is checked and stored."""
    mock_config_entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(mock_config_entry, data=server.entry_data(token="old"))  # noqa: S106
    await hass.config_entries.async_setup(mock_config_entry.entry_id)
    await hass.async_block_till_done()
    assert mock_config_entry.state is ConfigEntryState.SETUP_ERROR

    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert [flow["context"]["source"] for flow in flows] == ["reauth"]
    result = await hass.config_entries.flow.async_configure(flows[0]["flow_id"])
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reauth_confirm"
    assert result["description_placeholders"] == {"host": HOST, "name": "whisper-gpu"}

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {CONF_TOKEN: "still wrong"})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {CONF_TOKEN: server.token})
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    assert mock_config_entry.data[CONF_TOKEN] == server.token
    assert mock_config_entry.state is ConfigEntryState.LOADED


async def test_ports_are_stored_as_int(hass: HomeAssistant, server: WhisperGpuServer) -> None:
    """The number selectors' floats become the ints the client and the server want."""
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        server.entry_data(wyoming_port=float(server.wyoming_port), control_port=float(server.control_port)),
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert type(result["data"][CONF_WYOMING_PORT]) is int
    assert type(result["data"][CONF_CONTROL_PORT]) is int


@pytest.mark.parametrize(
    "routes",
    [
        {("GET", "/api/v1/info"): (200, {"server_id": 7, "name": "x", "version": "1"})},
        {("GET", "/api/v1/info"): (200, ["not", "an", "object"])},
        {("GET", "/api/v1/info"): "real", ("GET", "/api/v1/auth"): (200, {"ok": True})},
    ],
    ids=["id_not_a_string", "not_an_object", "auth_answers_200"],
)
async def test_user_not_whisper_gpu_answers(
    hass: HomeAssistant,
    server: WhisperGpuServer,
    stub_server: StubControlServer,
    routes: dict[tuple[str, str], Any],
) -> None:
    """Answers that look almost, but not quite, like whisper-gpu's."""
    for route, answer in routes.items():
        stub_server.routes[route] = server.request(*route) if answer == "real" else answer

    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], server.entry_data(control_port=stub_server.port)
    )

    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "not_whisper_gpu"}


@pytest.mark.parametrize("issuer", ["self-signed", "ca"])
async def test_user_sets_up_a_server_over_https(
    hass: HomeAssistant, own_server: WhisperGpuServer, tmp_path: Path, issuer: str
) -> None:
    """A real server whose control port speaks HTTPS with a certificate of the user's own (self-signed, or issued by
    a CA as cert-manager does): without its CA the form says the certificate is not trusted, plain HTTP is told to
    turn HTTPS on, text that is no certificate is refused; with the CA the entry is made and its entities work.
    """
    if issuer == "self-signed":
        own_server.tls = self_signed(tmp_path / "tls")
        ca_pem = own_server.tls.pem
    else:
        own_server.tls, ca_file = issued_by_a_ca(tmp_path / "tls")
        ca_pem = ca_file.read_text(encoding="ascii")
    own_server.start()
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})

    for user_input, errors in (
        (own_server.entry_data(), {"base": "untrusted_certificate"}),  # the system's CAs do not know it
        (own_server.entry_data(tls=False), {"base": "tls_required"}),
        (own_server.entry_data(ca_pem="not a certificate"), {CONF_CA_PEM: "invalid_ca"}),
    ):
        result = await hass.config_entries.flow.async_configure(result["flow_id"], user_input)
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == errors

    result = await hass.config_entries.flow.async_configure(result["flow_id"], own_server.entry_data(ca_pem=ca_pem))
    await hass.async_block_till_done()

    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"] == own_server.entry_data(ca_pem=ca_pem)
    assert result["data"][CONF_TLS] is True
    entry = result["result"]
    assert entry.state is ConfigEntryState.LOADED
    assert hass.states.get(STATE_SENSOR_ID).state == "ready"
    await press(hass)  # the token goes over HTTPS
    _, status = own_server.request("GET", "/api/v1/status")
    assert status["state"] == "parked"
    assert hass.states.get(STATE_SENSOR_ID).state == "parked"


async def test_https_asked_of_a_plain_http_port(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry
) -> None:
    """HTTPS against a server without a certificate: the form says the port does not speak it; an entry that asks
    for it does not load, and reconfiguring it back to HTTP makes it load.
    """
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    result = await hass.config_entries.flow.async_configure(result["flow_id"], server.entry_data(tls=True))

    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "tls_not_supported"}

    await setup_integration(hass, mock_config_entry, tls=True)
    assert mock_config_entry.state is ConfigEntryState.SETUP_RETRY
    result = await mock_config_entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], server.entry_data())
    await hass.async_block_till_done()
    assert result["reason"] == "reconfigure_successful"
    assert mock_config_entry.state is ConfigEntryState.LOADED


async def test_zeroconf_of_a_server_that_speaks_https(
    hass: HomeAssistant, own_server: WhisperGpuServer, tmp_path: Path
) -> None:
    """A server that announces control_tls: HTTPS is on from the start; the form asks for the CA beside the token."""
    own_server.tls = self_signed(tmp_path / "tls")
    own_server.start()

    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_ZEROCONF}, data=zeroconf_info(own_server, control_tls="true")
    )
    assert result["step_id"] == "zeroconf_confirm"
    assert set(result["data_schema"].schema) == {CONF_TOKEN, CONF_CA_PEM}

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {CONF_TOKEN: own_server.token})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "untrusted_certificate"}

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_TOKEN: own_server.token, CONF_CA_PEM: own_server.tls.pem}
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"] == own_server.entry_data(ca_pem=own_server.tls.pem)
    assert result["result"].state is ConfigEntryState.LOADED
