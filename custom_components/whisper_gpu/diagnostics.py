"""Diagnostics of a whisper-gpu entry, with the token, the address and the CA certificate redacted.

The CA certificate is public, but long: only whether one is set shows.
"""

from dataclasses import asdict
from typing import Any

from homeassistant.components.diagnostics import REDACTED, async_redact_data
from homeassistant.const import CONF_HOST, CONF_TOKEN
from homeassistant.core import HomeAssistant

from .const import CONF_CA_PEM
from .data import WhisperGpuConfigEntry

# An empty CA (none given) stays "", one that is set shows as redacted.
TO_REDACT = {CONF_HOST, CONF_TOKEN, CONF_CA_PEM}


async def async_get_config_entry_diagnostics(
    hass: HomeAssistant,  # noqa: ARG001
    entry: WhisperGpuConfigEntry,
) -> dict[str, Any]:
    """Return the entry (with the desired settings), the server's info, its last status and its replicas."""
    data = entry.runtime_data
    coordinator = data.coordinator
    return {
        "entry": async_redact_data(entry.as_dict(), TO_REDACT),
        "server": {
            "info": coordinator.info.raw,
            "status": coordinator.data.status.raw,
            "settings": coordinator.data.settings,
            "last_update_success": coordinator.last_update_success,
        },
        # Each replica behind the host name: its address (redacted where it is the host itself), what it serves,
        # whether it has the desired settings, and why not.
        "replicas": [
            {
                "address": REDACTED if replica.address == entry.data[CONF_HOST] else replica.address,
                "state": replica.status.state if replica.status else None,
                "model": replica.status.model if replica.status else None,
                "settings": replica.settings,
                "in_step": replica.in_step,
                "error": replica.error,
            }
            for replica in coordinator.data.replicas
        ],
        "wyoming_asr": asdict(data.asr),
    }
