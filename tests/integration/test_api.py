"""The control-API client's failure paths that the entities cannot show: what reaches the log."""

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientSession, web
from homeassistant.core import HomeAssistant
from homeassistant.helpers.aiohttp_client import async_get_clientsession

from custom_components.whisper_gpu.api import WhisperGpuClient, WhisperGpuConnectionError
from custom_components.whisper_gpu.const import LOGGER

from .common import HOST, audio_stream, free_port

TOKEN = "secret-control-token-that-must-not-leak"  # noqa: S105 - a test credential


@pytest.fixture
async def redirect_loop() -> AsyncIterator[int]:
    """An HTTP server that answers every request with a redirect to itself."""

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(location=str(request.rel_url))

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    yield port
    await runner.cleanup()


def client_for(session: ClientSession, port: int) -> WhisperGpuClient:
    return WhisperGpuClient(session, HOST, wyoming_port=free_port(), control_port=port, token=TOKEN)


async def test_the_token_stays_out_of_errors_and_logs(
    hass: HomeAssistant, redirect_loop: int, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own error text carries the request headers; what the client raises and logs must not."""
    client = client_for(async_get_clientsession(hass), redirect_loop)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(WhisperGpuConnectionError) as raised:
        await client.async_update_settings({"beam_size": 2})
    LOGGER.warning("Settings change failed: %s", raised.value)

    assert "TooManyRedirects" in str(raised.value)
    assert TOKEN not in str(raised.value)
    assert TOKEN not in caplog.text


async def test_a_wyoming_port_that_never_accepts_times_out(
    hass: HomeAssistant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener whose accept queue is full leaves the connect hanging; the client gives up after its timeout."""
    monkeypatch.setattr("custom_components.whisper_gpu.api.CONNECT_TIMEOUT", 0.5)
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        # Fill the accept queue (Linux queues backlog + 1); the next SYN is dropped and retried.
        filler = socket.create_connection((HOST, port))
        client = WhisperGpuClient(
            async_get_clientsession(hass), HOST, wyoming_port=port, control_port=free_port(), token=TOKEN
        )
        try:
            async with asyncio.timeout(5):
                with pytest.raises(WhisperGpuConnectionError, match="TimeoutError"):
                    await anext(client.async_transcribe_updates(audio_stream(b"\0" * 3200), "en"))
        finally:
            filler.close()
