"""Fast layer: resolving the replicas, keeping them at the desired settings, a transcription sent again on another.

Each replica is a patched client of its own.
"""

import socket
from collections.abc import AsyncGenerator, AsyncIterable, Iterator
from typing import Any
from unittest.mock import AsyncMock, create_autospec, patch

import pytest
from helpers import api_fixtures
from homeassistant.components import stt
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.whisper_gpu.api import (
    ServerInfo,
    ServerStatus,
    TranscriptUpdate,
    WhisperGpuClient,
    WhisperGpuConnectionError,
    WhisperGpuSettingsError,
    WhisperGpuTranscriptionError,
)
from custom_components.whisper_gpu.const import DOMAIN
from custom_components.whisper_gpu.replicas import async_resolve

from .common import metadata, poll, setup_integration

ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
STT_ENTITY_ID = "stt.whisper_gpu_speech_to_text"


def replica_client(settings: dict[str, Any]) -> AsyncMock:
    """A client that answers like the captured server, with settings of its own that PATCH changes."""
    client = create_autospec(WhisperGpuClient, instance=True)
    client.async_get_info.return_value = ServerInfo.from_json(api_fixtures.load("info"))
    client.async_get_status.return_value = ServerStatus.from_json(api_fixtures.load("status"))
    client.async_get_settings.side_effect = lambda: dict(settings)

    async def update(changes: dict[str, Any]) -> dict[str, Any]:
        settings.update(changes)
        return dict(settings)

    client.async_update_settings.side_effect = update
    return client


@pytest.fixture
def clients() -> Iterator[dict[str, AsyncMock]]:
    """Three replicas behind the fixtures' host name, one patched client each."""
    captured = api_fixtures.load("settings")["settings"]
    by_address = {address: replica_client(dict(captured)) for address in ADDRESSES}
    for address, client in by_address.items():
        client.host = address

    async def resolve(_hass: object, _host: str, _port: int) -> list[str]:
        return list(by_address)

    with (
        patch(
            "custom_components.whisper_gpu.data.WhisperGpuClient",
            side_effect=lambda _session, host, **_: by_address.get(host) or replica_client(dict(captured)),
        ),
        patch("custom_components.whisper_gpu.replicas.async_resolve", side_effect=resolve),
    ):
        yield by_address


async def test_resolve_gives_every_address_of_one_family(hass: HomeAssistant) -> None:
    """An IP address is itself; a name its addresses of the first family, sorted; a name that fails itself."""
    assert await async_resolve(hass, "192.0.2.5", 10301) == ["192.0.2.5"]

    answers = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.9", 10301)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::1", 10301, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.10", 10301)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.9", 10301)),
    ]
    with patch.object(hass.loop, "getaddrinfo", AsyncMock(return_value=answers)):
        assert await async_resolve(hass, "whisper-gpu-control", 10301) == ["10.0.0.9", "10.0.0.10"]
    with patch.object(hass.loop, "getaddrinfo", AsyncMock(side_effect=socket.gaierror("no such name"))):
        assert await async_resolve(hass, "whisper-gpu-control", 10301) == ["whisper-gpu-control"]


async def test_a_replica_that_differs_is_sent_the_desired_settings(
    hass: HomeAssistant, clients: dict[str, AsyncMock], mock_config_entry: MockConfigEntry
) -> None:
    """A poll sends each replica the desired settings it lacks, only those; one in step is sent nothing."""
    mock_config_entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(mock_config_entry, options={"desired_settings": {"beam_size": 2}})
    first, second, third = clients.values()
    await first.async_update_settings({"beam_size": 2})
    first.async_update_settings.reset_mock()

    await setup_integration(hass, mock_config_entry)

    first.async_update_settings.assert_not_awaited()
    second.async_update_settings.assert_awaited_once_with({"beam_size": 2})
    third.async_update_settings.assert_awaited_once_with({"beam_size": 2})
    assert hass.states.get("sensor.whisper_gpu_ready_replicas").state == "3"


async def test_a_refused_change_reaches_no_other_replica(
    hass: HomeAssistant, clients: dict[str, AsyncMock], mock_config_entry: MockConfigEntry
) -> None:
    """The first replica refuses: the error is the user's, nothing is stored, the others are sent nothing."""
    await setup_integration(hass, mock_config_entry)
    first, second, third = clients.values()
    first.async_update_settings.side_effect = WhisperGpuSettingsError({"beam_size": "out_of_range"})
    replica_set = mock_config_entry.runtime_data.coordinator.replica_set

    with pytest.raises(WhisperGpuSettingsError):
        await replica_set.async_start_change({"beam_size": 11})

    second.async_update_settings.assert_not_awaited()
    third.async_update_settings.assert_not_awaited()
    assert "desired_settings" not in mock_config_entry.options
    assert not replica_set.change_lock.locked()


async def test_a_replica_down_during_a_change_gets_it_later_and_its_issue_goes(
    hass: HomeAssistant,
    clients: dict[str, AsyncMock],
    mock_config_entry: MockConfigEntry,
    issue_registry: ir.IssueRegistry,
) -> None:
    """The first replica down: the next validates; the one down has a repair issue until a poll brings it in step."""
    await setup_integration(hass, mock_config_entry)
    first, second, third = clients.values()
    update = first.async_update_settings.side_effect
    down = WhisperGpuConnectionError("refused")
    first.async_get_status.side_effect = down
    first.async_update_settings.side_effect = down
    await poll(hass)
    assert hass.states.get("sensor.whisper_gpu_ready_replicas").state == "2"
    issue_id = f"replica_{mock_config_entry.entry_id}_{ADDRESSES[0]}"

    change = await mock_config_entry.runtime_data.coordinator.replica_set.async_start_change({"beam_size": 3})
    assert await change.done is None
    assert change.client is second
    third.async_update_settings.assert_awaited_once_with({"beam_size": 3})
    assert mock_config_entry.options["desired_settings"] == {"beam_size": 3}
    await poll(hass)
    assert issue_registry.async_get_issue(DOMAIN, issue_id) is not None

    first.async_get_status.side_effect = None
    first.async_update_settings.side_effect = update
    await poll(hass)
    first.async_update_settings.assert_awaited_with({"beam_size": 3})
    assert issue_registry.async_get_issue(DOMAIN, issue_id) is None
    assert hass.states.get("sensor.whisper_gpu_ready_replicas").state == "3"


def transcribing(received: list[bytes], *, fail_after: int | None = None, error: Exception | None = None) -> Any:
    """A stand-in for `async_transcribe_updates` that reads the audio into received; it fails after some chunks."""

    async def updates(audio: AsyncIterable[bytes], *_: object) -> AsyncGenerator[TranscriptUpdate]:
        async for chunk in audio:
            received.append(chunk)
            if fail_after is not None and len(received) == fail_after:
                raise error or WhisperGpuConnectionError("The server closed the connection")
        yield TranscriptUpdate(f"{len(received)} chunks", final=True)

    return updates


async def test_a_broken_transcription_is_sent_again_to_another_replica(
    hass: HomeAssistant, clients: dict[str, AsyncMock], mock_config_entry: MockConfigEntry
) -> None:
    """The connection to the first ready replica breaks: the next ready one gets all the audio from its start, once."""
    await setup_integration(hass, mock_config_entry)
    service = mock_config_entry.runtime_data.coordinator.service_client
    on_first: list[bytes] = []
    on_second: list[bytes] = []
    clients[ADDRESSES[0]].async_transcribe_updates.side_effect = transcribing(on_first, fail_after=2)
    clients[ADDRESSES[1]].async_transcribe_updates.side_effect = transcribing(on_second)
    entity = stt.async_get_speech_to_text_entity(hass, STT_ENTITY_ID)
    assert entity is not None
    audio = [bytes([index]) * 320 for index in range(5)]

    result = await entity.async_process_audio_stream(metadata(), _stream(audio))

    assert result == stt.SpeechResult("5 chunks", stt.SpeechResultState.SUCCESS)
    assert on_first == audio[:2]
    assert on_second == audio, "from the start, nothing lost"
    assert not service.async_transcribe_updates.called, "not through the host name, which may resolve to any replica"
    assert not clients[ADDRESSES[2]].async_transcribe_updates.called, "tried again once only"


async def test_transcriptions_take_turns_on_the_replicas_that_were_ready_at_the_last_poll(
    hass: HomeAssistant, clients: dict[str, AsyncMock], mock_config_entry: MockConfigEntry
) -> None:
    """Round robin over the ready replicas; one that was down at the last poll gets none, even if it is back."""
    await setup_integration(hass, mock_config_entry)
    coordinator = mock_config_entry.runtime_data.coordinator
    received: dict[str, list[bytes]] = {address: [] for address in ADDRESSES}
    for address, client in clients.items():
        client.async_transcribe_updates.side_effect = transcribing(received[address])
    down = clients[ADDRESSES[1]]
    down.async_get_status.side_effect = WhisperGpuConnectionError("refused")
    await poll(hass)
    down.async_get_status.side_effect = None  # back, but the last poll did not see it
    entity = stt.async_get_speech_to_text_entity(hass, STT_ENTITY_ID)
    assert entity is not None

    for _ in range(4):
        result = await entity.async_process_audio_stream(metadata(), _stream([b"\0" * 320]))
        assert result.result is stt.SpeechResultState.SUCCESS

    assert [len(received[address]) for address in ADDRESSES] == [2, 0, 2]
    assert not coordinator.service_client.async_transcribe_updates.called


async def test_transcriptions_go_through_the_host_name_while_no_replica_is_known_ready(
    hass: HomeAssistant, clients: dict[str, AsyncMock], mock_config_entry: MockConfigEntry
) -> None:
    """Every replica down at the last poll: the host name, as for a single server, and no second try."""
    await setup_integration(hass, mock_config_entry)
    coordinator = mock_config_entry.runtime_data.coordinator
    for client in clients.values():
        client.async_get_status.side_effect = WhisperGpuConnectionError("refused")
    await poll(hass)

    assert coordinator.transcription_clients() == [coordinator.service_client]


@pytest.mark.parametrize(
    ("code", "retried"),
    [("unsupported_language", False), ("audio_invalid", False), ("model_not_ready", True), ("server_busy", True)],
)
async def test_a_refused_transcription_is_sent_again_only_when_the_replica_cannot_serve(
    hass: HomeAssistant, clients: dict[str, AsyncMock], mock_config_entry: MockConfigEntry, code: str, retried: bool
) -> None:
    """An error event about the request itself ends it; one that says the replica cannot serve now goes to another."""
    await setup_integration(hass, mock_config_entry)
    error = WhisperGpuTranscriptionError("No.", code)
    clients[ADDRESSES[0]].async_transcribe_updates.side_effect = transcribing([], fail_after=1, error=error)
    clients[ADDRESSES[1]].async_transcribe_updates.side_effect = transcribing([])
    entity = stt.async_get_speech_to_text_entity(hass, STT_ENTITY_ID)
    assert entity is not None

    result = await entity.async_process_audio_stream(metadata(), _stream([b"\0" * 320] * 3))

    assert result.result is (stt.SpeechResultState.SUCCESS if retried else stt.SpeechResultState.ERROR)
    assert clients[ADDRESSES[1]].async_transcribe_updates.called is retried


async def _stream(chunks: list[bytes]) -> AsyncGenerator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_a_replica_whose_load_failed_says_so_and_its_issue_goes_at_unload(
    hass: HomeAssistant,
    clients: dict[str, AsyncMock],
    mock_config_entry: MockConfigEntry,
    issue_registry: ir.IssueRegistry,
) -> None:
    """A replica took the desired model but failed to load it (and went back): its issue gives the load's reason."""
    mock_config_entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(mock_config_entry, options={"desired_settings": {"model": "small"}})
    for client in clients.values():
        await client.async_update_settings({"model": "small"})
    # The third takes the change but its load fails: it goes back to its model and reports the failure.
    failed = clients[ADDRESSES[2]]
    settings = api_fixtures.load("settings")["settings"]
    failed.async_get_settings.side_effect = lambda: dict(settings)
    failed.async_update_settings.side_effect = lambda _changes: dict(settings)
    failure = {"code": "insufficient_memory", "message": "Too big", "model": "small", "time": "T"}
    status = ServerStatus.from_json({**api_fixtures.load("status"), "last_failure": failure})
    failed.async_get_status.return_value = status

    await setup_integration(hass, mock_config_entry)

    issue = issue_registry.async_get_issue(DOMAIN, f"replica_{mock_config_entry.entry_id}_{ADDRESSES[2]}")
    assert issue is not None
    assert issue.translation_placeholders["error"] == "small: insufficient_memory, Too big"
    assert await hass.config_entries.async_unload(mock_config_entry.entry_id)
    assert not [issue for issue in issue_registry.issues.values() if issue.domain == DOMAIN]
