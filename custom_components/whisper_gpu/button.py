"""Free GPU memory button: park the server's model now, e.g. before another program needs the whole GPU."""

from typing import override

from homeassistant.components.button import ButtonEntity, ButtonEntityDescription
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .api import WhisperGpuAuthError, WhisperGpuError, WhisperGpuSettingsError
from .const import DOMAIN
from .data import WhisperGpuConfigEntry
from .entity import WhisperGpuEntity

PARALLEL_UPDATES = 1

FREE_GPU_MEMORY = ButtonEntityDescription(key="free_gpu_memory", translation_key="free_gpu_memory")


async def async_setup_entry(
    hass: HomeAssistant,  # noqa: ARG001
    entry: WhisperGpuConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the button of a server."""
    async_add_entities([WhisperGpuParkButton(entry.runtime_data.coordinator, FREE_GPU_MEMORY)])


class WhisperGpuParkButton(WhisperGpuEntity, ButtonEntity):
    """Parks the model: its memory is free until the next request brings it back."""

    @override
    async def async_press(self) -> None:
        """Ask the server to park its model; returns once it is parked."""
        try:
            await self.coordinator.client.async_park()
        except WhisperGpuAuthError as err:
            self.coordinator.config_entry.async_start_reauth(self.hass)
            raise HomeAssistantError(translation_domain=DOMAIN, translation_key="invalid_auth") from err
        except WhisperGpuSettingsError as err:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="park_refused",
                translation_placeholders={"code": ", ".join(err.errors.values())},
            ) from err
        except WhisperGpuError as err:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="cannot_connect",
                translation_placeholders={"error": str(err)},
            ) from err
        await self.coordinator.async_request_refresh()
