"""What the server announces over zeroconf (built, not multicast: tests send no traffic off this machine)."""

from __future__ import annotations

from typing import ClassVar

import pytest
from whisper_gpu import __version__, discovery
from whisper_gpu.discovery import Announcer
from zeroconf.asyncio import AsyncServiceInfo


@pytest.mark.parametrize(
    ("mode", "types"),
    [
        ("whisper-gpu", ["_whisper-gpu._tcp.local."]),
        ("wyoming", ["_whisper-gpu._tcp.local.", "_wyoming._tcp.local."]),
    ],
)
def test_announcement_carries_id_version_and_ports(mode: str, types: list[str]) -> None:
    announcer = Announcer(mode, "0123456789abcdef0123456789abcdef", "0.0.0.0", 10300, 10301)
    infos = announcer.service_infos(["192.0.2.10"])
    assert [info.type for info in infos] == types
    for info in infos:
        assert info.name == f"whisper-gpu-01234567.{info.type}"
        assert info.port == 10300
        assert info.parsed_addresses() == ["192.0.2.10"]
        assert info.decoded_properties == {
            "id": "0123456789abcdef0123456789abcdef",
            "version": __version__,
            "wyoming_port": "10300",
            "control_port": "10301",
            "control_tls": "false",
        }


def test_announcement_says_when_the_control_port_speaks_https() -> None:
    announcer = Announcer("whisper-gpu", "0123456789abcdef", "192.0.2.7", 10300, 10301, control_tls=True)
    (info,) = announcer.service_infos(["192.0.2.7"])
    assert info.decoded_properties["control_tls"] == "true"


class RecordingZeroconf:
    """Stands in for AsyncZeroconf, which would multicast on every interface: it records what is registered."""

    registered: ClassVar[list[str]] = []

    def __init__(self, **_options: object) -> None:
        pass

    async def async_register_service(self, info: AsyncServiceInfo) -> None:
        self.registered.append(info.type)

    async def async_unregister_all_services(self) -> None:
        pass

    async def async_close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("mode", "announced"),
    [("off", []), ("whisper-gpu", ["_whisper-gpu._tcp.local."])],
)
async def test_off_announces_nothing(monkeypatch: pytest.MonkeyPatch, mode: str, announced: list[str]) -> None:
    """`off` registers no service at all; the `whisper-gpu` case shows the recorder would have seen one."""
    monkeypatch.setattr(discovery, "AsyncZeroconf", RecordingZeroconf)
    monkeypatch.setattr(RecordingZeroconf, "registered", [])
    announcer = Announcer(mode, "0123456789abcdef", "192.0.2.7", 10300, 10301)
    await announcer.start()
    await announcer.close()
    assert RecordingZeroconf.registered == announced


def test_a_fixed_listen_address_is_the_announced_one() -> None:
    announcer = Announcer("whisper-gpu", "0123456789abcdef", "192.0.2.7", 10300, 10301)
    assert announcer._addresses() == ["192.0.2.7"]
