"""Base entity of the whisper-gpu integration."""

from collections.abc import Iterator
from contextlib import contextmanager

from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.entity import EntityDescription
from homeassistant.helpers.update_coordinator import CoordinatorEntity

from .api import WhisperGpuAuthError, WhisperGpuError, WhisperGpuSettingsError
from .const import DOMAIN
from .coordinator import WhisperGpuCoordinator


class WhisperGpuEntity(CoordinatorEntity[WhisperGpuCoordinator]):
    """An entity of one whisper-gpu server: one service device per server (for all its replicas)."""

    _attr_has_entity_name = True

    def __init__(self, coordinator: WhisperGpuCoordinator, description: EntityDescription) -> None:
        """Name the entity after its description and attach it to the device."""
        super().__init__(coordinator)
        self.entity_description = description
        server_id = coordinator.server_id
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

    @contextmanager
    def control_errors(self, refused_key: str, **placeholders: str) -> Iterator[None]:
        """Raise what a control call's failure means to the user, translated; a rejected token starts reauth.

        A refusal with the server's codes raises `refused_key` with the codes as `{code}` beside `placeholders`.
        """
        try:
            yield
        except WhisperGpuAuthError as err:
            self.coordinator.config_entry.async_start_reauth(self.hass)
            raise HomeAssistantError(translation_domain=DOMAIN, translation_key="invalid_auth") from err
        except WhisperGpuSettingsError as err:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key=refused_key,
                translation_placeholders={**placeholders, "code": ", ".join(err.errors.values())},
            ) from err
        except WhisperGpuError as err:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="cannot_connect",
                translation_placeholders={"error": str(err)},
            ) from err
