"""The JSON fixtures of the integration's fast tests: what a real server answers, captured by scripts/capture-fixtures.

A capture replaces what differs from one machine or run to the next (the server's id, its ports, the host's CPU
and memory, timings) with fixed values, so that the files stay the same until the server's answers change. The
drift test (tests/integration/test_fixtures.py) captures the running server again and compares.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info

from .server import ServerProcess

FIXTURE_DIR = Path(__file__).parents[1] / "integration" / "fixtures"
# GET paths of the control API, by fixture name.
ENDPOINTS = {"info": "/api/v1/info", "status": "/api/v1/status", "settings": "/api/v1/settings"}
SERVER_ID = "0123456789abcdef0123456789abcdef"
WYOMING_PORT = 10300
CONTROL_PORT = 10301
# The host the capture ran on, as a fixed machine: 8 cores, 16 GiB.
DEVICE = {"type": "cpu", "name": "Test CPU", "cores": 8, "memory_total_mb": 16384, "memory_free_mb": 12288}
# The server's arguments for a capture, beside ServerProcess's defaults (loopback, offline, no zeroconf, tiny.en).
# Two CPU threads whatever the host has: the weights are loaded twice with two workers, which memory_mb counts.
SERVER_ARGS = ["--compute-type", "int8", "--cpu-threads", "2"]


def normalize(name: str, body: Any) -> Any:
    """Replace what differs between machines and runs in one answer with fixed values."""
    body = json.loads(json.dumps(body))
    if name == "info":
        body.update(server_id=SERVER_ID, wyoming_port=WYOMING_PORT, control_port=CONTROL_PORT, device=DEVICE)
        for model in body["models"]:
            # Whether a model fits and is at hand depends on the host's memory and installed packages.
            model.update(usable=model["name"] in {"tiny.en", "base"} or model["usable"], cached=False)
    if name == "status" and body.get("model"):
        body["model"]["load_seconds"] = 1.0
    if name == "describe":
        for program in body.get("asr", []):
            program["version"] = "0.0.0"
    return body


def masked(value: Any) -> Any:
    """The shape of an answer: its keys and the types of its values, for what a capture cannot fix."""
    if isinstance(value, dict):
        return {key: masked(item) for key, item in value.items()}
    if isinstance(value, list):
        items = [masked(item) for item in value]
        # Lists of plain values (languages, compute types) differ in length between hosts; their form does not.
        return sorted({str(item) for item in items}) if all(isinstance(item, str) for item in items) else items
    return type(value).__name__


async def describe(port: int) -> dict[str, Any]:
    """The Wyoming port's answer to describe, as a dict."""
    async with asyncio.timeout(10), AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        while (event := await client.read_event()) is not None:
            if Info.is_type(event.type):
                return Info.from_event(event).to_dict()
    msg = "the server closed the connection before its info"
    raise RuntimeError(msg)


async def capture(server: ServerProcess) -> dict[str, Any]:
    """What the running server answers, normalized, by fixture name."""
    answers: dict[str, Any] = {}
    for name, path in ENDPOINTS.items():
        status, body = server.get(path)
        if status != 200:
            msg = f"GET {path} answered {status}: {body}"
            raise RuntimeError(msg)
        answers[name] = body
    answers["describe"] = await describe(server.wyoming_port)
    return {name: normalize(name, body) for name, body in answers.items()}


def load(name: str) -> Any:
    """One stored fixture."""
    return json.loads((FIXTURE_DIR / f"{name}.json").read_text(encoding="utf-8"))


def write(answers: dict[str, Any]) -> list[Path]:
    """Store the fixtures; return their paths."""
    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, body in answers.items():
        path = FIXTURE_DIR / f"{name}.json"
        path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
