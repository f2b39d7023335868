"""Runs the two ports, the model and the announcement, and stops gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from aiohttp import web
from wyoming.error import Error
from wyoming.event import async_write_event

from .boot_settings import ResolvedSettings
from .control import create_app
from .discovery import Announcer
from .engine import UnsupportedOnDeviceError
from .service import Service
from .tls import TlsSettingsError, server_context
from .wyoming_handler import MAX_HEADER_BYTES, ConnectionLimits, WyomingHandler, linger

_LOGGER = logging.getLogger(__name__)


class WyomingServer:
    """The Wyoming TCP listener and its connections, at most `max_connections` at once."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], WyomingHandler] = {}
        self._max_connections: int = service.boot["max_connections"]
        self._refusing = False  # at the limit since the last accepted connection: log only the first refusal
        self._limits = ConnectionLimits(
            idle_timeout_s=service.boot["idle_timeout_s"], read_timeout_s=service.boot["read_timeout_s"]
        )

    async def start(self, host: str, port: int) -> None:
        """Listen."""
        # A deep accept queue: a burst of connections is answered (over the limit: refused) rather than dropped.
        self._server = await asyncio.start_server(
            self._accept, host, port, limit=MAX_HEADER_BYTES, backlog=max(1024, self._max_connections * 2)
        )

    @property
    def busy(self) -> int:
        """Connections with a request between audio-start and its answer."""
        return sum(handler.busy for handler in self._connections.values())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max_connections:
            await self._refuse(reader, writer)
            return
        self._refusing = False
        handler = WyomingHandler(self._service, reader, writer, self._limits)
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - asyncio runs callbacks in tasks
        self._connections[task] = handler
        self._service.metrics.connections.inc()
        try:
            await handler.run()
        finally:
            self._service.metrics.connections.dec()
            self._connections.pop(task, None)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection too many: say so in an event the client can read, then close."""
        self._service.metrics.connections_refused.inc()
        if not self._refusing:
            _LOGGER.warning(
                "Refusing Wyoming connections: %d are open, the limit (MAX_CONNECTIONS); "
                "whisper_gpu_connections_refused_total counts them",
                self._max_connections,
            )
            self._refusing = True
        message = f"The server is busy: {self._max_connections} connections are open, the limit; try again later"
        with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
            async with asyncio.timeout(self._limits.idle_timeout_s):
                await async_write_event(Error(text=message, code="server_busy").event(), writer)
        await linger(reader, writer)
        writer.close()

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, let requests in flight finish within the grace period, then close the rest."""
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace_s
        if self.busy:
            _LOGGER.info("Waiting up to %.0f s for %d request(s) in flight", grace_s, self.busy)
        while self.busy and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll of per-connection flags
            await asyncio.sleep(0.05)
        if self.busy:
            _LOGGER.warning("Closing %d request(s) still in flight after the grace period", self.busy)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def serve(boot: ResolvedSettings) -> int:
    """Run until SIGTERM or SIGINT; the exit code."""
    try:
        control_ssl = server_context(boot.values)
    except TlsSettingsError as err:
        _LOGGER.error("Cannot start: %s", err)  # noqa: TRY400 - a settings problem, not a crash
        return 2
    try:
        service = Service(boot)
    except OSError as err:
        _LOGGER.error(  # noqa: TRY400 - a setup problem, not a crash
            "Cannot start: the data directory %s cannot be written (%s)", boot["data_dir"], err.strerror or err
        )
        return 1
    host = boot["host"]
    stopping = asyncio.Event()
    runner = web.AppRunner(create_app(service, stopping.is_set), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, boot["control_port"], ssl_context=control_ssl).start()
        await service.start()
    except UnsupportedOnDeviceError as err:
        _LOGGER.error("Cannot start: %s", err)  # noqa: TRY400 - a settings problem, not a crash
        await runner.cleanup()
        return 2
    except OSError as err:
        _LOGGER.error("Cannot listen on control port %s: %s", boot["control_port"], err)  # noqa: TRY400
        await runner.cleanup()
        return 1
    wyoming = WyomingServer(service)
    try:
        await wyoming.start(host, boot["wyoming_port"])
    except OSError as err:
        _LOGGER.error("Cannot listen on Wyoming port %s: %s", boot["wyoming_port"], err)  # noqa: TRY400
        await service.close()
        await runner.cleanup()
        return 1
    _LOGGER.info(
        "Listening: Wyoming tcp://%s:%s, control %s://%s:%s (server id %s, data in %s)",
        host,
        boot["wyoming_port"],
        "https" if control_ssl else "http",
        host,
        boot["control_port"],
        service.server_id,
        service.data_dir,
    )
    announcer = Announcer(
        boot["zeroconf"],
        service.server_id,
        host,
        boot["wyoming_port"],
        boot["control_port"],
        control_tls=control_ssl is not None,
    )
    await announcer.start()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    _LOGGER.info("Stopping: no new connections")
    await announcer.close()
    await wyoming.shutdown(boot["shutdown_grace_s"])
    await runner.cleanup()
    await service.close()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):
            loop.remove_signal_handler(signum)
    _LOGGER.info("Stopped")
    return 0
