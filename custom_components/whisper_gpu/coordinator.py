"""Polls a whisper-gpu server's status and keeps Home Assistant in step with it."""

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, override

from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import ConfigEntryAuthFailed
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.update_coordinator import DataUpdateCoordinator, UpdateFailed

from .api import (
    ServerInfo,
    ServerStatus,
    WhisperGpuAuthError,
    WhisperGpuClient,
    WhisperGpuError,
)
from .const import DOMAIN, LOGGER, SCAN_INTERVAL
from .data import WhisperGpuConfigEntry

STATE_FAILED = "failed"
# While the server loads or downloads a model, poll this often, so the new model shows as soon as it serves.
SWITCH_SCAN_INTERVAL = timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class WhisperGpuState:
    """One poll of the server."""

    status: ServerStatus
    settings: dict[str, Any]


def model_failed_issue_id(entry: WhisperGpuConfigEntry) -> str:
    """Return the id of the repair issue for a model that failed to load."""
    return f"model_failed_{entry.entry_id}"


class WhisperGpuCoordinator(DataUpdateCoordinator[WhisperGpuState]):
    """Reads GET /api/v1/status and /api/v1/settings of one server.

    On the first refresh and on every reconnect it also checks the token and
    reads the server's info again (the server may have been upgraded or its
    token changed while it was away). The settings it reads are the ones the
    entities show: the server keeps them, Home Assistant keeps no copy.
    """

    config_entry: WhisperGpuConfigEntry
    info: ServerInfo

    def __init__(
        self,
        hass: HomeAssistant,
        entry: WhisperGpuConfigEntry,
        client: WhisperGpuClient,
    ) -> None:
        """Set up the coordinator; it polls from the first refresh on."""
        super().__init__(
            hass,
            LOGGER,
            config_entry=entry,
            name=entry.title,
            update_interval=SCAN_INTERVAL,
        )
        self.client = client

    @override
    async def _async_setup(self) -> None:
        """Check the token and read the server's info before the first poll."""
        await self._async_connect()

    async def _async_connect(self) -> None:
        """Check the token and read the server's info."""
        try:
            await self.client.async_check_auth()
            self.info = await self.client.async_get_info()
        except WhisperGpuAuthError as err:
            raise ConfigEntryAuthFailed(translation_domain=DOMAIN, translation_key="invalid_auth") from err
        except WhisperGpuError as err:
            raise _update_failed(err) from err
        self._async_update_device()

    @callback
    def _async_update_device(self) -> None:
        """Show the version and the device of a server that came back upgraded or on other hardware."""
        registry = dr.async_get(self.hass)
        device = registry.async_get_device_by_identifier((DOMAIN, self.info.server_id), self.config_entry.entry_id)
        if device is not None and (device.sw_version, device.hw_version) != (self.info.version, self.info.device_name):
            registry.async_update_device(device.id, sw_version=self.info.version, hw_version=self.info.device_name)

    @override
    async def _async_update_data(self) -> WhisperGpuState:
        """Poll the server."""
        if not self.last_update_success:
            await self._async_connect()
        try:
            status = await self.client.async_get_status()
            settings = await self.client.async_get_settings()
            if self.data is not None and status.model != self.data.status.model:
                # Another model serves now: its languages may differ.
                self.info = await self.client.async_get_info()
        except WhisperGpuError as err:
            raise _update_failed(err) from err

        self._async_update_model_issue(status)
        switching = status.target is not None
        self.update_interval = SWITCH_SCAN_INTERVAL if switching else SCAN_INTERVAL
        return WhisperGpuState(status=status, settings=settings)

    @callback
    def _async_update_model_issue(self, status: ServerStatus) -> None:
        """Raise a repair issue while no model serves because the load failed; a failed switch is no issue.

        After a failed switch the old model keeps serving: the server is healthy, and the issue goes.
        """
        issue_id = model_failed_issue_id(self.config_entry)
        if status.state != STATE_FAILED or status.model is not None:
            ir.async_delete_issue(self.hass, DOMAIN, issue_id)
            return
        failure = status.last_failure
        ir.async_create_issue(
            self.hass,
            DOMAIN,
            issue_id,
            is_fixable=False,
            severity=ir.IssueSeverity.ERROR,
            translation_key="model_failed",
            translation_placeholders={
                "name": self.config_entry.title,
                "model": failure.model if failure else "-",
                "code": status.error_code or "unknown",
                "message": status.error_message or "",
            },
        )


def _update_failed(err: WhisperGpuError) -> UpdateFailed:
    """Wrap a client error for the coordinator, with a translated message."""
    return UpdateFailed(
        translation_domain=DOMAIN,
        translation_key="cannot_connect",
        translation_placeholders={"error": str(err)},
    )
