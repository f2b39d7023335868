"""Several replicas behind one name, as a headless Kubernetes Service gives them: three real servers.

The servers listen on 127.0.0.2, 127.0.0.3 and 127.0.0.4 with the same ports and token, and the integration's
resolver is pointed at them. The first runs tiny.en and may not set its model to a directory; the others run base
(it speaks more languages) and may: so a change can be one that only some of them take. The entry's host is the
first; speech-to-text goes to the replicas that were ready at the last poll, in turn. The servers are shared by the
tests of this module; each test leaves them running with their first settings.
"""

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import pytest_socket
from homeassistant.components import stt
from homeassistant.components.assist_pipeline import (
    PipelineEventType,
    PipelineStage,
)
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.whisper_gpu.const import DOMAIN

from .common import (
    HOST,
    SECOND_MODEL,
    TEST_MODEL,
    UTTERANCE,
    WhisperGpuServer,
    audio_stream,
    free_port,
    metadata,
    poll,
    run_assist_pipeline,
    setup_integration,
    words,
)
from .test_options_flow import form_input

ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
READY_ENTITY_ID = "sensor.whisper_gpu_ready_replicas"
MODEL_ENTITY_ID = "sensor.whisper_gpu_loaded_model"
STT_ENTITY_ID = "stt.whisper_gpu_speech_to_text"


@contextlib.contextmanager
def _replica_sockets() -> Iterator[None]:
    """Allow connections to the replicas' addresses (the plugin allows 127.0.0.1 only)."""
    pytest_socket.enable_socket()
    pytest_socket.socket_allow_hosts([HOST, *ADDRESSES])
    try:
        yield
    finally:
        pytest_socket.socket_allow_hosts([HOST])
        pytest_socket.disable_socket(allow_unix_socket=True)


@pytest.fixture(autouse=True)
def replica_sockets(socket_enabled: None) -> None:
    """Let each test reach the replicas."""
    pytest_socket.socket_allow_hosts([HOST, *ADDRESSES])


class Replicas(list[WhisperGpuServer]):
    """The three servers, and what the integration's resolver answers for the entry's host."""

    order: list[str]
    initial: list[dict[str, Any]]

    def resolved(self) -> list[str]:
        """The addresses the resolver gives, in its order."""
        return list(self.order)


@pytest.fixture(scope="module")
def module_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Start the three servers once for the module."""
    token = uuid.uuid4().hex
    replicas = Replicas()
    with _replica_sockets():
        wyoming_port, control_port = free_port(), free_port()
        for index, address in enumerate(ADDRESSES):
            server = WhisperGpuServer(
                tmp_path_factory.mktemp(f"replica{index}"),
                model=TEST_MODEL if index == 0 else SECOND_MODEL,
                token=token,
                wyoming_port=wyoming_port,
                control_port=control_port,
                address=address,
            )
            server.start(*(() if index == 0 else ("--allow-model-paths",)), wait=False)
            replicas.append(server)
        for server in replicas:
            server.wait_ready()
            server.initial_settings = server.settings()
    replicas.order = list(ADDRESSES)
    yield replicas
    for server in replicas:
        server.stop()


@pytest.fixture
def replicas(module_replicas: Replicas) -> Iterator[Replicas]:
    """The module's servers, resolved in address order; afterwards each runs again with its first settings."""
    module_replicas.order = list(ADDRESSES)

    async def resolve(_hass: object, _host: str, _port: int) -> list[str]:
        return module_replicas.resolved()

    with patch("custom_components.whisper_gpu.replicas.async_resolve", side_effect=resolve):
        yield module_replicas
    for index, server in enumerate(module_replicas):
        if server.process is None or server.process.poll() is not None:
            server.stop()
            server.start(*(() if index == 0 else ("--allow-model-paths",)))
        server.wait_state("ready")
        changed = {
            name: value for name, value in server.initial_settings.items() if server.settings().get(name) != value
        }
        if changed:
            status, body = server.request("PATCH", "/api/v1/settings", changed)
            assert status == 200, body
            server.wait_state("ready")


@pytest.fixture
def entry(replicas: Replicas) -> MockConfigEntry:
    """An entry whose host name stands for the three (its own address is the first's)."""
    first = replicas[0]
    return MockConfigEntry(domain=DOMAIN, title="whisper-gpu", unique_id=first.server_id, data=first.entry_data())


def replica_issue(issue_registry: ir.IssueRegistry, entry: MockConfigEntry, address: str) -> ir.IssueEntry | None:
    """The repair issue of one replica, if any."""
    return issue_registry.async_get_issue(DOMAIN, f"replica_{entry.entry_id}_{address}")


async def change_options(hass: HomeAssistant, entry: MockConfigEntry, **changes: Any) -> dict[str, Any]:
    """Change settings in the options form as a user does; return the flow's result."""
    coordinator = entry.runtime_data.coordinator
    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], form_input(dict(coordinator.data.settings), **changes)
    )
    return dict(result)


async def test_a_change_reaches_every_replica(
    hass: HomeAssistant, replicas: Replicas, entry: MockConfigEntry, issue_registry: ir.IssueRegistry
) -> None:
    """Three replicas: 3/3 ready, their models listed; a change in the options reaches all three and is kept."""
    await setup_integration(hass, entry)
    ready = hass.states.get(READY_ENTITY_ID)
    assert (ready.state, ready.attributes["replicas"]) == ("3", 3)
    assert hass.states.get(MODEL_ENTITY_ID).state == f"{TEST_MODEL}, {SECOND_MODEL}", "the replicas differ"
    assert hass.states.get("sensor.whisper_gpu_model_state").state == "ready"

    result = await change_options(hass, entry, beam_size=3)

    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert [server.settings()["beam_size"] for server in replicas] == [3, 3, 3]
    assert entry.options["desired_settings"] == {"beam_size": 3}
    await poll(hass)
    assert all(replica.in_step for replica in entry.runtime_data.coordinator.data.replicas)
    assert not [issue for issue in issue_registry.issues.values() if issue.domain == DOMAIN]


async def test_replicas_that_were_away_or_restarted_are_brought_back(
    hass: HomeAssistant, replicas: Replicas, entry: MockConfigEntry, issue_registry: ir.IssueRegistry
) -> None:
    """One down during a change: 2/3 and a repair issue, then the change once it is back; one restarted with
    another value is set back at the next poll.
    """
    await setup_integration(hass, entry)
    third = replicas[2]
    third.stop()
    await poll(hass)
    ready = hass.states.get(READY_ENTITY_ID)
    assert (ready.state, ready.attributes["replicas"]) == ("2", 3)
    assert replica_issue(issue_registry, entry, third.address) is not None

    result = await change_options(hass, entry, beam_size=2)
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert [server.settings()["beam_size"] for server in replicas[:2]] == [2, 2]

    third.start()
    assert third.settings()["beam_size"] != 2, "it kept what it had"
    await poll(hass)
    assert third.settings()["beam_size"] == 2
    assert replica_issue(issue_registry, entry, third.address) is None
    assert hass.states.get(READY_ENTITY_ID).state == "3"

    second = replicas[1]
    second.stop()
    second.start("--allow-model-paths", "--beam-size", "4")
    assert second.settings()["beam_size"] == 4
    await poll(hass)
    await poll(hass)
    assert second.settings()["beam_size"] == 2
    assert all(replica.in_step for replica in entry.runtime_data.coordinator.data.replicas)
    assert not [issue for issue in issue_registry.issues.values() if issue.domain == DOMAIN]


async def test_a_change_the_first_replica_refuses_reaches_no_other(
    hass: HomeAssistant, replicas: Replicas, entry: MockConfigEntry
) -> None:
    """The first replica may not load a model directory: the form says so; the others, which may, are not sent it."""
    await setup_integration(hass, entry)

    result = await change_options(hass, entry, model=str(Path("/models/whisper-custom")))

    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"model_settings": "path_not_allowed"}
    assert [server.settings()["model"] for server in replicas] == [TEST_MODEL, SECOND_MODEL, SECOND_MODEL]
    assert "desired_settings" not in entry.options


async def test_a_replica_that_refuses_a_change_raises_a_repair_issue(
    hass: HomeAssistant, replicas: Replicas, entry: MockConfigEntry, issue_registry: ir.IssueRegistry
) -> None:
    """German on base takes; tiny.en (resolved last) refuses it: the others have it, the issue names tiny.en's
    replica, and is gone once the language is one that every replica speaks.
    """
    replicas.order = [ADDRESSES[1], ADDRESSES[2], ADDRESSES[0]]
    await setup_integration(hass, entry)
    english_only = replicas[0]

    result = await change_options(hass, entry, language="de")

    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert [server.settings()["language"] for server in replicas] == ["en", "de", "de"]
    await poll(hass)
    issue = replica_issue(issue_registry, entry, english_only.address)
    assert issue is not None
    assert issue.translation_key == "replica_out_of_step"
    assert "not_supported_by_model" in issue.translation_placeholders["error"]
    diagnostics = {replica.address: replica for replica in entry.runtime_data.coordinator.data.replicas}
    assert not diagnostics[english_only.address].in_step
    assert diagnostics[ADDRESSES[1]].in_step

    result = await change_options(hass, entry, language="en")
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await poll(hass)
    assert [server.settings()["language"] for server in replicas] == ["en", "en", "en"]
    assert replica_issue(issue_registry, entry, english_only.address) is None


async def test_an_assist_pipeline_goes_on_when_a_replica_dies_mid_request(
    hass: HomeAssistant,
    replicas: Replicas,
    entry: MockConfigEntry,
    speech_pcm: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An Assist pipeline runs a command while the replica whose turn it is (the first) is killed mid-stream: the
    request is made again on the next ready replica with all the audio, and the pipeline ends with the text.
    """
    first = replicas[0]
    assert first.process is not None

    async def stream() -> AsyncGenerator[bytes]:
        async for index, chunk in _numbered(audio_stream(speech_pcm)):
            if index == 4:
                first.stop(signal.SIGKILL)
                await asyncio.sleep(0.2)
            yield chunk
            await asyncio.sleep(0.005)

    _, by_type = await run_assist_pipeline(hass, entry, STT_ENTITY_ID, stream(), PipelineStage.STT)

    stt_end = by_type[PipelineEventType.STT_END]
    assert stt_end.data is not None
    assert words(stt_end.data["stt_output"]["text"]) == UTTERANCE, "retried on another replica"
    assert f"trying again on {ADDRESSES[1]}" in caplog.text, "on the second replica"
    status, body = replicas[1].request("GET", "/api/v1/status")
    assert status == 200
    assert body["last_request"]["outcome"] == "ok"


async def test_transcriptions_take_turns_on_the_replicas_that_were_ready_at_the_last_poll(
    hass: HomeAssistant, replicas: Replicas, speech_pcm: bytes
) -> None:
    """Four commands through the entity: the two replicas that were ready at the last poll get two each, in turn;
    the third, down at that poll and back since, gets none (the host name alone could have reached any of them).
    """
    first, third = replicas[0], replicas[2]
    # Polled by hand only, so that no poll sees the third come back before the commands.
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="whisper-gpu",
        unique_id=first.server_id,
        data=first.entry_data(),
        pref_disable_polling=True,
    )
    await setup_integration(hass, entry)
    third.stop()
    await entry.runtime_data.coordinator.async_refresh()
    assert hass.states.get(READY_ENTITY_ID).state == "2"
    third.start("--allow-model-paths")
    before = [requests_total(server) for server in replicas]
    entity = stt.async_get_speech_to_text_entity(hass, STT_ENTITY_ID)
    assert entity is not None

    for _ in range(4):
        result = await entity.async_process_audio_stream(metadata(), audio_stream(speech_pcm))
        assert result.result is stt.SpeechResultState.SUCCESS
        assert words(result.text) == UTTERANCE

    served = [requests_total(server) - count for server, count in zip(replicas, before, strict=True)]
    assert served == [2, 2, 0]


def requests_total(server: WhisperGpuServer) -> int:
    """How many transcription requests the server has had since it started."""
    status, body = server.request("GET", "/api/v1/status")
    assert status == 200, body
    return int(body["requests"]["total"])


async def _numbered(chunks: AsyncGenerator[bytes]) -> AsyncGenerator[tuple[int, bytes]]:
    index = 0
    async for chunk in chunks:
        yield index, chunk
        index += 1
