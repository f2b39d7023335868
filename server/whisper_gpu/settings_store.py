"""Runtime settings changed through the control API, kept in `DATA_DIR/settings.json` across restarts."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .boot_settings import ResolvedSettings
from .files import write_atomically
from .models import is_model_path
from .settings import RUNTIME_SETTINGS, SETTINGS, SettingError, Source

_LOGGER = logging.getLogger(__name__)


class SettingsStore:
    """Runtime settings with their sources, kept in `DATA_DIR/settings.json` across restarts.

    Flags and environment values are boot values. Each stored change remembers the boot value it replaced;
    when the operator has since changed the boot value (a ConfigMap edit), the boot value wins.
    """

    FILE_NAME = "settings.json"

    def __init__(self, boot: ResolvedSettings, data_dir: Path) -> None:
        self._boot = boot
        self._path = data_dir / self.FILE_NAME
        self._values: dict[str, Any] = {name: boot.values[name] for name in RUNTIME_SETTINGS}
        self._sources: dict[str, Source] = {name: boot.sources[name] for name in RUNTIME_SETTINGS}
        self._overrides: dict[str, dict[str, Any]] = {}
        self._load()

    @property
    def path(self) -> Path:
        """Where changes are kept."""
        return self._path

    @property
    def values(self) -> dict[str, Any]:
        """Effective runtime values (a copy)."""
        return dict(self._values)

    @property
    def sources(self) -> dict[str, str]:
        """Where each runtime value came from."""
        return {name: str(source) for name, source in self._sources.items()}

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def changed_names(self, changes: Mapping[str, Any]) -> list[str]:
        """The names whose value a change would alter."""
        return [name for name, value in changes.items() if self._values[name] != value]

    def preview(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """The effective values once a change has been applied."""
        return {**self._values, **changes}

    def apply(self, changes: Mapping[str, Any]) -> list[str]:
        """Take validated values: save them (atomically) first, then change what is in force.

        Returns the names whose value changed; raises OSError (nothing changed) when the file cannot be written.
        """
        changed = self.changed_names(changes)
        if not changed:
            return changed
        overrides = dict(self._overrides)
        for name in changed:
            value = changes[name]
            if value == self._boot.values[name]:
                overrides.pop(name, None)
            else:
                overrides[name] = {"value": value, "boot": self._boot.values[name]}
        self._save(overrides)
        self._overrides = overrides
        for name in changed:
            self._values[name] = changes[name]
            self._sources[name] = Source.API if name in overrides else self._boot.sources[name]
        return changed

    def _load(self) -> None:
        try:
            stored = json.loads(self._path.read_text(encoding="utf-8"))
            overrides = stored["overrides"]
            if not isinstance(overrides, dict):
                raise TypeError("overrides is not an object")  # noqa: TRY301
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as err:
            _LOGGER.warning("Ignoring %s: unreadable (%s)", self._path, err)
            return
        for name, entry in overrides.items():
            if not self._accept_stored(name, entry):
                continue
            self._values[name] = entry["value"]
            self._sources[name] = Source.API
            self._overrides[name] = entry
        dropped = set(overrides) - set(self._overrides)
        if dropped:
            try:
                self._save(self._overrides)
            except OSError as err:
                _LOGGER.warning("Cannot rewrite %s without the dropped settings: %s", self._path, err)

    def _accept_stored(self, name: str, entry: Any) -> bool:
        if name not in RUNTIME_SETTINGS or not isinstance(entry, dict) or "value" not in entry:
            _LOGGER.warning("Dropping stored setting %s: not a runtime setting", name)
            return False
        boot_value = self._boot.values[name]
        if entry.get("boot") != boot_value:
            _LOGGER.info(
                "Dropping stored %s=%r: its boot value changed from %r to %r since it was set, and the boot value wins",
                name,
                entry["value"],
                entry.get("boot"),
                boot_value,
            )
            return False
        value = entry["value"]
        if name == "model" and isinstance(value, str) and is_model_path(value) and not self._boot["allow_model_paths"]:
            _LOGGER.warning("Dropping stored model %s: a directory, and ALLOW_MODEL_PATHS is off", value)
            return False
        try:
            SETTINGS[name].validate(value)
        except SettingError as err:
            _LOGGER.warning("Dropping stored setting %s: %s", name, err.message)
            return False
        return True

    def _save(self, overrides: Mapping[str, dict[str, Any]]) -> None:
        write_atomically(self._path, json.dumps({"version": 1, "overrides": overrides}, indent=2) + "\n")
