"""Sensors of a whisper-gpu server: model state, loaded model, latency, ready replicas."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, override

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

from .coordinator import WhisperGpuState
from .data import WhisperGpuConfigEntry
from .entity import WhisperGpuEntity

PARALLEL_UPDATES = 0

# The ready replicas sensor's attribute: how many replicas the host name resolves to.
ATTR_REPLICAS = "replicas"

MODEL_STATES = ["loading", "downloading", "ready", "parked", "failed"]
# The state the service shows when its replicas differ: the one furthest from serving.
STATE_PRIORITY = ["failed", "downloading", "loading", "parked", "ready"]


def _model_state(data: WhisperGpuState) -> StateType:
    """The replicas' model state; when they differ, the one that needs attention first."""
    states = {replica.status.state for replica in data.answered if replica.status is not None}
    shown = next((state for state in STATE_PRIORITY if state in states), None)
    return shown if shown in MODEL_STATES else None


def _loaded_models(data: WhisperGpuState) -> StateType:
    """The model the replicas serve; when they differ, each distinct model (in replica order)."""
    models = [replica.status.model for replica in data.answered if replica.status is not None]
    distinct = list(dict.fromkeys(model for model in models if model is not None))
    return ", ".join(distinct) if distinct else None


@dataclass(frozen=True, kw_only=True)
class WhisperGpuSensorEntityDescription(SensorEntityDescription):
    """A sensor that reads one value from the last poll of the server's replicas."""

    value_fn: Callable[[WhisperGpuState], StateType]
    attributes_fn: Callable[[WhisperGpuState], dict[str, Any]] | None = None


SENSORS: tuple[WhisperGpuSensorEntityDescription, ...] = (
    WhisperGpuSensorEntityDescription(
        key="model_state",
        translation_key="model_state",
        device_class=SensorDeviceClass.ENUM,
        options=MODEL_STATES,
        value_fn=_model_state,
    ),
    WhisperGpuSensorEntityDescription(
        key="loaded_model",
        translation_key="loaded_model",
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=_loaded_models,
    ),
    WhisperGpuSensorEntityDescription(
        key="last_request_duration",
        translation_key="last_request_duration",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.MILLISECONDS,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=0,
        value_fn=lambda data: data.status.last_request_ms,
    ),
    WhisperGpuSensorEntityDescription(
        key="ready_replicas",
        translation_key="ready_replicas",
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda data: sum(replica.ready for replica in data.replicas),
        attributes_fn=lambda data: {ATTR_REPLICAS: len(data.replicas)},
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
        return self.entity_description.value_fn(self.coordinator.data)

    @property
    @override
    def extra_state_attributes(self) -> dict[str, Any] | None:
        """Return the attributes from the last poll (the number of replicas beside the ready ones)."""
        attributes_fn = self.entity_description.attributes_fn
        return attributes_fn(self.coordinator.data) if attributes_fn else None
