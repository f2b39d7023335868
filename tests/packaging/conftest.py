"""Fixtures for the packaging checks: the add-on config and the server's settings schema."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import pytest
from packaging_support import ADDON, load_yaml


@pytest.fixture(scope="session")
def addon_config() -> dict[str, Any]:
    return load_yaml(ADDON / "config.yaml")


@pytest.fixture(scope="session")
def settings_module() -> ModuleType:
    """The server's settings schema: `SETTINGS` maps lower-snake names to specs."""
    return importlib.import_module("whisper_gpu.settings")


@pytest.fixture(scope="session")
def server_settings(settings_module: ModuleType) -> dict[str, Any]:
    return dict(settings_module.SETTINGS)
