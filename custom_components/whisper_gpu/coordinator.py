"""Polls a whisper-gpu server's replicas, keeps Home Assistant in step with them and them with its settings."""

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
    WhisperGpuCertificateError,
    WhisperGpuClient,
    WhisperGpuError,
)
from .const import DOMAIN, LOGGER, SCAN_INTERVAL, SETTING_MODEL
from .data import WhisperGpuConfigEntry, create_client
from .replicas import READY_STATES, Replica, ReplicaSet, async_each

STATE_FAILED = "failed"
# While the server loads or downloads a model, poll this often, so the new model shows as soon as it serves.
SWITCH_SCAN_INTERVAL = timedelta(seconds=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaState:
    """One replica as the last poll saw it."""

    address: str
    status: ServerStatus | None
    settings: dict[str, Any] | None
    in_step: bool
    error: str | None

    @property
    def ready(self) -> bool:
        """Whether it serves (or can at once)."""
        return self.error is None and self.status is not None and self.status.state in READY_STATES


@dataclass(frozen=True, slots=True, kw_only=True)
class WhisperGpuState:
    """One poll of the server: of its first replica that answered, and of every replica."""

    status: ServerStatus
    settings: dict[str, Any]
    replicas: tuple[ReplicaState, ...] = ()

    @property
    def answered(self) -> list[ReplicaState]:
        """The replicas that answered the poll, in address order."""
        return [replica for replica in self.replicas if replica.status is not None and replica.error is None] or [
            ReplicaState(address="", status=self.status, settings=self.settings, in_step=True, error=None)
        ]


def model_failed_issue_id(entry: WhisperGpuConfigEntry) -> str:
    """Return the id of the repair issue for a model that failed to load."""
    return f"model_failed_{entry.entry_id}"


def certificate_issue_id(entry: WhisperGpuConfigEntry) -> str:
    """Return the id of the repair issue for a control port whose certificate is not trusted."""
    return f"untrusted_certificate_{entry.entry_id}"


def replica_issue_id(entry: WhisperGpuConfigEntry, address: str) -> str:
    """Return the id of the repair issue for a replica that is down or not in step with the desired settings."""
    return f"replica_{entry.entry_id}_{address}"


class WhisperGpuCoordinator(DataUpdateCoordinator[WhisperGpuState]):
    """Polls GET /api/v1/status and /api/v1/settings of every replica behind the server's host name.

    The host name is resolved again on every poll (replicas come and go). A replica is connected when it first
    answers and after it was away: the token is checked and its info read again (it may have been upgraded or its
    token changed meanwhile). The entities show the service as a whole: its first replica that answers, with the
    replicas' states and models where they differ. While several replicas run, each one whose settings differ from
    the desired settings (those the user chose in Home Assistant, see replicas.py) is sent them again, and each
    one that is down or did not take them has a repair issue, until it is in step. A single server is left as the
    operator sets it: Home Assistant changes it only when the user does.
    """

    config_entry: WhisperGpuConfigEntry
    info: ServerInfo

    def __init__(self, hass: HomeAssistant, entry: WhisperGpuConfigEntry) -> None:
        """Set up the coordinator; it polls from the first refresh on."""
        super().__init__(
            hass,
            LOGGER,
            config_entry=entry,
            name=entry.title,
            update_interval=SCAN_INTERVAL,
        )
        self.replica_set = ReplicaSet(hass, entry)
        # Wyoming to a single server, and while no replica is known to be ready, goes through the host name.
        self.service_client = create_client(hass, entry.data)
        # Which ready replica the next transcription starts on (round robin).
        self._turn = 0
        self._replica_issues: set[str] = set()

    @property
    def server_id(self) -> str:
        """The id of the entry's device and entities: the server's id (the first replica's when it was added)."""
        return self.config_entry.unique_id or self.info.server_id

    @property
    def clients(self) -> list[WhisperGpuClient]:
        """The clients of the replicas that answered the last poll, in address order."""
        replicas = self.replica_set.replicas
        return [replicas[replica.address].client for replica in self.data.answered if replica.address in replicas]

    def transcription_clients(self) -> list[WhisperGpuClient]:
        """Where the next transcription goes: the client to start on, then the one to try again on, if any.

        With several replicas it starts on one of those that were ready at the last poll (as the Ready replicas
        sensor counts them), in turn, so that the requests are spread over them, and goes on to the next ready one
        when that replica fails the request. A replica that was down or loading at the last poll, or did not take
        the settings last sent to it, gets none (the host name may resolve to it first). With a single server, or
        while no replica is known to be ready, it goes through the host name, with no second try.
        """
        replicas = self.replica_set.replicas
        ready = [replica.client for replica in replicas.values() if replica.ready] if len(replicas) > 1 else []
        if not ready:
            return [self.service_client]
        start = self._turn % len(ready)
        self._turn += 1
        return (ready[start:] + ready[:start])[:2]

    async def _async_connect(self, replica: Replica) -> None:
        """Check the token and read the info of a replica that answers for the first time or again."""
        await replica.client.async_check_auth()
        replica.info = await replica.client.async_get_info()
        replica.connected = True

    async def _async_poll(self, replica: Replica) -> None:
        """Read one replica's status and settings; record why it did not answer."""
        try:
            if not replica.connected:
                await self._async_connect(replica)
            status = await replica.client.async_get_status()
            replica.settings = await replica.client.async_get_settings()
            if replica.status is not None and status.model != replica.status.model:
                # Another model serves now: its languages may differ.
                replica.info = await replica.client.async_get_info()
            replica.status = status
            replica.poll_error = None
            replica.untrusted = False
        except WhisperGpuAuthError:
            replica.connected = False
            raise
        except WhisperGpuError as err:
            replica.connected = False
            replica.poll_error = str(err)
            replica.untrusted = isinstance(err, WhisperGpuCertificateError)

    @override
    async def _async_update_data(self) -> WhisperGpuState:
        """Poll every replica; bring those that differ back to the desired settings."""
        replicas = await self.replica_set.async_refresh()
        try:
            await async_each(self._async_poll(replica) for replica in replicas)
        except WhisperGpuAuthError as err:
            raise ConfigEntryAuthFailed(translation_domain=DOMAIN, translation_key="invalid_auth") from err
        self._async_update_certificate_issue(replicas)
        answered = [replica for replica in replicas if replica.answered]
        if not answered:
            raise _update_failed(replicas[0].poll_error or "")

        desired = self.replica_set.desired
        if len(replicas) > 1 and desired and not self.replica_set.change_lock.locked():
            await self._async_reconcile(answered, desired)

        first = answered[0]
        assert first.info is not None  # noqa: S101 - read when it connected
        assert first.status is not None  # noqa: S101 - it answered
        assert first.settings is not None  # noqa: S101 - it answered
        self.info = first.info
        self._async_update_device()
        self._async_update_model_issue(first.status)
        self._async_update_replica_issues(replicas, desired)
        # A load that a change sent at this poll shows at the next (at the usual pace: a replica that cannot load the
        # desired model is sent it again each poll, not each second).
        switching = any(replica.status.target is not None for replica in answered if replica.status)
        self.update_interval = SWITCH_SCAN_INTERVAL if switching else SCAN_INTERVAL
        return WhisperGpuState(
            status=first.status,
            settings=first.settings,
            replicas=tuple(
                ReplicaState(
                    address=replica.address,
                    status=replica.status if replica.answered else None,
                    settings=replica.settings if replica.answered else None,
                    in_step=replica.answered and not replica.differs(desired),
                    error=replica.error,
                )
                for replica in replicas
            ),
        )

    async def _async_reconcile(self, answered: list[Replica], desired: dict[str, Any]) -> None:
        """Send the desired settings to each replica that differs and loads no model."""
        behind = [
            (replica, changes)
            for replica in answered
            if replica.status is not None and replica.status.target is None and (changes := replica.differs(desired))
        ]
        for replica, changes in behind:
            LOGGER.info("Replica %s differs from the desired settings in %s: sending them", replica.address, changes)
        await async_each(self.replica_set.async_apply(replica, changes) for replica, changes in behind)

    @callback
    def _async_update_device(self) -> None:
        """Show the version and the device of a server that came back upgraded or on other hardware."""
        registry = dr.async_get(self.hass)
        device = registry.async_get_device_by_identifier((DOMAIN, self.server_id), self.config_entry.entry_id)
        if device is not None and (device.sw_version, device.hw_version) != (self.info.version, self.info.device_name):
            registry.async_update_device(device.id, sw_version=self.info.version, hw_version=self.info.device_name)

    @callback
    def _async_update_replica_issues(self, replicas: list[Replica], desired: dict[str, Any]) -> None:
        """Raise a repair issue for each replica that is down or did not take the desired settings; clear the rest.

        With one replica there is nothing to tell apart: the entities show a server that is down.
        """
        failing = {
            replica.address: replica
            for replica in replicas
            if len(replicas) > 1 and (replica.error is not None or (replica.answered and replica.differs(desired)))
        }
        for address in self._replica_issues - failing.keys():
            self._async_set_issue(
                replica_issue_id(self.config_entry, address), translation_key="replica_out_of_step", placeholders=None
            )
        for address, replica in failing.items():
            self._async_set_issue(
                replica_issue_id(self.config_entry, address),
                translation_key="replica_out_of_step",
                placeholders={"address": address, "error": replica.error or _differs_text(replica, desired)},
                severity=ir.IssueSeverity.WARNING,
            )
        self._replica_issues = set(failing)

    @callback
    def async_delete_issues(self) -> None:
        """Remove the repair issues of the entry (it is unloaded)."""
        ir.async_delete_issue(self.hass, DOMAIN, model_failed_issue_id(self.config_entry))
        ir.async_delete_issue(self.hass, DOMAIN, certificate_issue_id(self.config_entry))
        for address in self._replica_issues:
            ir.async_delete_issue(self.hass, DOMAIN, replica_issue_id(self.config_entry, address))
        self._replica_issues = set()

    @callback
    def _async_update_certificate_issue(self, replicas: list[Replica]) -> None:
        """Raise a repair issue while the control port's certificate is not trusted; remove it once it is.

        A certificate renewed by another CA, or one that expired, otherwise shows only as unavailable entities.
        """
        untrusted = next((replica for replica in replicas if replica.untrusted), None)
        self._async_set_issue(
            certificate_issue_id(self.config_entry),
            translation_key="untrusted_certificate",
            placeholders={"address": untrusted.address, "error": untrusted.poll_error or ""} if untrusted else None,
        )

    @callback
    def _async_update_model_issue(self, status: ServerStatus) -> None:
        """Raise a repair issue while no model serves because the load failed; a failed switch is no issue.

        After a failed switch the old model keeps serving: the server is healthy, and the issue goes.
        """
        failure = status.last_failure
        self._async_set_issue(
            model_failed_issue_id(self.config_entry),
            translation_key="model_failed",
            placeholders={
                "model": failure.model if failure else "-",
                "code": status.error_code or "unknown",
                "message": status.error_message or "",
            }
            if status.state == STATE_FAILED and status.model is None
            else None,
        )

    @callback
    def _async_set_issue(
        self,
        issue_id: str,
        *,
        translation_key: str,
        placeholders: dict[str, str] | None,
        severity: ir.IssueSeverity = ir.IssueSeverity.ERROR,
    ) -> None:
        """Raise a repair issue of the entry with these placeholders (and its name), or remove it given None."""
        if placeholders is None:
            ir.async_delete_issue(self.hass, DOMAIN, issue_id)
            return
        ir.async_create_issue(
            self.hass,
            DOMAIN,
            issue_id,
            is_fixable=False,
            severity=severity,
            translation_key=translation_key,
            translation_placeholders={"name": self.config_entry.title, **placeholders},
        )


def _differs_text(replica: Replica, desired: dict[str, Any]) -> str:
    """Why a replica that answers lacks the desired settings: the load that failed there, else which differ."""
    failure = replica.status.last_failure if replica.status else None
    if failure is not None and failure.model == desired.get(SETTING_MODEL):
        return f"{failure.model}: {failure.code}, {failure.message}"
    return "settings differ: " + ", ".join(sorted(replica.differs(desired)))


def _update_failed(err: WhisperGpuError | str) -> UpdateFailed:
    """Wrap a client error for the coordinator, with a translated message."""
    return UpdateFailed(
        translation_domain=DOMAIN,
        translation_key="cannot_connect",
        translation_placeholders={"error": str(err)},
    )
