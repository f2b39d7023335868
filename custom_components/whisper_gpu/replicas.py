"""The replicas behind a server's host name, and the settings Home Assistant wants on every one of them.

A headless Kubernetes Service resolves to one address per replica, a plain host name to one, an IP address to
itself. Each address gets a client of its own (the control port; TLS still verified against the host name).

A settings change is made in two steps. The first replica that answers takes it first and so validates it: a
change it refuses (WhisperGpuSettingsError) fails for the user, and no other replica sees it. A change that loads a
model is validated by that load: it must serve the new model before anything else happens. Only then is the change
stored as the desired state (entry.options[CONF_DESIRED_SETTINGS], the one place) and sent to the other replicas.
Those that cannot take it now (down, refusing, busy) are retried on each poll by the coordinator, which brings
every replica whose settings differ back to the desired state.
"""

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from homeassistant.const import CONF_HOST
from homeassistant.core import HomeAssistant

from .api import (
    LoadFailure,
    ServerInfo,
    ServerStatus,
    WhisperGpuClient,
    WhisperGpuConnectionError,
    WhisperGpuError,
    WhisperGpuResponseError,
)
from .const import CONF_CONTROL_PORT, CONF_DESIRED_SETTINGS, LOGGER
from .data import WhisperGpuConfigEntry, create_client
from .model_load import async_wait_for_load, load_started

# A replica counts as ready while it serves, or can at once (a parked model comes back at the first request).
READY_STATES = frozenset({"ready", "parked"})


async def async_each[T](calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await calls to the replicas, at the same time; one (a single server) right in the caller's task, as before."""
    pending = list(calls)
    if len(pending) == 1:
        return [await pending[0]]
    return list(await asyncio.gather(*pending))


async def async_resolve(hass: HomeAssistant, host: str, port: int) -> list[str]:
    """Return every address of host, in a stable order: one per replica behind a headless Service.

    An IP address is itself. Only the family of the first answer is kept, so that a host with an IPv4 and an IPv6
    address is still one server. When the name does not resolve, the host itself is the one address, and
    connecting to it fails as it did before.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [host]
    try:
        answers = await hass.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        LOGGER.debug("Cannot resolve %s: %s", host, err)
        return [host]
    if not answers:
        return [host]
    family = answers[0][0]
    addresses = {str(answer[4][0]) for answer in answers if answer[0] == family}
    return sorted(addresses, key=ipaddress.ip_address)


@dataclass(slots=True)
class Replica:
    """One replica: its client and what its last poll and the last change sent to it said."""

    address: str
    client: WhisperGpuClient
    info: ServerInfo | None = None
    status: ServerStatus | None = None
    settings: dict[str, Any] | None = None
    # Why the last poll got no answer; None while it answers.
    poll_error: str | None = None
    # Whether the last poll failed because the control port's certificate is not trusted.
    untrusted: bool = False
    # Why the last change sent to it failed (refused, unreachable); None once it took one.
    apply_error: str | None = None
    connected: bool = False

    @property
    def answered(self) -> bool:
        """Whether the last poll got the replica's status and settings."""
        return self.poll_error is None and self.status is not None and self.settings is not None

    @property
    def ready(self) -> bool:
        """Whether it serves (or can at once) and took the settings last sent to it, as the last poll saw it."""
        return self.error is None and self.answered and self.status is not None and self.status.state in READY_STATES

    @property
    def error(self) -> str | None:
        """What is wrong with it, if anything."""
        return self.poll_error or self.apply_error

    def differs(self, desired: Mapping[str, Any]) -> dict[str, Any]:
        """Return the desired settings that this replica (as last read) does not have."""
        settings = self.settings or {}
        return {name: value for name, value in desired.items() if settings.get(name) != value}


@dataclass(slots=True, kw_only=True)
class SettingsChange:
    """A change the first replica took: its settings now, and the task that completes the change.

    `done` follows the model load the change started (if any) on that replica, then stores the change as desired
    and sends it to the other replicas; it returns the load's failure (nothing stored, nothing sent), or None.
    """

    client: WhisperGpuClient
    settings: dict[str, Any]
    loading: bool
    done: asyncio.Task[LoadFailure | None]


@dataclass(slots=True)
class ReplicaSet:
    """The replicas behind an entry's host name, re-resolved on each refresh (replicas come and go)."""

    hass: HomeAssistant
    entry: WhisperGpuConfigEntry
    replicas: dict[str, Replica] = field(default_factory=dict)
    # Held from the first replica taking a change until the others were sent it: polls do not reconcile meanwhile.
    change_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def desired(self) -> dict[str, Any]:
        """The settings Home Assistant wants on every replica: those the user chose in it."""
        return dict(self.entry.options.get(CONF_DESIRED_SETTINGS) or {})

    async def async_refresh(self) -> list[Replica]:
        """Resolve the host name again; return the replicas in address order (new ones added, gone ones dropped)."""
        addresses = await async_resolve(self.hass, self.entry.data[CONF_HOST], self.entry.data[CONF_CONTROL_PORT])
        self.replicas = {
            address: self.replicas.get(address) or Replica(address, create_client(self.hass, self.entry.data, address))
            for address in addresses
        }
        return list(self.replicas.values())

    async def async_read(self) -> tuple[WhisperGpuClient, ServerInfo, dict[str, Any]]:
        """Return the info and settings of the first replica that answers, with its client (for the options form)."""
        error: WhisperGpuError = WhisperGpuConnectionError("No replica")
        for replica in await self.async_refresh():
            try:
                return replica.client, await replica.client.async_get_info(), await replica.client.async_get_settings()
            except WhisperGpuError as err:
                error = err
        raise error

    async def async_start_change(self, changes: Mapping[str, Any]) -> SettingsChange:
        """Send the change to the first replica that answers; return what it did and the task that completes it.

        Raises WhisperGpuSettingsError when that replica refuses the change (no other replica is sent it),
        WhisperGpuAuthError when it rejects the token, and the last replica's error when none answers.
        """
        await self.change_lock.acquire()
        try:
            return await self._async_send_first(changes)
        except BaseException:
            self.change_lock.release()
            raise

    async def _async_send_first(self, changes: Mapping[str, Any]) -> SettingsChange:
        """Send the change to the replicas in turn until one answers; start the task that completes it."""
        error: WhisperGpuError = WhisperGpuConnectionError("No replica")
        for first in await self.async_refresh():
            client = first.client
            try:
                before = (await client.async_get_status()).last_failure
                settings = await client.async_update_settings(changes)
                loading = load_started(await client.async_get_status(), before)
            except (WhisperGpuConnectionError, WhisperGpuResponseError) as err:
                # Down or broken: the next replica validates the change; this one is retried on the polls.
                first.apply_error = str(err)
                error = err
                continue
            first.apply_error = None
            first.settings = settings
            done = self.hass.async_create_task(
                self._async_complete_change(first, changes, settings, before=before, loading=loading),
                name=f"whisper_gpu change {self.entry.entry_id}",
            )
            return SettingsChange(client=client, settings=settings, loading=loading, done=done)
        raise error

    async def _async_complete_change(
        self,
        first: Replica,
        changes: Mapping[str, Any],
        settings: Mapping[str, Any],
        *,
        before: LoadFailure | None,
        loading: bool,
    ) -> LoadFailure | None:
        """Wait for the first replica's load; when it serves, store the change as desired and send it to the rest."""
        try:
            if loading and (failure := await async_wait_for_load(first.client, before)) is not None:
                return failure
            # The values as the first replica took them (the server may normalise), so that polls compare alike.
            accepted = {name: settings.get(name, value) for name, value in changes.items()}
            desired = {**self.desired, **accepted}
            self.hass.config_entries.async_update_entry(
                self.entry, options={**self.entry.options, CONF_DESIRED_SETTINGS: desired}
            )
            others = [replica for replica in self.replicas.values() if replica is not first]
            await async_each(self.async_apply(replica, accepted) for replica in others)
            return None
        finally:
            self.change_lock.release()

    async def async_apply(self, replica: Replica, changes: Mapping[str, Any]) -> bool:
        """Send settings to one replica; record why it failed (retried on the next poll). Return whether it took them.

        The replica is connected again at the next poll: a rejected token starts reauthentication there. The same
        failure again is logged at debug level only, so that a replica that keeps refusing does not fill the log.
        """
        try:
            replica.settings = await replica.client.async_update_settings(changes)
        except WhisperGpuError as err:
            level = logging.DEBUG if replica.apply_error == str(err) else logging.WARNING
            LOGGER.log(level, "Replica %s did not take the settings %s: %s", replica.address, dict(changes), err)
            replica.apply_error = str(err)
            replica.connected = False
            return False
        replica.apply_error = None
        return True
