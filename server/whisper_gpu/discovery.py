"""Zeroconf announcement, so Home Assistant finds the server without typing an address."""

from __future__ import annotations

import logging
import socket

from zeroconf import IPVersion
from zeroconf._utils.net import get_all_addresses
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from . import __version__

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_whisper-gpu._tcp.local."
WYOMING_SERVICE_TYPE = "_wyoming._tcp.local."


class Announcer:
    """Registers `_whisper-gpu._tcp` (and `_wyoming._tcp` in `wyoming` mode) until closed."""

    def __init__(  # noqa: PLR0913 - what is announced, each on its own
        self, mode: str, server_id: str, host: str, wyoming_port: int, control_port: int, *, control_tls: bool = False
    ) -> None:
        self._mode = mode
        self._server_id = server_id
        self._host = host
        self._wyoming_port = wyoming_port
        self._control_port = control_port
        self._control_tls = control_tls
        self._zeroconf: AsyncZeroconf | None = None
        self._infos: list[AsyncServiceInfo] = []

    async def start(self) -> None:
        """Announce; a network without multicast is logged, not fatal."""
        if self._mode == "off":
            return
        addresses = self._addresses()
        if not addresses:
            _LOGGER.warning("Zeroconf: no network address to announce; set ZEROCONF=off to silence this")
            return
        self._infos = self.service_infos(addresses)
        try:
            self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
            for info in self._infos:
                await self._zeroconf.async_register_service(info)
        except OSError as err:
            _LOGGER.warning("Zeroconf announcement failed: %s", err)
            await self.close()
            return
        _LOGGER.info("Announced %s on %s", " and ".join(info.type for info in self._infos), ", ".join(addresses))

    def service_infos(self, addresses: list[str]) -> list[AsyncServiceInfo]:
        """What is announced: our own type, plus Wyoming's in `wyoming` mode, with the ports, TLS and id in TXT."""
        types = [SERVICE_TYPE] + ([WYOMING_SERVICE_TYPE] if self._mode == "wyoming" else [])
        instance = f"whisper-gpu-{self._server_id[:8]}"
        properties = {
            "id": self._server_id,
            "version": __version__,
            "wyoming_port": str(self._wyoming_port),
            "control_port": str(self._control_port),
            # Whether the control port speaks HTTPS (CONTROL_TLS_CERT), so a client knows the scheme to use.
            "control_tls": "true" if self._control_tls else "false",
        }
        return [
            AsyncServiceInfo(
                service_type,
                f"{instance}.{service_type}",
                port=self._wyoming_port,
                properties=properties,
                server=f"{socket.gethostname()}.local.",
                parsed_addresses=addresses,
            )
            for service_type in types
        ]

    async def close(self) -> None:
        """Withdraw the announcement."""
        if self._zeroconf is None:
            return
        zeroconf, self._zeroconf = self._zeroconf, None
        try:
            await zeroconf.async_unregister_all_services()
        finally:
            await zeroconf.async_close()

    def _addresses(self) -> list[str]:
        if self._host not in ("", "0.0.0.0"):  # noqa: S104 - comparing, not binding
            return [self._host]
        return [address for address in get_all_addresses() if not address.startswith("127.")]
