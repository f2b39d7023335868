"""Prometheus metrics, all named `whisper_gpu_*`; the README lists them and the Grafana dashboard uses them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__

if TYPE_CHECKING:
    from .engine import Device

_LOGGER = logging.getLogger(__name__)
# `*_created` series only add noise to dashboards; this is the client library's documented switch.
disable_created_metrics()  # type: ignore[no-untyped-call]

PARK_TRIGGERS = ("idle", "control")
RESTORE_TRIGGERS = ("request", "control")
OUTCOMES = ("ok", "no_speech", "truncated", "invalid", "error", "disconnected", "not_ready", "busy")


class GpuCollector(Collector):
    """GPU memory and utilisation read through NVML at scrape time; families without samples on a CPU."""

    def __init__(self, device: Callable[[], Device | None]) -> None:
        self._device = device
        self._nvml_ready: bool | None = None

    def collect(self) -> Iterator[Metric]:
        """Yield the GPU families (empty when the model runs on a CPU or NVML is missing)."""
        used = GaugeMetricFamily("whisper_gpu_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("whisper_gpu_gpu_memory_total_bytes", "GPU memory in all", labels=["gpu"])
        utilization = GaugeMetricFamily(
            "whisper_gpu_gpu_utilization_ratio", "Share of time the GPU was busy (0-1)", labels=["gpu"]
        )
        device = self._device()
        if device is not None and device.kind == "cuda" and self._nvml():
            import pynvml  # noqa: PLC0415 - only on GPU machines

            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device.index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            except pynvml.NVMLError as err:
                _LOGGER.debug("NVML read failed: %s", err)
            else:
                label = [str(device.index)]
                used.add_metric(label, float(memory.used))
                total.add_metric(label, float(memory.total))
                utilization.add_metric(label, rates.gpu / 100.0)
        yield used
        yield total
        yield utilization

    def _nvml(self) -> bool:
        if self._nvml_ready is None:
            try:
                import pynvml  # noqa: PLC0415

                pynvml.nvmlInit()
                self._nvml_ready = True
            except Exception as err:  # noqa: BLE001 - NVML is optional: no driver, no library
                _LOGGER.info("GPU metrics unavailable: %s", err)
                self._nvml_ready = False
        return self._nvml_ready


class Metrics:
    """The server's metrics in a registry of its own (no process-global state, so tests stay independent)."""

    def __init__(self, device: Callable[[], Device | None]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        Info("whisper_gpu_build", "whisper-gpu version", registry=registry).info({"version": __version__})
        self.requests = Counter(
            "whisper_gpu_requests", "Transcription requests by outcome", ["outcome"], registry=registry
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.request_duration = Histogram(
            "whisper_gpu_request_duration_seconds",
            "Time from the end of the audio to the transcript",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
            registry=registry,
        )
        self.audio_seconds = Counter("whisper_gpu_audio_seconds", "Seconds of audio transcribed", registry=registry)
        self.real_time_factor = Histogram(
            "whisper_gpu_real_time_factor",
            "Processing time divided by audio duration",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0),
            registry=registry,
        )
        self.in_flight = Gauge("whisper_gpu_requests_in_flight", "Requests being transcribed", registry=registry)
        self.queued = Gauge("whisper_gpu_requests_queued", "Requests waiting for the model", registry=registry)
        self.busy = Counter(
            "whisper_gpu_busy_rejections", "Requests refused with server_busy: the queue was full", registry=registry
        )
        self.batch_size = Histogram(
            "whisper_gpu_batch_size",
            "Requests transcribed together in one batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "whisper_gpu_stage_seconds",
            "Where a request's time went: queue, vad, features, encoder, decoder, fallback (redo in a wider window)",
            ["stage"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0),
            registry=registry,
        )
        self.window_fallbacks = Counter(
            "whisper_gpu_window_fallbacks",
            "Pieces decoded again in a wider window because the fitted window's decode looped or was unsure",
            registry=registry,
        )
        self.connections = Gauge("whisper_gpu_connections", "Open Wyoming connections", registry=registry)
        self.connections_refused = Counter(
            "whisper_gpu_connections_refused",
            "Wyoming connections refused with server_busy at MAX_CONNECTIONS",
            registry=registry,
        )
        self.protocol_errors = Counter(
            "whisper_gpu_protocol_errors", "Bad input from Wyoming clients by error code", ["code"], registry=registry
        )
        self.model_load_duration = Gauge(
            "whisper_gpu_model_load_duration_seconds",
            "How long the last model load (with download and warm-up) took",
            registry=registry,
        )
        self.model_loads = Counter("whisper_gpu_model_loads", "Model loads by outcome", ["outcome"], registry=registry)
        for outcome in ("ok", "failed"):
            self.model_loads.labels(outcome)
        self.model_info = Info("whisper_gpu_model", "The model that serves requests", registry=registry)
        self.model_ready = Gauge("whisper_gpu_model_ready", "1 when a model is loaded and warm", registry=registry)
        self.model_resident = Gauge(
            "whisper_gpu_model_resident",
            "1 when the model's weights are on the device, 0 while it is parked (KEEP_ALIVE_S, the park action)",
            registry=registry,
        )
        self.model_parks = Counter(
            "whisper_gpu_model_parks",
            "Times the model was parked: after keep_alive_s idle (idle) or by the control API (control)",
            ["trigger"],
            registry=registry,
        )
        self.model_restores = Counter(
            "whisper_gpu_model_restores",
            "Times a parked model was brought back: by a request on its way (request) or the control API (control)",
            ["trigger"],
            registry=registry,
        )
        for trigger in PARK_TRIGGERS:
            self.model_parks.labels(trigger)
        for trigger in RESTORE_TRIGGERS:
            self.model_restores.labels(trigger)
        self.model_restore_duration = Histogram(
            "whisper_gpu_model_restore_duration_seconds",
            "How long bringing a parked model back onto the device took",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
            registry=registry,
        )
        registry.register(GpuCollector(device))

    def set_queue(self, in_flight: int, queued: int) -> None:
        """Mirror the inference queue."""
        self.in_flight.set(in_flight)
        self.queued.set(queued)

    def observe_stages(self, stages: Mapping[str, float], fallbacks: int) -> None:
        """Record where one request's time went."""
        for stage, seconds in stages.items():
            self.stage_seconds.labels(stage).observe(seconds)
        self.window_fallbacks.inc(fallbacks)

    def loaded(self, model: str, device: str, compute_type: str, seconds: float) -> None:
        """Record a successful load."""
        self.model_info.info({"model": model, "device": device, "compute_type": compute_type})
        self.model_ready.set(1)
        self.model_resident.set(1)
        self.model_load_duration.set(seconds)
        self.model_loads.labels("ok").inc()
