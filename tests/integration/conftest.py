"""Fixtures of the Home Assistant integration tests.

The tests run Home Assistant (pytest-homeassistant-custom-component) against a
real whisper-gpu server on loopback, started once per session with the fast
tiny.en model. Tests that stop, restart or break a server start their own.
"""

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_socket
from helpers.speech import Utterance, require_tools, synthesize
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.whisper_gpu.const import DOMAIN

from .common import HOST, UTTERANCE, StubControlServer, StubWyomingServer, WhisperGpuServer, free_port


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None) -> None:
    """Let Home Assistant load custom_components/whisper_gpu."""


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
def config_entry(server: WhisperGpuServer) -> MockConfigEntry:
    """A config entry for the session's server (not added to hass yet)."""
    return MockConfigEntry(
        domain=DOMAIN,
        title="whisper-gpu",
        unique_id=server.server_id,
        data=server.entry_data(),
    )


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
