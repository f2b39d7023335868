"""Following a model load, which a settings change starts on the server, to its end."""

import asyncio

from .api import LoadFailure, ServerStatus, WhisperGpuClient
from .const import LOAD_FAILURE_CODES

# How often the status is read while a load runs, and how long a load (a download included) may take.
LOAD_POLL_INTERVAL = 0.5
LOAD_TIMEOUT = 600.0


async def async_wait_for_load(client: WhisperGpuClient, before: LoadFailure | None) -> LoadFailure | None:
    """Wait until the server's load has ended; return its failure, or None when the new model serves (or none ran).

    `before` is the failure the status reported before the change: a load that fails reports a new one, and a
    load that succeeds clears it. Raises TimeoutError after LOAD_TIMEOUT and WhisperGpuError when the status
    cannot be read.
    """
    async with asyncio.timeout(LOAD_TIMEOUT):
        # The server's state is read over HTTP: nothing in this process could be waited on instead.
        while (status := await client.async_get_status()).target is not None:  # noqa: ASYNC110
            await asyncio.sleep(LOAD_POLL_INTERVAL)
    failure = status.last_failure
    return failure if failure is not None and failure != before else None


def load_started(status: ServerStatus, before: LoadFailure | None) -> bool:
    """Whether a change started a model load: one runs now, or one already failed.

    The server shows the load's target as soon as it accepts the change, so the status read right after the
    change tells; a load that failed before that read left a new failure.
    """
    return status.target is not None or status.last_failure != before


def load_failure_key(failure: LoadFailure) -> str:
    """Return the translation key (a form error and an exception) that explains a failed load."""
    return f"model_{failure.code if failure.code in LOAD_FAILURE_CODES else 'load_failed'}"


def load_failure_placeholders(failure: LoadFailure) -> dict[str, str]:
    """Return the placeholders of a failed load's text: the model and the server's own words."""
    return {"model": failure.model, "message": failure.message.rstrip(".")}
