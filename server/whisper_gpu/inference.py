"""One inference thread fed by an arrival-ordered queue, so the event loop never waits on the model.

A request that finds the model idle starts at once, alone. Requests that arrive while a batch runs wait for it and
then go together as the next batch (same engine, up to `max_batch`): the model does several at nearly the cost of
one, and nobody waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from .engine import DecodeOptions, TranscriptResult, WhisperEngine

_LOGGER = logging.getLogger(__name__)


@dataclass
class Urgency:
    """Whether a job may wait for others.

    Background work (partial and speculative transcripts) goes after every final transcript queued, and is raised
    to final when its result becomes somebody's answer.
    """

    background: bool = False
    started: bool = False
    """Set by the queue when the job starts."""


@dataclass
class _Job:
    engine: WhisperEngine
    audio: np.ndarray
    options: DecodeOptions
    future: asyncio.Future[TranscriptResult] = field(repr=False)
    urgency: Urgency = field(default_factory=Urgency)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class _Task:
    """Work that must run after every job queued before it (freeing a replaced model)."""

    action: Callable[[], None]
    future: asyncio.Future[None] = field(repr=False)


class InferenceQueue:
    """Serialises model calls on a dedicated thread."""

    def __init__(
        self,
        max_batch: int = 1,
        on_change: Callable[[int, int], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._max_batch = max_batch
        self._on_change = on_change
        self._on_batch = on_batch
        self._pending: deque[_Job | _Task] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker: asyncio.Task[None] | None = None
        self.in_flight = 0

    @property
    def queued(self) -> int:
        """Requests waiting for the model."""
        return sum(isinstance(item, _Job) for item in self._pending)

    @property
    def queued_finals(self) -> int:
        """Requests waiting for the model whose answer a client waits for (not background work)."""
        return sum(isinstance(item, _Job) and not item.urgency.background for item in self._pending)

    def start(self) -> None:
        """Start taking work."""
        self._worker = asyncio.create_task(self._run(), name="inference queue")

    async def close(self) -> None:
        """Stop taking work and wait for the thread."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        await asyncio.to_thread(self._executor.shutdown, wait=True)  # the job in flight ends off the event loop

    async def transcribe(
        self, engine: WhisperEngine, audio: np.ndarray, options: DecodeOptions, urgency: Urgency | None = None
    ) -> TranscriptResult:
        """Queue one request and wait for its transcript; cancelling drops it if it has not started."""
        future: asyncio.Future[TranscriptResult] = asyncio.get_running_loop().create_future()
        self._put(_Job(engine, audio, options, future, urgency or Urgency()))
        return await future

    async def after_pending(self, action: Callable[[], None]) -> None:
        """Run a blocking action on the inference thread once every job queued so far has finished."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._put(_Task(action, future))
        await future

    def _put(self, item: _Job | _Task) -> None:
        self._pending.append(item)
        self._wakeup.set()
        self._changed()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self._take_next()
            if isinstance(item, _Task):
                await self._run_task(loop, item)
            elif batch := self._collect_batch(item):
                await self._run_batch(loop, batch)
            self._changed()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        self.in_flight = len(batch)
        for job in batch:
            job.urgency.started = True
        self._changed()
        if self._on_batch is not None:
            self._on_batch(len(batch))
        started = time.monotonic()

        def deliver(index: int, result: TranscriptResult) -> None:
            job = batch[index]
            if not job.future.done():
                job.future.set_result(replace(result, stages={**result.stages, "queue": started - job.queued_at}))

        def on_result(index: int, result: TranscriptResult) -> None:
            # Called on the inference thread as each request's text is final.
            loop.call_soon_threadsafe(deliver, index, result)

        try:
            await loop.run_in_executor(
                self._executor,
                functools.partial(
                    batch[0].engine.transcribe_batch, [(job.audio, job.options) for job in batch], on_result
                ),
            )
        except Exception as err:  # noqa: BLE001 - the error belongs to the requests, not to the queue
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
        finally:
            self.in_flight = 0

    def _take_next(self) -> _Job | _Task:
        """The first final job queued before any task, else whatever comes first (tasks keep their place)."""
        for index, item in enumerate(self._pending):
            if isinstance(item, _Task):
                break
            if not item.urgency.background:
                del self._pending[index]
                return item
        return self._pending.popleft()

    def _collect_batch(self, first: _Job) -> list[_Job]:
        """The first live job plus queued jobs of the same engine and urgency, up to the batch size.

        Background work never rides along with final transcripts: it would make their batch slower.
        """
        batch = [first] if not first.future.cancelled() else []
        taken: set[int] = set()
        for job in itertools.takewhile(lambda item: isinstance(item, _Job), self._pending):
            if len(batch) >= self._max_batch:
                break
            assert isinstance(job, _Job)  # noqa: S101 - takewhile stops at the first task
            if job.engine is first.engine and job.urgency.background == first.urgency.background:
                taken.add(id(job))
                if not job.future.cancelled():
                    batch.append(job)
        if taken:
            # By identity: jobs hold arrays, which do not compare as plain values.
            self._pending = deque(item for item in self._pending if id(item) not in taken)
        return batch

    async def _run_task(self, loop: asyncio.AbstractEventLoop, task: _Task) -> None:
        try:
            await loop.run_in_executor(self._executor, task.action)
        except Exception as err:  # noqa: BLE001 - handed to whoever waits for the task
            if not task.future.done():
                task.future.set_exception(err)
        else:
            if not task.future.done():
                task.future.set_result(None)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.in_flight, self.queued)
