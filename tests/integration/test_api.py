"""The control-API client: failure paths the entities cannot show, and HTTPS with a verified certificate."""

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from helpers.tls import issued_by_a_ca, self_signed
from homeassistant.core import HomeAssistant
from homeassistant.helpers.aiohttp_client import async_get_clientsession

from custom_components.whisper_gpu.api import (
    WhisperGpuAuthError,
    WhisperGpuCertificateError,
    WhisperGpuClient,
    WhisperGpuConnectionError,
)
from custom_components.whisper_gpu.const import LOGGER

from .common import HOST, WhisperGpuServer, audio_stream, free_port

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


# The name a cert-manager certificate carries; the test reaches the server by its loopback address instead.
SERVICE_NAME = "whisper-gpu-control.whisper.svc"


@pytest.mark.parametrize("issuer", ["self-signed", "ca"])
async def test_an_https_control_port_is_verified_against_the_given_ca(
    hass: HomeAssistant, own_server: WhisperGpuServer, tmp_path: Path, issuer: str
) -> None:
    """A real server with a certificate for the Service's name (not for the address connected to).

    Self-signed (the client is given that certificate), or issued by a CA as cert-manager does (given ca.crt).
    """
    if issuer == "self-signed":
        own_server.tls = self_signed(tmp_path / "tls", ip="192.0.2.1", dns=SERVICE_NAME)
        ca_pem = own_server.tls.pem
    else:
        own_server.tls, ca_file = issued_by_a_ca(tmp_path / "tls", ip="192.0.2.1", dns=SERVICE_NAME)
        ca_pem = ca_file.read_text(encoding="ascii")
    own_server.start(wait=False)
    session = async_get_clientsession(hass)

    def client(token: str = own_server.token, **tls: Any) -> WhisperGpuClient:
        return WhisperGpuClient(
            session,
            HOST,
            wyoming_port=own_server.wyoming_port,
            control_port=own_server.control_port,
            token=token,
            **tls,
        )

    trusted = client(tls=True, ca_pem=ca_pem, server_hostname=SERVICE_NAME)
    async with asyncio.timeout(120):
        while True:  # until the model is loaded, so that a settings change is taken
            try:
                if (await trusted.async_get_status()).state == "ready":
                    break
            except WhisperGpuConnectionError:
                assert own_server.process is not None
                assert own_server.process.poll() is None, own_server.log()
            await asyncio.sleep(0.2)
    assert (await trusted.async_get_info()).server_id
    await trusted.async_check_auth()
    assert (await trusted.async_update_settings({"beam_size": 3}))["beam_size"] == 3
    with pytest.raises(WhisperGpuAuthError):  # HTTPS or not, the token is still required
        await client("wrong", tls=True, ca_pem=ca_pem, server_hostname=SERVICE_NAME).async_check_auth()

    # The certificate names the Service, not 127.0.0.1: without the name the host check fails.
    with pytest.raises(WhisperGpuCertificateError):
        await client(tls=True, ca_pem=ca_pem).async_get_info()
    # The system's trust store does not know a self-signed certificate.
    with pytest.raises(WhisperGpuCertificateError):
        await client(tls=True, server_hostname=SERVICE_NAME).async_get_info()
    # Another CA: refused.
    stranger = self_signed(tmp_path / "stranger", ip="192.0.2.1", dns=SERVICE_NAME)
    with pytest.raises(WhisperGpuCertificateError):
        await client(tls=True, ca_pem=stranger.pem, server_hostname=SERVICE_NAME).async_get_info()
    # Plain HTTP gets no answer from an HTTPS port.
    with pytest.raises(WhisperGpuConnectionError) as plain:
        await client().async_get_info()
    assert not isinstance(plain.value, WhisperGpuCertificateError)


async def test_a_ca_that_is_no_certificate_is_a_certificate_error(hass: HomeAssistant) -> None:
    client = WhisperGpuClient(
        async_get_clientsession(hass),
        HOST,
        wyoming_port=free_port(),
        control_port=free_port(),
        token=TOKEN,
        tls=True,
        ca_pem="-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    with pytest.raises(WhisperGpuCertificateError, match="no PEM certificate"):
        await client.async_get_info()
