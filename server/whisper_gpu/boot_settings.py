"""The values in force at start: a flag, else the environment, else the schema's default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import ENV_PREFIX, SETTINGS, SettingSpec, Source, is_locale_list


@dataclass
class ResolvedSettings:
    """The effective values and, for each, where it came from."""

    values: dict[str, Any]
    sources: dict[str, Source]
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; every flag defaults to None so that an absent flag is told apart."""
    group = parser.add_argument_group("settings (flag, else WHISPER_GPU_<NAME>, else <NAME>, else default)")
    for spec in SETTINGS.values():
        if spec.kind is bool:
            group.add_argument(spec.flag, action=argparse.BooleanOptionalAction, default=None, help=spec.description)
        else:
            metavar = "TOKEN" if spec.secret else spec.name.upper()
            group.add_argument(spec.flag, default=None, metavar=metavar, help=spec.description)


def resolve_settings(flags: Mapping[str, Any], environ: Mapping[str, str]) -> ResolvedSettings:
    """Apply precedence: flag, then WHISPER_GPU_<NAME>, then bare <NAME>, then the default.

    Raises SettingError naming the setting and what it allows.
    """
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    notes: list[str] = []
    for name, spec in SETTINGS.items():
        flag_value = flags.get(name)
        if flag_value is not None:
            values[name] = spec.validate(flag_value) if isinstance(flag_value, bool) else spec.parse(str(flag_value))
            sources[name] = Source.FLAG
            continue
        text, note = _from_environment(spec, environ)
        if note:
            notes.append(note)
        if text is None:
            values[name] = spec.default
            sources[name] = Source.DEFAULT
            continue
        values[name] = spec.parse(text)
        sources[name] = Source.ENV
    if not values["data_dir"]:
        values["data_dir"] = str(default_data_dir(environ))
    return ResolvedSettings(values, sources, notes)


def _from_environment(spec: SettingSpec, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The text for a setting from the environment, and a note for the log when a value is skipped."""
    prefixed = ENV_PREFIX + spec.env
    if environ.get(prefixed, "").strip():
        return environ[prefixed], None
    bare = environ.get(spec.env, "").strip()
    if not bare:
        return None, None
    if spec.name == "language" and is_locale_list(bare):
        return None, f"Ignoring LANGUAGE={bare}: a locale list, not a Whisper language (set WHISPER_GPU_LANGUAGE)"
    return bare, None


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """`/data` when it is writable (containers), else the user's data directory."""
    container_data = Path("/data")
    if container_data.is_dir() and os.access(container_data, os.W_OK):
        return container_data
    xdg = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "whisper-gpu"
