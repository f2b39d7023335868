"""The add-on's config.yaml, build.yaml, translations and images, checked against the Supervisor's rules.

The rules are those of home-assistant/supervisor (`supervisor/addons/validate.py`, `addons/options.py`,
`validate.py`), restated here: the Supervisor silently drops keys it does not know, and the add-on linter
rejects keys set to the default value.
"""

from __future__ import annotations

import fnmatch
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from packaging_support import ADDON, REPO, integration_domain, load_yaml

ARCHES = {"armhf", "armv7", "aarch64", "amd64", "i386"}
SLUG = re.compile(r"^[-_.A-Za-z0-9]+$")
PORT_KEY = re.compile(r"^\d+(?:/tcp|/udp)?$")
# One option type, as the Supervisor's options.py accepts them.
SCHEMA_ELEMENT = re.compile(
    r"^(?:bool|email|url|port"
    r"|device(?:\((?P<filter>subsystem=[a-z]+)\))?"
    r"|str(?:\((?P<s_min>\d+)?,(?P<s_max>\d+)?\))?"
    r"|password(?:\((?P<p_min>\d+)?,(?P<p_max>\d+)?\))?"
    r"|int(?:\((?P<i_min>\d+)?,(?P<i_max>\d+)?\))?"
    r"|float(?:\((?P<f_min>[\d.]+)?,(?P<f_max>[\d.]+)?\))?"
    r"|match\((?P<match>.*)\)"
    r"|list\((?P<list>.+)\))\??$"
)
BUILD_IMAGE = re.compile(r"^([a-zA-Z\-.:\d{}]+/)*?([\-\w{}]+)/([\-\w{}]+)(:[.\-\w{}]+)?$")

# Optional config keys and the value the Supervisor uses when the key is absent.
SUPERVISOR_DEFAULTS: dict[str, Any] = {
    "startup": "application",
    "boot": "auto",
    "init": True,
    "advanced": False,
    "stage": "stable",
    "ingress": False,
    "ingress_port": 8099,
    "ingress_stream": False,
    "panel_icon": "mdi:puzzle",
    "panel_admin": True,
    "host_network": False,
    "host_pid": False,
    "host_ipc": False,
    "host_uts": False,
    "host_dbus": False,
    "udev": False,
    "tmpfs": False,
    "map": [],
    "apparmor": True,
    "full_access": False,
    "audio": False,
    "video": False,
    "gpio": False,
    "usb": False,
    "uart": False,
    "devicetree": False,
    "kernel_modules": False,
    "realtime": False,
    "hassio_api": False,
    "hassio_role": "default",
    "homeassistant_api": False,
    "stdin": False,
    "legacy": False,
    "docker_api": False,
    "auth_api": False,
    "backup": "hot",
    "options": {},
    "schema": {},
    "ulimits": {},
    "timeout": 10,
    "journald": False,
    "breaking_versions": [],
}
# Keys without a default that the Supervisor knows.
SUPERVISOR_OTHER_KEYS = {
    "name", "version", "slug", "description", "arch", "machine", "url", "ports", "ports_description",
    "watchdog", "webui", "ingress_entry", "panel_title", "homeassistant", "devices", "environment",
    "privileged", "services", "discovery", "backup_exclude", "backup_pre", "backup_post", "restore_pre",
    "restore_post", "image",
}  # fmt: skip


class OptionError(ValueError):
    """An option value the Supervisor would refuse."""


def _convert(element: str, match: re.Match[str], value: Any) -> Any:
    kind = element.split("(", 1)[0].rstrip("?")
    if kind == "bool":
        if not isinstance(value, bool):
            raise OptionError("not a boolean")
        return value
    if kind == "list":
        if str(value) not in match.group("list").split("|"):
            raise OptionError(f"{value!r} not in the list")
        return str(value)
    if kind == "match":
        if not re.match(match.group("match"), str(value)):
            raise OptionError(f"{value!r} does not match")
        return str(value)
    try:
        return {"int": int, "float": float}.get(kind, str)(value)
    except (TypeError, ValueError) as err:
        raise OptionError(str(err)) from err


def validate_option(element: str, value: Any) -> Any:
    """Validate one option value the way the Supervisor does for the element types the add-on uses."""
    match = SCHEMA_ELEMENT.match(element)
    if not match:
        raise OptionError(f"unknown type {element!r}")
    if value is None:
        raise OptionError("missing")
    value = _convert(element, match, value)
    if isinstance(value, bool):
        return value
    bounds = {name[2:]: float(v) for name, v in match.groupdict().items() if name[1:2] == "_" and v}
    measure = len(value) if isinstance(value, str) else value
    if ("min" in bounds and measure < bounds["min"]) or ("max" in bounds and measure > bounds["max"]):
        raise OptionError(f"{value!r} out of range {bounds}")
    return value


def validate_options(schema: dict[str, str], options: dict[str, Any]) -> dict[str, Any]:
    """The options the add-on starts with, as the Supervisor validates them at install time."""
    result = {key: validate_option(schema[key], value) for key, value in options.items() if key in schema}
    missing = [key for key, element in schema.items() if key not in result and not element.endswith("?")]
    if missing:
        raise OptionError(f"missing options {missing}")
    return result


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_required_keys_are_valid(addon_config: dict[str, Any]) -> None:
    for key in ("name", "version", "slug", "description", "arch"):
        assert addon_config.get(key), f"config.yaml needs {key}"
    assert isinstance(addon_config["version"], str), "quote the version: YAML would read 1.10 as a number"
    assert SLUG.match(addon_config["slug"])
    assert set(addon_config["arch"]) <= ARCHES
    assert set(addon_config["arch"]) == {"amd64", "aarch64"}, "CTranslate2 has wheels for these two only"


def test_every_key_is_known_to_the_supervisor(addon_config: dict[str, Any]) -> None:
    unknown = set(addon_config) - set(SUPERVISOR_DEFAULTS) - SUPERVISOR_OTHER_KEYS
    assert not unknown, f"the Supervisor would silently drop {sorted(unknown)}"


def test_no_key_is_set_to_its_default(addon_config: dict[str, Any]) -> None:
    redundant = {
        key: value
        for key, value in addon_config.items()
        if key in SUPERVISOR_DEFAULTS and value == SUPERVISOR_DEFAULTS[key]
    }
    assert not redundant, f"remove keys set to the Supervisor's default (the add-on linter rejects them): {redundant}"


def test_s6_overlay_runs_as_pid_1(addon_config: dict[str, Any]) -> None:
    # The base image's s6-overlay v3 must be PID 1; Docker's tini (init: true) would break it.
    assert addon_config["init"] is False


def test_timeout_leaves_room_for_the_servers_shutdown_grace(
    addon_config: dict[str, Any], server_settings: dict[str, Any]
) -> None:
    timeout = addon_config.get("timeout", SUPERVISOR_DEFAULTS["timeout"])
    assert 10 <= timeout <= 300
    assert timeout > server_settings["shutdown_grace_s"].default


def test_discovery_announces_the_integration(addon_config: dict[str, Any]) -> None:
    assert addon_config["discovery"] == [integration_domain()], "Home Assistant routes a discovery to the integration"


def test_ports_are_the_servers_and_not_published(addon_config: dict[str, Any], server_settings: dict[str, Any]) -> None:
    ports = addon_config["ports"]
    assert all(PORT_KEY.match(key) for key in ports)
    expected = {
        f"{server_settings['wyoming_port'].default}/tcp": None,
        f"{server_settings['control_port'].default}/tcp": None,
    }
    assert ports == expected, "both server ports, with no host port unless the user sets one"


def test_schema_elements_are_supervisor_types(addon_config: dict[str, Any]) -> None:
    for key, element in addon_config["schema"].items():
        assert isinstance(element, str), f"{key}: options are flat values"
        assert SCHEMA_ELEMENT.match(element), f"{key}: the Supervisor does not know the type {element!r}"


def test_default_options_pass_the_schema(addon_config: dict[str, Any]) -> None:
    schema, options = addon_config["schema"], addon_config["options"]
    assert set(options) == set(schema), "every option has a default and a type, and nothing else"
    assert validate_options(schema, options) == options


@pytest.mark.parametrize(
    ("option", "value"),
    [("beam_size", 11), ("beam_size", 0), ("vad_threshold", 1.5), ("model", "huge"), ("log_transcripts", "yes")],
)
def test_schema_refuses_values_the_server_refuses(addon_config: dict[str, Any], option: str, value: Any) -> None:
    options = {**addon_config["options"], option: value}
    with pytest.raises(OptionError):
        validate_options(addon_config["schema"], options)


def _excluded(pattern_list: list[str], relative: str) -> bool:
    """Whether a path under /data is left out of a backup: glob patterns where `*` and `**` cross folders."""
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in pattern_list)


def test_backups_leave_out_models_and_keep_state(addon_config: dict[str, Any]) -> None:
    excludes = addon_config["backup_exclude"]
    # The model cache directory itself is skipped, so nothing under it is archived.
    assert _excluded(excludes, ".cache")
    assert _excluded(excludes, ".cache/models/base/model.bin")
    for kept in ("control_token", "server_id", "settings.json", "options.json"):
        assert not _excluded(excludes, kept), f"{kept} must survive a restore"


def test_translations_name_every_option_and_port(addon_config: dict[str, Any]) -> None:
    translations = load_yaml(ADDON / "translations" / "en.yaml")
    configuration = translations["configuration"]
    assert set(configuration) == set(addon_config["schema"])
    for key, text in configuration.items():
        assert text.get("name"), f"{key} has no name"
        assert text.get("description"), f"{key} has no description"
    assert set(translations["network"]) == set(addon_config["ports"])


def test_build_uses_a_glibc_base_for_every_arch(addon_config: dict[str, Any]) -> None:
    build = load_yaml(ADDON / "build.yaml")
    bases = build["build_from"]
    assert set(bases) == set(addon_config["arch"])
    for arch, image in bases.items():
        assert BUILD_IMAGE.match(image)
        assert image.startswith(f"ghcr.io/home-assistant/{arch}-base-debian:"), "CTranslate2 wheels need glibc"


def test_store_files_exist() -> None:
    for name in ("DOCS.md", "README.md", "CHANGELOG.md", "Dockerfile"):
        assert (ADDON / name).stat().st_size > 0, name


def test_icon_and_logo_are_store_sized_pngs() -> None:
    width, height = png_size(ADDON / "icon.png")
    assert width == height, "the icon is square"
    assert 128 <= width <= 256
    width, height = png_size(ADDON / "logo.png")
    assert width > height, "the logo is landscape"
    assert width <= 600


def test_repository_points_at_the_project(addon_config: dict[str, Any]) -> None:
    repository = load_yaml(REPO / "repository.yaml")
    assert repository["name"]
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    homepage = re.search(r'^Homepage = "([^"]+)"', pyproject, re.MULTILINE)
    assert homepage
    assert repository["url"] == homepage.group(1)
    assert addon_config["url"].startswith(repository["url"])
