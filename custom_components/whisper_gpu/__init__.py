"""The whisper-gpu integration: speech-to-text on a self-hosted Whisper server."""

from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import ConfigEntryNotReady
from homeassistant.helpers import issue_registry as ir

from .api import WhisperGpuError
from .const import DOMAIN
from .coordinator import WhisperGpuCoordinator, model_failed_issue_id
from .data import WhisperGpuConfigEntry, WhisperGpuData, create_client
from .names import AssistNames

PLATFORMS = [Platform.BUTTON, Platform.SELECT, Platform.SENSOR, Platform.STT]


async def async_setup_entry(hass: HomeAssistant, entry: WhisperGpuConfigEntry) -> bool:
    """Connect to the server and set up its entities."""
    client = create_client(hass, entry.data)
    coordinator = WhisperGpuCoordinator(hass, entry, client)
    await coordinator.async_config_entry_first_refresh()
    try:
        asr = await client.async_describe()
    except WhisperGpuError as err:
        raise ConfigEntryNotReady(
            translation_domain=DOMAIN,
            translation_key="wyoming_unreachable",
            translation_placeholders={"error": str(err)},
        ) from err

    names = AssistNames(hass)
    entry.async_on_unload(names.async_start())
    entry.runtime_data = WhisperGpuData(coordinator=coordinator, asr=asr, names=names)
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    return True


async def async_unload_entry(hass: HomeAssistant, entry: WhisperGpuConfigEntry) -> bool:
    """Unload the entities; the repair issue of the server goes with them."""
    if unloaded := await hass.config_entries.async_unload_platforms(entry, PLATFORMS):
        ir.async_delete_issue(hass, DOMAIN, model_failed_issue_id(entry))
    return unloaded
