"""The control API keeps the event loop free: slow device and disk reads run in a worker thread.

These tests run the real control app and the real Service in this process (no model is loaded: `GET /api/v1/info`
needs none). The one stand-in is the device read itself, which on a GPU host is an NVML call and on a slow disk a
directory walk: it is replaced by one that blocks until the test lets it go, which no real device here can do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from whisper_gpu import hardware
from whisper_gpu.boot_settings import resolve_settings
from whisper_gpu.control import create_app
from whisper_gpu.service import Service

GATE_TIMEOUT = 10.0
TOKEN = "event-loop-test-token"  # noqa: S105 - a test credential


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    """A service on tiny.en (offline, int8); the model is not loaded until a test starts it."""
    flags = {"model": "tiny.en", "offline": True, "compute_type": "int8", "control_token": TOKEN}
    service = Service(resolve_settings(flags, {"DATA_DIR": str(tmp_path)}))
    yield service
    await service.close()


@pytest.fixture
async def client(service: Service) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(service, lambda: False))) as test_client:
        yield test_client


class BlockedRead:
    """A device read that waits until the test releases it, and records whether it was released in time."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self.read = read
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released_in_time: bool | None = None

    def __call__(self) -> Any:
        self.entered.set()
        self.released_in_time = self.release.wait(GATE_TIMEOUT)
        return self.read()


async def test_a_slow_device_read_does_not_stall_other_requests(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While /api/v1/info waits on the device, /healthz still answers (before the fix it waited behind it)."""
    blocked = BlockedRead(hardware.cpu_name)
    monkeypatch.setattr(hardware, "cpu_name", blocked)

    info = asyncio.create_task(client.get("/api/v1/info"))
    assert await asyncio.to_thread(blocked.entered.wait, GATE_TIMEOUT)
    async with asyncio.timeout(GATE_TIMEOUT / 2):
        health = await client.get("/healthz")
    assert health.status == 200
    blocked.release.set()

    response = await info
    assert response.status == 200
    assert (await response.json())["device"]["type"] == "cpu"
    assert blocked.released_in_time is True, "the loop was blocked until the device read gave up"


async def test_the_memory_check_of_a_switch_does_not_stall_other_requests(
    service: Service, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PATCH that switches models reads the device's free memory (NVML on a GPU) off the loop."""
    assert await (await service.start())
    blocked = BlockedRead(hardware.cpu_memory)
    monkeypatch.setattr(hardware, "cpu_memory", blocked)

    switch = asyncio.create_task(
        client.patch("/api/v1/settings", json={"model": "base"}, headers={"Authorization": f"Bearer {TOKEN}"})
    )
    assert await asyncio.to_thread(blocked.entered.wait, GATE_TIMEOUT)
    async with asyncio.timeout(GATE_TIMEOUT / 2):
        health = await client.get("/healthz")
    assert health.status == 200
    blocked.release.set()

    response = await switch
    assert response.status == 200, await response.text()
    assert (await response.json())["reload"] is True
    assert blocked.released_in_time is True, "the loop was blocked until the memory read gave up"
