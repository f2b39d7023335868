"""The whisper-gpu integration: speech-to-text on a self-hosted Whisper server."""

from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import ConfigEntryNotReady

from .api import WhisperGpuError
from .const import DOMAIN
from .coordinator import WhisperGpuCoordinator
from .data import WhisperGpuConfigEntry, WhisperGpuData
from .names import AssistNames

PLATFORMS = [Platform.BUTTON, Platform.SELECT, Platform.SENSOR, Platform.STT]


async def async_setup_entry(hass: HomeAssistant, entry: WhisperGpuConfigEntry) -> bool:
    """Connect to the server and set up its entities."""
    coordinator = WhisperGpuCoordinator(hass, entry)
    await coordinator.async_config_entry_first_refresh()
    try:
        asr = await coordinator.service_client.async_describe()
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
    """Unload the entities; the repair issues of the server and its replicas go with them."""
    if unloaded := await hass.config_entries.async_unload_platforms(entry, PLATFORMS):
        entry.runtime_data.coordinator.async_delete_issues()
    return unloaded
