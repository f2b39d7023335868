"""Runtime data of a whisper-gpu config entry."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from homeassistant.config_entries import ConfigEntry
from homeassistant.const import CONF_HOST, CONF_TOKEN
from homeassistant.core import HomeAssistant
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from wyoming.info import AsrProgram

from .api import WhisperGpuClient
from .const import CONF_CA_PEM, CONF_CONTROL_PORT, CONF_TLS, CONF_WYOMING_PORT
from .names import AssistNames

if TYPE_CHECKING:
    from .coordinator import WhisperGpuCoordinator


@dataclass(slots=True, kw_only=True)
class WhisperGpuData:
    """What a loaded entry keeps: the coordinator (with the client), the Wyoming program, the names of the home."""

    coordinator: WhisperGpuCoordinator
    asr: AsrProgram
    names: AssistNames


type WhisperGpuConfigEntry = ConfigEntry[WhisperGpuData]


def create_client(hass: HomeAssistant, data: Mapping[str, Any], address: str | None = None) -> WhisperGpuClient:
    """Return a client for the connection data of an entry (or of a form): its host, or one address of it.

    A replica reached by address still proves itself with the host's name (TLS verifies that name). Entries made
    before the control API could speak HTTPS have no TLS keys: plain HTTP. Only the control API speaks TLS;
    Wyoming has none and stays plain TCP.
    """
    return WhisperGpuClient(
        async_get_clientsession(hass),
        address or data[CONF_HOST],
        wyoming_port=data[CONF_WYOMING_PORT],
        control_port=data[CONF_CONTROL_PORT],
        token=data[CONF_TOKEN],
        tls=bool(data.get(CONF_TLS, False)),
        ca_pem=data.get(CONF_CA_PEM) or None,
        server_hostname=data[CONF_HOST],
    )
