"""Fixtures of the Home Assistant integration tests, in two layers.

The fast layer patches the integration's client (autospec) to answer with the
JSON a real server answered (fixtures/, captured by scripts/capture-fixtures and
checked against the server by test_fixtures.py): it runs in seconds.

The end-to-end layer runs Home Assistant against a real whisper-gpu server on
loopback, started once per session with the fast tiny.en model. Tests that stop,
restart or break a server start their own.

Both use the one config entry, `mock_config_entry`: a test that asks for the real
`server` gets an entry that points at it.
"""

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, patch

import pytest
import pytest_socket
from helpers import api_fixtures
from helpers.speech import Utterance, require_tools, synthesize
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.syrupy import HomeAssistantSnapshotExtension
from syrupy.assertion import SnapshotAssertion
from wyoming.event import Event
from wyoming.info import Info

from custom_components.whisper_gpu.api import ServerInfo, ServerStatus, TranscriptUpdate
from custom_components.whisper_gpu.const import DOMAIN

from .common import (
    FIXTURE_ENTRY_DATA,
    HOST,
    UTTERANCE,
    StubControlServer,
    StubWyomingServer,
    WhisperGpuServer,
    free_port,
    transcript_updates,
)


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None) -> None:
    """Let Home Assistant load custom_components/whisper_gpu."""


# Fixtures that start or share a real server: the tests that use one are the end-to-end layer.
REAL_SERVER_FIXTURES = {"server", "session_server", "own_server", "replicas", "module_replicas"}


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of the end-to-end layer: `-m "not e2e"` runs the fast layer alone."""
    config.addinivalue_line("markers", "e2e: runs Home Assistant against a real whisper-gpu server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that need a real server."""
    for item in items:
        if REAL_SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def snapshot(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    """Snapshots as Home Assistant core writes them (ids and times left out), in snapshots/."""
    return snapshot.use_extension(HomeAssistantSnapshotExtension)


@pytest.fixture(autouse=True)
def loopback_sockets(socket_enabled: None) -> None:
    """Allow sockets: the tests talk to servers on 127.0.0.1 (and nothing else)."""


@contextlib.contextmanager
def _sockets_allowed() -> Iterator[None]:
    """Allow sockets in session fixtures, which run before socket_enabled."""
    pytest_socket.enable_socket()
    try:
        yield
    finally:
        pytest_socket.socket_allow_hosts([HOST])
        pytest_socket.disable_socket(allow_unix_socket=True)


@pytest.fixture(scope="session")
def session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WhisperGpuServer]:
    """Start one real server for the whole session."""
    with _sockets_allowed():
        server = WhisperGpuServer(tmp_path_factory.mktemp("whisper-gpu"))
        server.start()
        server.initial_settings = server.settings()
    yield server
    server.stop()


@pytest.fixture
def server(session_server: WhisperGpuServer) -> Iterator[WhisperGpuServer]:
    """The session's server; what a test changed on it is put back afterwards."""
    yield session_server
    session_server.wait_state("ready")
    initial = session_server.initial_settings
    changed = {name: value for name, value in initial.items() if session_server.settings().get(name) != value}
    if changed:
        status, body = session_server.request("PATCH", "/api/v1/settings", changed)
        assert status == 200, body
        session_server.wait_state("ready")


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[WhisperGpuServer]:
    """A server of the test's own, with a fresh data directory; not started yet."""
    server = WhisperGpuServer(tmp_path / "server")
    yield server
    server.stop()


@pytest.fixture
def mock_config_entry(request: pytest.FixtureRequest) -> MockConfigEntry:
    """The config entry of a test (not added to hass yet).

    It points at the session's real server when the test uses `server`, else at the
    fixtures' server, which `mock_client` answers for. Indirect parameters
    (a dict) change the entry's other fields, e.g. its source.
    """
    fields: dict[str, Any] = getattr(request, "param", {})
    if "server" in request.fixturenames:
        server: WhisperGpuServer = request.getfixturevalue("server")
        unique_id, data = server.server_id, server.entry_data()
    else:
        unique_id, data = api_fixtures.SERVER_ID, FIXTURE_ENTRY_DATA
    return MockConfigEntry(**{"domain": DOMAIN, "title": "whisper-gpu", "unique_id": unique_id, "data": data, **fields})


@pytest.fixture
def mock_client() -> Iterator[AsyncMock]:
    """The integration's client, patched with autospec, answering what a real server answered (fixtures/).

    The fixtures' host name is its one replica (it is never resolved).
    """
    with (
        patch("custom_components.whisper_gpu.data.WhisperGpuClient", autospec=True) as client_class,
        patch("custom_components.whisper_gpu.replicas.async_resolve", side_effect=_unresolved),
    ):
        client = client_class.return_value
        client.async_get_info.return_value = ServerInfo.from_json(api_fixtures.load("info"))
        client.async_get_status.return_value = ServerStatus.from_json(api_fixtures.load("status"))
        settings = api_fixtures.load("settings")["settings"]
        client.async_get_settings.return_value = settings
        client.async_check_auth.return_value = None
        client.async_probe_tls.return_value = None  # a port that is closed speaks nothing
        client.async_update_settings.return_value = settings
        client.async_describe.return_value = Info.from_event(Event("info", api_fixtures.load("describe"))).asr[0]
        client.async_transcribe_updates.side_effect = transcript_updates(TranscriptUpdate(UTTERANCE, final=True))
        yield client


async def _unresolved(_hass: object, host: str, _port: int) -> list[str]:
    """The host itself, as its one address."""
    return [host]


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


@pytest.fixture(scope="session")
def speech_pcm(speech_dir: Path) -> bytes:
    """16 kHz 16-bit mono PCM of UTTERANCE, spoken by espeak-ng."""
    try:
        require_tools()
    except RuntimeError as err:
        pytest.skip(str(err))
    pcm, rate, width, channels = Utterance(UTTERANCE, synthesize(UTTERANCE, speech_dir), clear=True).pcm()
    assert (rate, width, channels) == (16000, 2, 1)
    return pcm


@pytest.fixture
async def stub_server() -> AsyncIterator[StubControlServer]:
    """A stub HTTP server; answers 404 to everything until routes are set."""
    stub = StubControlServer()
    await stub.start()
    yield stub
    await stub.stop()


@pytest.fixture
async def stub_wyoming() -> AsyncIterator[StubWyomingServer]:
    """A stub Wyoming server that records the events it gets."""
    stub = StubWyomingServer()
    await stub.start()
    yield stub
    await stub.stop()
