"""The control API over HTTPS from certificate files: real self-signed certificates, a real server, real clients."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from helpers.server import READY_TIMEOUT_S, TOKEN, ServerProcess, run_cli
from helpers.tls import issued_by_a_ca, self_signed

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def health(server: ServerProcess, cert: Path, key: Path) -> tuple[int, str]:
    """`whisper-gpu health` configured like the server's own container (the same certificate settings)."""
    result = run_cli(
        "health",
        "--wyoming-port", str(server.wyoming_port), "--control-port", str(server.control_port),
        "--host", "127.0.0.1", "--control-tls-cert", str(cert), "--control-tls-key", str(key),
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


async def test_the_control_port_speaks_only_https_and_still_wants_the_token(
    start_server: Callable[..., ServerProcess], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    server = start_server(tls=self_signed(tmp_path / "tls"), args=["--compute-type", "int8"])
    trusted = server.ssl_context()
    assert server.control_url.startswith("https://")
    async with http.get(server.control_url + "/readyz", ssl=trusted) as response:
        assert response.status == 200
        assert (await response.json())["status"] == "ready"
    plain = server.control_url.replace("https://", "http://")
    with pytest.raises(aiohttp.ClientError):
        async with http.get(plain + "/readyz") as response:
            pytest.fail(f"plain HTTP was answered: {response.status}")
    # A client that trusts only the system's CAs refuses the self-signed certificate.
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with http.get(server.control_url + "/readyz") as response:
            pytest.fail(f"an untrusted certificate was accepted: {response.status}")
    url = server.control_url + "/api/v1/settings"
    async with http.patch(url, json={"beam_size": 2}, ssl=trusted) as response:
        assert response.status == 401
    async with http.patch(url, json={"beam_size": 2}, headers=AUTH, ssl=trusted) as response:
        assert response.status == 200, await response.text()
    async with http.get(url, ssl=trusted) as response:
        assert (await response.json())["settings"]["beam_size"] == 2
    assert f"control https://127.0.0.1:{server.control_port}" in server.log()
    assert TOKEN not in server.log()


@pytest.mark.parametrize("issuer", ["self-signed", "ca"])
def test_health_trusts_exactly_the_servers_own_certificate(
    start_server: Callable[..., ServerProcess], tmp_path: Path, issuer: str
) -> None:
    """The certificate names the Service, not the loopback address; the local check still passes, a stranger not.

    Both kinds: a self-signed one, and a leaf issued by a CA with the chain in tls.crt (what cert-manager writes).
    """
    names = {"ip": "192.0.2.1", "dns": "whisper-gpu-control.whisper.svc"}
    own = (
        self_signed(tmp_path / "own", **names)
        if issuer == "self-signed"
        else issued_by_a_ca(tmp_path / "own", **names)[0]
    )
    # The test's own client could not check this name, so readiness is awaited with the CLI under test.
    server = start_server(tls=own, args=["--compute-type", "int8"], wait=False)
    deadline = time.monotonic() + READY_TIMEOUT_S
    code, output = health(server, own.cert, own.key)
    while code != 0 and time.monotonic() < deadline:
        assert server.process is not None
        assert server.process.poll() is None, server.log()
        time.sleep(0.5)
        code, output = health(server, own.cert, own.key)
    assert code == 0, output
    assert "healthy: model tiny.en" in output
    stranger = self_signed(tmp_path / "stranger", ip="192.0.2.1", dns="whisper-gpu-control.whisper.svc")
    code, output = health(server, stranger.cert, stranger.key)
    assert code == 1
    assert "unhealthy" in output


def test_tls_settings_that_cannot_work_stop_the_server_with_a_message(tmp_path: Path) -> None:
    first, second = self_signed(tmp_path / "a"), self_signed(tmp_path / "b")
    cases = [
        (["--control-tls-cert", str(first.cert)], "CONTROL_TLS_KEY is not set"),
        (["--control-tls-key", str(first.key)], "CONTROL_TLS_CERT is not set"),
        (
            ["--control-tls-cert", str(tmp_path / "missing.crt"), "--control-tls-key", str(first.key)],
            f"CONTROL_TLS_CERT {tmp_path / 'missing.crt'} cannot be read",
        ),
        (
            ["--control-tls-cert", str(first.cert), "--control-tls-key", str(second.key)],
            "does not belong to the certificate",
        ),
        (
            ["--control-tls-cert", str(first.key), "--control-tls-key", str(first.key)],
            "no PEM certificate and key",
        ),
    ]
    for args, message in cases:
        data_dir = tmp_path / "data"
        result = run_cli("serve", "--data-dir", str(data_dir), "--offline", "--zeroconf", "off", *args, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert "Cannot start: " in result.stderr, result.stderr
        assert message in result.stderr, result.stderr
        assert not (data_dir / "server_id").exists(), "stopped before doing anything"
