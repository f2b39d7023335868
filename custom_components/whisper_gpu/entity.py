"""Base entity of the whisper-gpu integration."""

from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.entity import EntityDescription
from homeassistant.helpers.update_coordinator import CoordinatorEntity

from .const import DOMAIN
from .coordinator import WhisperGpuCoordinator


class WhisperGpuEntity(CoordinatorEntity[WhisperGpuCoordinator]):
    """An entity of one whisper-gpu server: one service device per server."""

    _attr_has_entity_name = True

    def __init__(self, coordinator: WhisperGpuCoordinator, description: EntityDescription) -> None:
        """Name the entity after its description and attach it to the device."""
        super().__init__(coordinator)
        self.entity_description = description
        server_id = coordinator.info.server_id
        self._attr_unique_id = f"{server_id}_{description.key}"
        self._attr_device_info = DeviceInfo(
            identifiers={(DOMAIN, server_id)},
            name=coordinator.config_entry.title,
            manufacturer="whisper-gpu",
            model="Speech-to-text server",
            hw_version=coordinator.info.device_name,
            sw_version=coordinator.info.version,
            entry_type=DeviceEntryType.SERVICE,
        )
