"""Who this server is to its clients: an id that survives address changes, and the control API's bearer token."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .boot_settings import ResolvedSettings
from .files import write_atomically

_LOGGER = logging.getLogger(__name__)

SERVER_ID_FILE = "server_id"
TOKEN_FILE = "control_token"  # noqa: S105 - a file name, not a secret


def load_or_create_server_id(data_dir: Path) -> str:
    """A random id made on first start and kept, so Home Assistant knows the server when its address changes."""
    path = data_dir / SERVER_ID_FILE
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    server_id = uuid.uuid4().hex
    write_atomically(path, server_id + "\n")
    return server_id


class TokenError(ValueError):
    """The control token cannot be read."""


def load_or_create_token(settings: ResolvedSettings | Mapping[str, Any], data_dir: Path) -> str:
    """`CONTROL_TOKEN`, else the file `CONTROL_TOKEN_FILE`, else one generated once into `DATA_DIR` (0600)."""
    if settings["control_token"]:
        return str(settings["control_token"])
    if settings["control_token_file"]:
        path = Path(settings["control_token_file"])
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            msg = f"CONTROL_TOKEN_FILE {path} cannot be read: {err.strerror}"
            raise TokenError(msg) from err
        if not token:
            msg = f"CONTROL_TOKEN_FILE {path} is empty"
            raise TokenError(msg)
        return token
    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    if not token:
        token = secrets.token_urlsafe(32)
        write_atomically(path, token + "\n", mode=0o600)
        _LOGGER.info("Generated a control token in %s; `whisper-gpu token` prints it", path)
    return token
