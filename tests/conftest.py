"""Fixtures shared by every suite: generated speech and real server processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.server import ServerProcess
from helpers.speech import Utterance, command_set, synthesize


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where generated WAVs are kept for the session."""
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def commands(speech_dir: Path) -> list[Utterance]:
    """Home Assistant commands spoken by espeak-ng, 16 kHz mono."""
    return command_set(speech_dir)


@pytest.fixture(scope="session")
def kitchen(speech_dir: Path) -> Utterance:
    """The clearest command."""
    text = "turn on the kitchen light"
    return Utterance(text, synthesize(text, speech_dir), clear=True)


@pytest.fixture(scope="session")
def whisper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server on tiny.en (int8), shared by the tests that do not change its settings."""
    server = ServerProcess(tmp_path_factory.mktemp("shared") / "data", model="tiny.en", args=["--compute-type", "int8"])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start dedicated servers (fresh data directory unless given); all are stopped afterwards."""
    started: list[ServerProcess] = []

    def start(*, wait: bool = True, data_dir: Path | None = None, **options: Any) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path / f"data{len(started)}", **options)
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        server.stop()
