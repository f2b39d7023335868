"""Sensors of a whisper-gpu server: model state, loaded model, latency."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import override

from homeassistant.components.sensor import (
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.const import EntityCategory, UnitOfTime
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.helpers.typing import StateType

from .api import ServerStatus
from .data import WhisperGpuConfigEntry
from .entity import WhisperGpuEntity

PARALLEL_UPDATES = 0

MODEL_STATES = ["loading", "downloading", "ready", "parked", "failed"]


@dataclass(frozen=True, kw_only=True)
class WhisperGpuSensorEntityDescription(SensorEntityDescription):
    """A sensor that reads one value from the server's status."""

    value_fn: Callable[[ServerStatus], StateType]


SENSORS: tuple[WhisperGpuSensorEntityDescription, ...] = (
    WhisperGpuSensorEntityDescription(
        key="model_state",
        translation_key="model_state",
        device_class=SensorDeviceClass.ENUM,
        options=MODEL_STATES,
        value_fn=lambda status: status.state if status.state in MODEL_STATES else None,
    ),
    WhisperGpuSensorEntityDescription(
        key="loaded_model",
        translation_key="loaded_model",
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda status: status.model,
    ),
    WhisperGpuSensorEntityDescription(
        key="last_request_duration",
        translation_key="last_request_duration",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.MILLISECONDS,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=0,
        value_fn=lambda status: status.last_request_ms,
    ),
)


async def async_setup_entry(
    hass: HomeAssistant,  # noqa: ARG001
    entry: WhisperGpuConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the sensors of a server."""
    coordinator = entry.runtime_data.coordinator
    async_add_entities(WhisperGpuSensor(coordinator, description) for description in SENSORS)


class WhisperGpuSensor(WhisperGpuEntity, SensorEntity):
    """A value from the server's status."""

    entity_description: WhisperGpuSensorEntityDescription

    @property
    @override
    def native_value(self) -> StateType:
        """Return the value from the last poll."""
        return self.entity_description.value_fn(self.coordinator.data.status)
