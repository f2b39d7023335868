"""The names Assist knows in this home, sent with each request so that the server spells them as the home does.

The list is kept ready: it is made again when the entity, device, area or floor registry changes, when an entity
is exposed to Assist or hidden from it, and when an entity appears, goes or is renamed. A request only reads it.
"""

from collections.abc import Iterable
from typing import Any, Final

from homeassistant.components.homeassistant.const import DATA_EXPOSED_ENTITIES
from homeassistant.components.homeassistant.exposed_entities import async_listen_entity_updates, async_should_expose
from homeassistant.const import EVENT_STATE_CHANGED
from homeassistant.core import CALLBACK_TYPE, Event, EventStateChangedData, HomeAssistant, callback
from homeassistant.helpers import area_registry as ar
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers import floor_registry as fr
from homeassistant.helpers import intent
from homeassistant.helpers.debounce import Debouncer

from .const import LOGGER

ASSISTANT: Final = "conversation"  # Assist's id in the exposed-entities settings
# The server uses the first few dozen; these bound the `transcribe` event in homes with thousands of entities.
MAX_NAMES: Final = 500
MAX_CHARACTERS: Final = 16_000
# Registry changes come in bursts (an integration adding its entities): one list is made per burst.
REFRESH_COOLDOWN_S: Final = 1.0


class AssistNames:
    """The names of the floors, areas and entities exposed to Assist, with their aliases, deduplicated.

    Ordered shortest list first, as the server prefers what comes first when not all fit: floors, areas, the
    entities' names, then the entities' other aliases.
    """

    def __init__(self, hass: HomeAssistant) -> None:
        """Start empty; `async_start` fills the list and keeps it current."""
        self._hass = hass
        self.names: list[str] = []
        self._refresh = Debouncer(
            hass, LOGGER, cooldown=REFRESH_COOLDOWN_S, immediate=True, function=self._async_collect
        )

    @callback
    def async_start(self) -> CALLBACK_TYPE:
        """Make the list now and whenever what it is made of changes; returns the function that stops it."""
        hass = self._hass
        stops = [
            hass.bus.async_listen(er.EVENT_ENTITY_REGISTRY_UPDATED, self._async_changed),
            hass.bus.async_listen(dr.EVENT_DEVICE_REGISTRY_UPDATED, self._async_changed),
            hass.bus.async_listen(ar.EVENT_AREA_REGISTRY_UPDATED, self._async_changed),
            hass.bus.async_listen(fr.EVENT_FLOOR_REGISTRY_UPDATED, self._async_changed),
            hass.bus.async_listen(EVENT_STATE_CHANGED, self._async_changed, event_filter=_named_differently),
        ]
        if DATA_EXPOSED_ENTITIES in hass.data:
            stops.append(async_listen_entity_updates(hass, ASSISTANT, self._refresh.async_schedule_call))
        self._async_collect()

        @callback
        def stop() -> None:
            for unsubscribe in stops:
                unsubscribe()
            self._refresh.async_cancel()

        return stop

    @callback
    def _async_changed(self, _event: Event[Any]) -> None:
        self._refresh.async_schedule_call()

    @callback
    def _async_collect(self) -> None:
        hass = self._hass
        if DATA_EXPOSED_ENTITIES not in hass.data:
            # The `homeassistant` integration keeps the exposed-entity settings; without it nothing is exposed.
            self.names = []
            return
        floors = fr.async_get(hass).async_list_floors()
        areas = ar.async_get(hass).async_list_areas()
        entity_names: list[str] = []
        aliases: list[str] = []
        registry = er.async_get(hass)
        for state in hass.states.async_all():
            if not async_should_expose(hass, ASSISTANT, state.entity_id):
                continue
            entry = registry.async_get(state.entity_id)
            first, *others = intent.async_get_entity_aliases(hass, entry, state=state, allow_empty=False) or [""]
            entity_names.append(first)
            aliases += others
        self.names = _bounded(
            [
                *(name for floor in floors for name in (floor.name, *sorted(floor.aliases))),
                *(name for area in areas for name in (area.name, *sorted(area.aliases))),
                *entity_names,
                *aliases,
            ]
        )
        LOGGER.debug("%d names exposed to Assist", len(self.names))


@callback
def _named_differently(data: EventStateChangedData) -> bool:
    """An entity appeared, went, or changed its name (not a mere change of state)."""
    old, new = data["old_state"], data["new_state"]
    return old is None or new is None or old.name != new.name


def _bounded(names: Iterable[str]) -> list[str]:
    """The names without blanks and repeats (case aside), within the count and size the event may carry."""
    kept: list[str] = []
    seen: set[str] = set()
    characters = 0
    for name in (" ".join(raw.split()) for raw in names):
        key = name.casefold()
        if not name or key in seen:
            continue
        characters += len(name)
        if len(kept) >= MAX_NAMES or characters > MAX_CHARACTERS:
            break
        seen.add(key)
        kept.append(name)
    return kept
