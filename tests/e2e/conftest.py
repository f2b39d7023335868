"""Fixtures of the end-to-end tests: our server (real model) and a real `hass` with our integration added.

Both start once per session, on loopback ports, in parallel; each step prints how long it took. The tests run in
the environment of scripts/ha-e2e-env (`scripts/ha-e2e-run python -m pytest tests/e2e`, part of scripts/test).
Elsewhere (no Home Assistant installed) they are skipped with a message that says how to run them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import E2EServer, HomeAssistant, step

E2E_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Without Home Assistant installed (not the e2e environment), skip these tests and say how to run them."""
    if importlib.util.find_spec("homeassistant") is not None:
        return
    skip = pytest.mark.skip(
        reason="the end-to-end tests run a real Home Assistant: scripts/ha-e2e-run python -m pytest tests/e2e"
    )
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def e2e_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EServer]:
    """Our server on tiny.en (int8), started (not yet waited for: home_assistant waits, while hass starts too)."""
    server = E2EServer(tmp_path_factory.mktemp("e2e") / "server", model="tiny.en", args=["--compute-type", "int8"])
    with step("start whisper-gpu"):
        server.start(wait=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def home_assistant(tmp_path_factory: pytest.TempPathFactory, e2e_server: E2EServer) -> Iterator[HomeAssistant]:
    """A real Home Assistant, onboarded (owner user and tokens), with our integration added for e2e_server.

    `home_assistant.entry_ids["whisper_gpu"]` is the config entry; owner login: harness.OWNER_USERNAME/PASSWORD.
    """
    hass = HomeAssistant(tmp_path_factory.mktemp("e2e") / "home-assistant")
    with step("start hass"):
        hass.start()
    try:
        with step("wait for hass's HTTP API"):
            hass.wait_ready()
        with step("onboarding"):
            hass.onboard()
        with step("wait for whisper-gpu to serve"):
            e2e_server.wait_ready()
        with step("add whisper_gpu through the config flow"):
            hass.entry_ids["whisper_gpu"] = hass.add_whisper_gpu(e2e_server)
        yield hass
    except BaseException:
        print(f"hass log ({hass.log_path}):\n{hass.log()[-8000:]}")
        raise
    finally:
        with step("stop hass"):
            hass.stop()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave files for people to look at (screenshots, logs): tests/e2e/artifacts, git-ignored."""
    path = Path(__file__).parent / "artifacts"
    path.mkdir(exist_ok=True)
    return path
