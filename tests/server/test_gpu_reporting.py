"""GPU memory and utilisation reporting.

This machine has no NVIDIA GPU, so NVML (the `pynvml` module) is replaced by a fake that answers like a
driver would; everything above it (the collector, the exposition, the device description) is the real code.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from whisper_gpu.engine import Device
from whisper_gpu.hardware import describe_device
from whisper_gpu.metrics import Metrics

GIB = 1024**3


@dataclass
class _Memory:
    total: int
    used: int
    free: int


@dataclass
class _Rates:
    gpu: int
    memory: int


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def handle(index: int) -> int:
        if index != 0:
            raise NVMLError("Invalid Argument")
        return index

    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda _handle: "NVIDIA H100 80GB HBM3"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda _handle: _Memory(80 * GIB, 2 * GIB, 78 * GIB)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda _handle: _Rates(gpu=37, memory=5)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


def test_gpu_metrics_have_samples_on_a_gpu(fake_nvml: types.ModuleType) -> None:
    text = generate_latest(Metrics(device=lambda: Device("cuda", 0)).registry).decode()
    samples = {
        (sample.name, sample.labels.get("gpu")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("whisper_gpu_gpu_memory_used_bytes", "0")] == 2 * GIB
    assert samples[("whisper_gpu_gpu_memory_total_bytes", "0")] == 80 * GIB
    assert samples[("whisper_gpu_gpu_utilization_ratio", "0")] == pytest.approx(0.37)


def test_gpu_metrics_are_declared_without_samples_on_a_cpu(fake_nvml: types.ModuleType) -> None:
    text = generate_latest(Metrics(device=lambda: Device("cpu")).registry).decode()
    assert "# TYPE whisper_gpu_gpu_memory_used_bytes gauge" in text
    assert "whisper_gpu_gpu_memory_used_bytes{" not in text


def test_a_failing_driver_read_costs_the_samples_not_the_scrape(fake_nvml: types.ModuleType) -> None:
    text = generate_latest(Metrics(device=lambda: Device("cuda", 1)).registry).decode()
    assert "# TYPE whisper_gpu_gpu_utilization_ratio gauge" in text
    assert "whisper_gpu_gpu_utilization_ratio{" not in text
    assert "whisper_gpu_build_info" in text


def test_info_names_the_gpu_and_its_memory(fake_nvml: types.ModuleType) -> None:
    assert describe_device(Device("cuda", 0)) == {
        "type": "cuda",
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_mb": 80 * 1024,
        "memory_free_mb": 78 * 1024,
    }
