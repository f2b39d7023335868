"""Free GPU memory button: park the server's model now, e.g. before another program needs the whole GPU."""

from typing import override

from homeassistant.components.button import ButtonEntity, ButtonEntityDescription
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .data import WhisperGpuConfigEntry
from .entity import WhisperGpuEntity
from .replicas import async_each

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
        """Ask every replica to park its model; returns once they are parked (or the first refusal)."""
        try:
            with self.control_errors("park_refused"):
                await async_each(client.async_park() for client in self.coordinator.clients)
        finally:
            await self.coordinator.async_request_refresh()
