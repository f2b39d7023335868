"""The running service: settings changes, the idle timer that parks the model, and the request bookkeeping.

Both front doors (the Wyoming handler and the control API) talk to this one object; neither touches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .boot_settings import ResolvedSettings
from .endpoint import EndpointSettings
from .engine import (
    DecodeOptions,
    Device,
    TranscriptResult,
    UnsupportedOnDeviceError,
    resolve_device,
    supported_compute_types,
)
from .errors import RequestError
from .hardware import cpu_threads, describe_device
from .identity import load_or_create_server_id, load_or_create_token
from .inference import InferenceQueue, Urgency
from .live import LiveSettings
from .metrics import Metrics
from .model_manager import (
    LoadJournal,
    LoadPlan,
    LoadSettings,
    ModelManager,
    ModelState,
    RestoreFailedError,
    SettingsNotSavedError,
)
from .models import (
    KNOWN_MODELS,
    ModelCache,
    approximate_memory_mb,
    is_model_path,
)
from .settings import (
    COMPUTE_TYPES,
    RUNTIME_SETTINGS,
    SETTINGS,
    WHISPER_LANGUAGES,
    ErrorCode,
    SettingError,
    validate_change,
)
from .settings_store import SettingsStore

_LOGGER = logging.getLogger(__name__)

RELOAD_SETTINGS = frozenset(name for name in RUNTIME_SETTINGS if SETTINGS[name].reload)


class ReloadInProgressError(Exception):
    """A settings change (or a park) arrived while a model reload runs."""


class ModelNotReadyError(Exception):
    """No model is loaded to park or restore."""


class SettingsRejectedError(Exception):
    """A settings change with per-field error codes; nothing was changed."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__(errors)
        self.errors = errors


@dataclass(frozen=True)
class FinishedRequest:
    """One request's numbers, for the log, the metrics and `/api/v1/status`."""

    outcome: str
    audio_seconds: float
    processing_seconds: float
    finished_at: datetime


class Service:
    """Settings, model, queue and metrics of one server."""

    def __init__(self, boot: ResolvedSettings) -> None:
        self.boot = boot
        self.data_dir = Path(boot["data_dir"])
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = SettingsStore(boot, self.data_dir)
        self.server_id = load_or_create_server_id(self.data_dir)
        self.token = load_or_create_token(boot, self.data_dir)
        self.metrics = Metrics(device=lambda: self.models.engine.device if self.models.engine else None)
        self.queue = InferenceQueue(
            max_batch=boot["max_batch"], on_change=self.metrics.set_queue, on_batch=self.metrics.batch_size.observe
        )
        self.cache = ModelCache(self.data_dir, limit_mb=boot["model_cache_limit_mb"])
        self.journal = LoadJournal(self.data_dir)
        self.models = ModelManager(
            self.cache,
            self.queue,
            self.metrics,
            LoadSettings(
                offline=bool(boot["offline"]),
                cpu_threads=cpu_threads(boot.values),
                memory_limit_mb=boot["memory_limit_mb"],
            ),
            self.journal,
        )
        self.notice: dict[str, str] | None = None
        self._changing = asyncio.Lock()
        self.last_request: FinishedRequest | None = None
        self.requests_total = 0
        self.requests_failed = 0
        self._last_activity = time.monotonic()
        self._transcribing = 0
        self._activity = asyncio.Event()
        self._idle_parker: asyncio.Task[None] | None = None
        self._early_restores: set[asyncio.Task[None]] = set()

    async def start(self) -> asyncio.Task[bool]:
        """Start the inference queue and the first model load (raises UnsupportedOnDeviceError at once)."""
        plan, note = self.models.plan(self.settings["model"], self.settings["device"], self.settings["compute_type"])
        if note:
            _LOGGER.warning("COMPUTE_TYPE=%s: %s", self.settings["compute_type"], note)
        plan, self.notice = self.journal.at_boot(plan)
        try:
            self.journal.begin(plan)
        except OSError as err:
            _LOGGER.warning("Cannot write to %s: %s", self.data_dir, err.strerror or err)
        self.queue.start()
        self._idle_parker = asyncio.create_task(self._park_when_idle(), name="park when idle")
        return self.models.start_load(plan)

    async def close(self) -> None:
        """Stop a load or download, let the inference thread finish its job, then free the model."""
        for task in (self._idle_parker, *self._early_restores):
            if task is not None:
                task.cancel()
        await self.models.stop_loading()
        await self.queue.close()
        await self.models.close()

    # Requests -----------------------------------------------------------------------------------------------

    def check_language(self, language: str | None) -> str | None:
        """The language to decode with (None: detect); raises RequestError for one the model cannot do."""
        chosen = (language or self.settings["language"]).lower()
        if chosen == "auto":
            return None
        engine = self.models.engine
        languages = engine.languages if engine else WHISPER_LANGUAGES
        # Clients often send a locale ("en-US", "pt_BR"); Whisper knows the language part.
        chosen = chosen if chosen in languages else chosen.replace("_", "-").partition("-")[0]
        if chosen not in languages:
            model = engine.name if engine else self.settings["model"]
            raise RequestError(
                "unsupported_language",
                f"Language {chosen!r} is not supported by model {model}; it speaks {_summarise(languages)}",
            )
        return chosen

    async def transcribe(
        self,
        audio: np.ndarray,
        language: str | None,
        *,
        urgency: Urgency | None = None,
        names: tuple[str, ...] = (),
    ) -> tuple[TranscriptResult, str]:
        """Transcribe 16 kHz mono audio with the current settings; returns the result and the model's name.

        Background work (partial and speculative transcripts) waits for every final transcript queued. The names
        (of the client's home) bias the model toward their spelling unless `use_names` is off.
        """
        decode_language = self.check_language(language)
        background = urgency is not None and urgency.background
        # Background work is bounded by the connections (one partial and one speculation each), not by the queue.
        if not background and self.queue.queued_finals >= self.settings["max_queue"]:
            self.metrics.busy.inc()
            raise RequestError("server_busy", f"{self.queue.queued} requests are waiting already; try again shortly")
        self._transcribing += 1
        self._touch()
        try:
            engine = await self.models.acquire()
            options = DecodeOptions.from_settings(
                self.settings.values, decode_language, names if self.settings["use_names"] else ()
            )
            return await self.queue.transcribe(engine, audio, options, urgency), engine.name
        finally:
            self._transcribing -= 1
            self._touch()

    def request_coming(self) -> None:
        """A client began a request (`transcribe`, `audio-start`): bring a parked model back while the audio arrives.

        The idle timer restarts too. The transcription, once its audio is complete, waits for what is left.
        """
        self._touch()
        if self.models.restoring or not (self.models.parked or self.models.parking):
            return
        task = asyncio.create_task(self._restore_early(), name="restore on request")
        self._early_restores.add(task)
        task.add_done_callback(self._early_restores.discard)

    async def _restore_early(self) -> None:
        # A failure is logged; the request's transcription tries again and reports it to its client.
        with contextlib.suppress(RestoreFailedError):
            await self.models.restore(trigger="request")

    async def park_now(self) -> dict[str, Any]:
        """The control API's park: once the requests in flight and queued have finished, park the model.

        Raises ReloadInProgressError while a load or switch runs, ModelNotReadyError when nothing is loaded.
        """
        if self.models.reloading:
            raise ReloadInProgressError
        if self.models.engine is None:
            raise ModelNotReadyError
        await self.models.park(keep_in_host_memory=self._keep_in_host_memory(), trigger="control")
        _LOGGER.info("Model parked through the control API")
        return self.status()

    async def restore_now(self) -> dict[str, Any]:
        """The control API's restore; the idle timer starts again. Raises ModelNotReadyError, RestoreFailedError."""
        if self.models.engine is None:
            raise ModelNotReadyError
        self._touch()
        await self.models.restore(trigger="control")
        return self.status()

    def _keep_in_host_memory(self) -> bool:
        return bool(self.settings["park_mode"] == "host_memory")

    def _touch(self) -> None:
        """Restart the idle timer."""
        self._last_activity = time.monotonic()
        self._activity.set()

    async def _park_when_idle(self) -> None:
        """Park the model KEEP_ALIVE_S after the last request; any activity or settings change restarts the clock."""
        while True:
            self._activity.clear()
            keep_alive = float(self.settings["keep_alive_s"])
            delay = None
            if keep_alive > 0:
                remaining = self._last_activity + keep_alive - time.monotonic()
                # Once due but not possible (busy, loading, parked already), look again a little later.
                delay = remaining if remaining > 0 else _IDLE_RECHECK_S
            try:
                async with asyncio.timeout(delay):
                    await self._activity.wait()
            except TimeoutError:
                if self._idle_for_park(keep_alive):
                    await self.models.park(keep_in_host_memory=self._keep_in_host_memory(), trigger="idle")

    def _idle_for_park(self, keep_alive: float) -> bool:
        return (
            keep_alive > 0
            and time.monotonic() - self._last_activity >= keep_alive
            and self.models.engine is not None
            and not self.models.parked
            and not self.models.parking
            and not self.models.reloading
            and self._transcribing == 0
            and self.queue.in_flight == 0
            and self.queue.queued == 0
        )

    def promote(self, urgency: Urgency) -> None:
        """Make background work somebody's final answer: still waiting, it counts against MAX_QUEUE like a new one."""
        if not urgency.started and self.queue.queued_finals >= self.settings["max_queue"]:
            self.metrics.busy.inc()
            raise RequestError("server_busy", f"{self.queue.queued} requests are waiting already; try again shortly")
        urgency.background = False

    def live_settings(self) -> LiveSettings:
        """How requests are followed while their audio arrives: end of speech and partial transcripts."""
        values = self.settings.values
        endpoint = (
            EndpointSettings(
                threshold=values["vad_threshold"],
                min_speech_s=values["min_speech_duration_ms"] / 1000,
                end_silence_s=values["end_of_speech_s"],
            )
            if values["endpointing"]
            else None
        )
        return LiveSettings(endpoint=endpoint, partial_interval_s=values["partial_interval_s"])

    def describe_model(self) -> tuple[str, list[str]]:
        """The model name and languages Wyoming `describe` announces.

        A fixed LANGUAGE is what Home Assistant may pick; `auto` offers all the model speaks.
        """
        engine = self.models.engine
        languages = self.languages()
        configured = self.settings["language"]
        if len(languages) > 1 and configured != "auto":
            languages = [configured]
        return (engine.name if engine else self.settings["model"]), languages

    def max_audio_seconds(self) -> float:
        """Audio per request before the server stops buffering."""
        return float(self.settings["max_audio_s"])

    def log_transcripts(self) -> bool:
        """Whether transcript text may go into the log."""
        return bool(self.settings["log_transcripts"])

    def protocol_error(self, code: str) -> None:
        """Count bad input from a Wyoming client."""
        self.metrics.protocol_errors.labels(code).inc()

    def record(
        self, outcome: str, audio_seconds: float, processing_seconds: float, result: TranscriptResult | None = None
    ) -> FinishedRequest:
        """Count a finished request in the metrics and in the status, with where its time went when answered.

        Stages are counted here, for answers only: partial transcripts and dropped speculations are not requests.
        """
        finished = FinishedRequest(outcome, audio_seconds, processing_seconds, datetime.now(UTC))
        if result is not None:
            self.metrics.observe_stages(result.stages, result.fallbacks)
        self.metrics.requests.labels(outcome).inc()
        self.requests_total += 1
        if outcome in ("ok", "no_speech", "truncated"):
            self.metrics.audio_seconds.inc(audio_seconds)
            self.metrics.request_duration.observe(processing_seconds)
            if audio_seconds > 0:
                self.metrics.real_time_factor.observe(processing_seconds / audio_seconds)
        elif outcome != "disconnected":
            self.requests_failed += 1
        self.last_request = finished
        return finished

    # Control ------------------------------------------------------------------------------------------------

    async def update_settings(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a partial change and apply all of it or none of it.

        A change without a reload is saved, then applied. A change that reloads the model is applied and saved
        together once the new model is warm; when the load (or the save) fails, nothing of it stays.
        Raises SettingsRejectedError, ReloadInProgressError or SettingsNotSavedError; in each case nothing changed.
        """
        if self.models.reloading:
            raise ReloadInProgressError
        async with self._changing:
            if self.models.reloading:
                raise ReloadInProgressError
            values = self._validate(changes)
            merged = self.settings.preview(values)
            serving = self.models.engine
            # Also when the serving model is not the configured one (nothing loaded, a fallback after a crash).
            reload_needed = any(merged[name] != self.settings[name] for name in RELOAD_SETTINGS) or (
                bool(RELOAD_SETTINGS & set(values)) and (serving is None or serving.name != merged["model"])
            )
            # In a worker thread: the memory check of a switch asks the device (NVML on a GPU), which can be slow.
            plan = await asyncio.to_thread(self._check_combination, merged, values, reload_needed=reload_needed)
            if plan is None:
                try:
                    changed = await asyncio.to_thread(self.settings.apply, values)
                except OSError as err:
                    raise SettingsNotSavedError(err) from err
                _LOGGER.info("Settings changed through the control API: %s", ", ".join(changed) or "nothing")
                self._touch()  # a new KEEP_ALIVE_S counts from now
                return {"settings": self.settings.values, "changed": changed, "reload": False}
            try:
                await asyncio.to_thread(self.journal.begin, plan)
            except OSError as err:
                raise SettingsNotSavedError(err) from err
            changed = self.settings.changed_names(values)

            async def commit() -> None:
                await asyncio.to_thread(self.settings.apply, values)

            unload_first = (
                bool(merged["low_memory_switch"]) and await asyncio.to_thread(self.models.memory_shortfall_mb, plan) > 0
            )
            self.models.start_load(plan, unload_first=unload_first, commit=commit)
            _LOGGER.info("Settings change through the control API waits for %s to load: %s", plan.model, changed)
            return {"settings": merged, "changed": changed, "reload": True}

    def _validate(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        values, errors = {}, {}
        for name, value in changes.items():
            path = name == "model" and isinstance(value, str) and is_model_path(value)
            if path and not self.boot["allow_model_paths"]:
                # Refused before the filesystem is looked at, so the answer tells nothing about what exists.
                errors[name] = str(ErrorCode.PATH_NOT_ALLOWED)
                continue
            try:
                values[name] = validate_change(name, value)
            except SettingError as err:
                errors[name] = str(err.code)
        if errors:
            raise SettingsRejectedError(errors)
        return values

    def _check_combination(
        self, merged: dict[str, Any], values: dict[str, Any], *, reload_needed: bool
    ) -> LoadPlan | None:
        errors: dict[str, str] = {}
        plan = None
        if reload_needed:
            try:
                plan, fallback = self.models.plan(merged["model"], merged["device"], merged["compute_type"])
            except UnsupportedOnDeviceError:
                errors["device" if "device" in values else "compute_type"] = ErrorCode.NOT_SUPPORTED_ON_DEVICE
            else:
                # The boot value may fall back (float16 on a CPU); a change asked for now must be what it says.
                if fallback and "compute_type" in values:
                    errors["compute_type"] = ErrorCode.NOT_SUPPORTED_ON_DEVICE
        known = KNOWN_MODELS.get(merged["model"])
        if known is not None and known.english_only and merged["language"] not in ("en", "auto"):
            errors["language" if "language" in values else "model"] = ErrorCode.NOT_SUPPORTED_BY_MODEL
        elif (
            known is None
            and self.models.engine is not None
            and "language" in values
            and "model" not in values
            and merged["language"] not in ("auto", *self.models.engine.languages)
        ):
            errors["language"] = ErrorCode.NOT_SUPPORTED_BY_MODEL
        if (
            plan is not None
            and not errors
            and self.models.engine is not None
            and not merged["low_memory_switch"]
            and self.models.memory_shortfall_mb(plan) > 0
        ):
            errors["model" if "model" in values else next(iter(RELOAD_SETTINGS & set(values)))] = (
                ErrorCode.INSUFFICIENT_MEMORY
            )
        if errors:
            raise SettingsRejectedError({name: str(code) for name, code in errors.items()})
        return plan

    def status(self) -> dict[str, Any]:
        """`GET /api/v1/status`."""
        engine = self.models.engine
        failure = self.models.last_failure
        # `error` says why nothing serves; `last_failure` stays after a failed switch while the old model serves.
        error = failure.error if failure and self.models.state is ModelState.FAILED else None
        last = self.last_request
        return {
            "state": str(self.models.shown_state),
            "model": (
                {
                    "name": engine.name,
                    "device": str(engine.device),
                    "compute_type": engine.compute_type,
                    "load_seconds": round(engine.load_seconds, 3),
                }
                if engine
                else None
            ),
            "parking": self._parking_status(),
            "target": self.models.target.describe() if self.models.target else None,
            "download": self.models.download,
            "error": {"code": str(error.code), "message": error.message} if error else None,
            "last_failure": failure.describe() if failure else None,
            "notice": self.notice,
            "requests": {
                "in_flight": self.queue.in_flight,
                "queued": self.queue.queued,
                "total": self.requests_total,
                "failed": self.requests_failed,
            },
            "last_request": (
                {
                    "duration_ms": round(last.processing_seconds * 1000),
                    "audio_seconds": round(last.audio_seconds, 3),
                    "outcome": last.outcome,
                    "finished_at": last.finished_at.isoformat(timespec="seconds"),
                }
                if last
                else None
            ),
        }

    def _parking_status(self) -> dict[str, Any]:
        models = self.models
        restore = models.last_restore
        return {
            "resident": models.engine is not None and not models.parked,
            "restoring": models.restoring,
            "parked_at": models.parked_at.isoformat(timespec="seconds") if models.parked and models.parked_at else None,
            "last_restore": (
                {
                    "seconds": round(restore.seconds, 3),
                    "trigger": restore.trigger,
                    "finished_at": restore.finished_at.isoformat(timespec="seconds"),
                }
                if restore
                else None
            ),
        }

    def info(self) -> dict[str, Any]:
        """`GET /api/v1/info`."""
        engine = self.models.engine
        device = engine.device if engine else self._configured_device()
        described = describe_device(device)
        compute_type = engine.compute_type if engine else "int8"
        copies = self.models.weight_copies(device)
        budget = self.boot["memory_limit_mb"] or int(str(described["memory_total_mb"]))
        cached = set(self.cache.cached_names())
        names = [*KNOWN_MODELS, *sorted(cached - set(KNOWN_MODELS))]
        models = []
        for name in names:
            known = KNOWN_MODELS.get(name)
            memory_mb = approximate_memory_mb(name, compute_type, self.cache.cached_path(name), copies=copies)
            packaged = bool(known and known.offline and known.offline.installed())
            obtainable = name in cached or packaged or not self.boot["offline"]
            models.append(
                {
                    "name": name,
                    "english_only": known.english_only if known else None,
                    "cached": name in cached,
                    "loaded": engine is not None and engine.name == name,
                    "memory_mb": memory_mb,
                    "usable": memory_mb <= budget and obtainable,
                    "offline_package": packaged,
                }
            )
        if engine is not None and engine.name not in names:
            models.append(
                {
                    "name": engine.name,
                    "english_only": not engine.multilingual,
                    "cached": True,
                    "loaded": True,
                    "memory_mb": approximate_memory_mb(engine.name, compute_type, copies=engine.weight_copies),
                    "usable": True,
                    "offline_package": False,
                }
            )
        return {
            "server_id": self.server_id,
            "name": "whisper-gpu",
            "version": __version__,
            "wyoming_port": self.boot["wyoming_port"],
            "control_port": self.boot["control_port"],
            "device": described,
            "compute_types": accepted_compute_types(supported_compute_types(device)),
            "models": models,
            "languages": ["auto", *self.languages()],
            "settings": {name: SETTINGS[name].schema_json() for name in RUNTIME_SETTINGS},
        }

    def languages(self) -> list[str]:
        """Languages of the serving model (or of the configured one before it loads)."""
        engine = self.models.engine
        if engine is not None:
            return list(engine.languages)
        known = KNOWN_MODELS.get(self.settings["model"])
        return ["en"] if known is not None and known.english_only else list(WHISPER_LANGUAGES)

    def _configured_device(self) -> Device:
        try:
            return resolve_device(self.settings["device"])
        except UnsupportedOnDeviceError:
            return Device("cpu")


_LANGUAGES_LISTED = 5
_IDLE_RECHECK_S = 1.0


def accepted_compute_types(supported: Iterable[str]) -> list[str]:
    """What `PATCH compute_type` accepts on a device: `auto` and the schema's types that CTranslate2 runs there.

    CTranslate2 also reports types the schema does not know (`int16` on some CPUs); offering those would only
    earn an `invalid_value`.
    """
    runnable = set(supported)
    return ["auto", *(name for name in COMPUTE_TYPES if name != "auto" and name in runnable)]


def _summarise(languages: list[str] | tuple[str, ...]) -> str:
    return ", ".join(languages) if len(languages) <= _LANGUAGES_LISTED else f"{len(languages)} languages"
