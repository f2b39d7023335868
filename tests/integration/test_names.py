"""The names of the home go with each request: what is exposed to Assist, kept current, and what the server makes of it.

The first tests read the `transcribe` event from a stub Wyoming server that records what the integration writes
(the control API is the real server's); the last one transcribes on the real server.
"""

from datetime import timedelta
from pathlib import Path

import pytest
from helpers.speech import Utterance, synthesize
from homeassistant.components import stt
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.core import HomeAssistant
from homeassistant.helpers import area_registry as ar
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers import floor_registry as fr
from homeassistant.setup import async_setup_component
from homeassistant.util import dt as dt_util
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_fire_time_changed
from wyoming.asr import Transcribe

from custom_components.whisper_gpu.const import CONF_SEND_NAMES
from custom_components.whisper_gpu.names import REFRESH_COOLDOWN_S

from .common import StubWyomingServer, WhisperGpuServer, audio_stream, metadata, setup_integration, words

ENTITY_ID = "stt.whisper_gpu_speech_to_text"


async def make_home(hass: HomeAssistant) -> None:
    """A floor and an area with aliases, an exposed lamp with an alias, and a lamp hidden from Assist."""
    assert await async_setup_component(hass, "homeassistant", {})
    floor = fr.async_get(hass).async_create("Ground Floor", aliases={"Erdgeschoss"})
    ar.async_get(hass).async_create("Kaia's Room", aliases={"Kaia's Bedroom"}, floor_id=floor.floor_id)
    registry = er.async_get(hass)
    for object_id, name, exposed in (("grunewald", "Grünewald Lamp", True), ("secret", "Geheimnis Lamp", False)):
        entry = registry.async_get_or_create("light", "test", object_id, suggested_object_id=object_id)
        registry.async_update_entity(entry.entity_id, name=name, aliases=[er.COMPUTED_NAME, f"{name} Alias"])
        hass.states.async_set(entry.entity_id, "off", {"friendly_name": name})
        async_expose_entity(hass, "conversation", entry.entity_id, exposed)
    await hass.async_block_till_done()


async def sent_names(hass: HomeAssistant, stub: StubWyomingServer, pcm: bytes) -> list[str] | None:
    """Transcribe through the entity; the names its `transcribe` event carried."""
    entity = stt.async_get_speech_to_text_entity(hass, ENTITY_ID)
    assert entity is not None
    stub.events.clear()
    result = await entity.internal_async_process_audio_stream(metadata(), audio_stream(pcm))
    assert result.result is stt.SpeechResultState.SUCCESS
    [event] = [event for event in stub.events if Transcribe.is_type(event.type)]
    return Transcribe.from_event(event).transcript_names


async def settle(hass: HomeAssistant) -> None:
    """Let a change reach the list, past the cooldown that gathers a burst of changes into one refresh."""
    await hass.async_block_till_done()
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(seconds=REFRESH_COOLDOWN_S + 1))
    await hass.async_block_till_done()


async def test_exposed_names_aliases_areas_and_floors_are_sent(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_wyoming: StubWyomingServer,
    speech_pcm: bytes,
) -> None:
    """Floors, areas, then the exposed entities' names and aliases; nothing of an entity Assist cannot see."""
    await make_home(hass)
    await setup_integration(hass, mock_config_entry, wyoming_port=stub_wyoming.port)

    names = await sent_names(hass, stub_wyoming, speech_pcm)

    assert names == [
        "Ground Floor",
        "Erdgeschoss",
        "Kaia's Room",
        "Kaia's Bedroom",
        "Grünewald Lamp",
        "Grünewald Lamp Alias",
    ]


async def test_registry_changes_are_picked_up(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_wyoming: StubWyomingServer,
    speech_pcm: bytes,
) -> None:
    """A renamed area, a new alias and an entity newly exposed to Assist go with the next request."""
    await make_home(hass)
    await setup_integration(hass, mock_config_entry, wyoming_port=stub_wyoming.port)
    areas = ar.async_get(hass)
    area = areas.async_get_area_by_name("Kaia's Room")
    assert area is not None

    areas.async_update(area.id, name="Siobhán's Room")
    er.async_get(hass).async_update_entity("light.grunewald", aliases=[er.COMPUTED_NAME, "Väinämöinen Light"])
    async_expose_entity(hass, "conversation", "light.secret", True)
    await settle(hass)
    names = await sent_names(hass, stub_wyoming, speech_pcm)

    assert names is not None
    assert {"Siobhán's Room", "Väinämöinen Light", "Geheimnis Lamp", "Geheimnis Lamp Alias"} <= set(names)
    assert not {"Kaia's Room", "Grünewald Lamp Alias"} & set(names)


@pytest.mark.parametrize("mock_config_entry", [{"options": {CONF_SEND_NAMES: False}}], indirect=True)
async def test_the_option_turns_the_names_off(
    hass: HomeAssistant,
    mock_config_entry: MockConfigEntry,
    server: WhisperGpuServer,
    stub_wyoming: StubWyomingServer,
    speech_pcm: bytes,
) -> None:
    """With send_names off the request carries no names, as before this feature."""
    await make_home(hass)
    await setup_integration(hass, mock_config_entry, wyoming_port=stub_wyoming.port)

    assert await sent_names(hass, stub_wyoming, speech_pcm) is None
    assert mock_config_entry.options[CONF_SEND_NAMES] is False


async def test_the_server_spells_a_name_of_the_home(
    hass: HomeAssistant, server: WhisperGpuServer, mock_config_entry: MockConfigEntry, speech_dir: Path
) -> None:
    """End to end on tiny.en: an area's name comes back spelled as the home spells it.

    Without the names tiny.en hears "car room"; the server's own tests check that difference.
    """
    await make_home(hass)
    await setup_integration(hass, mock_config_entry)
    text = "turn off the lights in Kaia's room"
    spoken = synthesize("turn off the lights in Kaya's room", speech_dir)
    pcm, _, _, _ = Utterance(text, spoken, clear=True).pcm()
    entity = stt.async_get_speech_to_text_entity(hass, ENTITY_ID)
    assert entity is not None

    result = await entity.internal_async_process_audio_stream(metadata(), audio_stream(pcm))

    assert result.result is stt.SpeechResultState.SUCCESS
    assert "Kaia's" in (result.text or ""), result.text
    assert words(result.text).startswith("turn off the lights in kaia")
