"""Model select: switch the server's model (on every replica) from a dashboard or an automation."""

import asyncio
from typing import override

from homeassistant.components.select import SelectEntity, SelectEntityDescription
from homeassistant.const import EntityCategory
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .api import LoadFailure
from .const import DOMAIN, SETTING_MODEL
from .data import WhisperGpuConfigEntry
from .entity import WhisperGpuEntity
from .model_load import load_failure_key, load_failure_placeholders

PARALLEL_UPDATES = 1

MODEL_DESCRIPTION = SelectEntityDescription(
    key=SETTING_MODEL,
    translation_key=SETTING_MODEL,
    entity_category=EntityCategory.CONFIG,
)


async def async_setup_entry(
    hass: HomeAssistant,  # noqa: ARG001
    entry: WhisperGpuConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the model select of a server."""
    async_add_entities([WhisperGpuModelSelect(entry.runtime_data.coordinator, MODEL_DESCRIPTION)])


class WhisperGpuModelSelect(WhisperGpuEntity, SelectEntity):
    """The model the server is set to (a change reloads it in the background)."""

    @property
    @override
    def current_option(self) -> str | None:
        """Return the model in the server's settings."""
        model = self.coordinator.data.settings.get(SETTING_MODEL)
        return model if isinstance(model, str) else None

    @property
    @override
    def options(self) -> list[str]:
        """Return the models that fit the server's device, and the current one."""
        models = self.coordinator.info.usable_models
        current = self.current_option
        if current is not None and current not in models:
            return [*models, current]
        return models

    @override
    async def async_select_option(self, option: str) -> None:
        """Switch every replica to another model; return once the first serves it, or raise why it could not.

        The first replica that answers validates the switch (it must load the model) before the others are sent it
        (see replicas.py); the model then is the desired one, brought back onto any replica that differs.
        """
        with self.control_errors("setting_rejected", setting=SETTING_MODEL, value=option):
            change = await self.coordinator.replica_set.async_start_change({SETTING_MODEL: option})
        await self.coordinator.async_request_refresh()
        # Returns at once when the server had nothing to load (the model it serves already).
        await self._async_wait_for_load(option, change.done)

    async def _async_wait_for_load(self, option: str, done: asyncio.Task[LoadFailure | None]) -> None:
        """Follow the load to its end; raise the translated reason when it failed."""
        try:
            with self.control_errors("setting_rejected", setting=SETTING_MODEL, value=option):
                failure = await done
        except TimeoutError as err:
            raise HomeAssistantError(
                translation_domain=DOMAIN, translation_key="load_timeout", translation_placeholders={"model": option}
            ) from err
        finally:
            # At once, not debounced behind the request made when the load started.
            await self.coordinator.async_refresh()
        if failure is not None:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key=load_failure_key(failure),
                translation_placeholders=load_failure_placeholders(failure),
            )
