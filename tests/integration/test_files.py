"""The files HACS and hassfest check, checked here since neither runs in this CI."""

import ast
import importlib
import json
import re
import tomllib
from pathlib import Path

import homeassistant.components.wyoming as core_wyoming
import probatio
import pytest
from homeassistant.const import __version__ as ha_version
from homeassistant.core import HomeAssistant
from homeassistant.helpers.icon import async_get_icons
from homeassistant.loader import async_get_integration
from homeassistant.util.json import JsonObjectType
from PIL import Image

from custom_components.whisper_gpu.const import DOMAIN, LOAD_FAILURE_CODES, SETTINGS_ERROR_CODES
from custom_components.whisper_gpu.sensor import MODEL_STATES

ROOT = Path(__file__).parents[2]
INTEGRATION = ROOT / "custom_components" / "whisper_gpu"

# hassfest's order of the manifest's keys: domain, name, then alphabetical.
MANIFEST_KEYS = [
    "domain",
    "name",
    "codeowners",
    "config_flow",
    "dependencies",
    "documentation",
    "integration_type",
    "iot_class",
    "issue_tracker",
    "requirements",
    "version",
    "zeroconf",
]
# The keys HACS accepts in hacs.json (anything else fails its validation).
HACS_SCHEMA = probatio.Schema(
    {
        probatio.Required("name"): str,
        probatio.Optional("content_in_root"): bool,
        probatio.Optional("country"): probatio.Any(str, [str]),
        probatio.Optional("filename"): str,
        probatio.Optional("hacs"): str,
        probatio.Optional("hide_default_branch"): bool,
        probatio.Optional("homeassistant"): str,
        probatio.Optional("persistent_directory"): str,
        probatio.Optional("render_readme"): bool,
        probatio.Optional("zip_release"): bool,
    },
    extra=probatio.PREVENT_EXTRA,
)


def load(path: Path) -> JsonObjectType:
    """Read a JSON file."""
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def project_version() -> str:
    """Return the project's one version (pyproject.toml, or the package it names)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    if "version" in project:
        return str(project["version"])
    init = (ROOT / "server" / "whisper_gpu" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', init, re.MULTILINE)
    assert match is not None
    return match.group(1)


def test_manifest() -> None:
    """Every key HACS and Home Assistant require, in hassfest's order, and the project's version."""
    manifest = load(INTEGRATION / "manifest.json")
    assert list(manifest) == MANIFEST_KEYS
    assert manifest["domain"] == "whisper_gpu"
    assert manifest["version"] == project_version()
    assert manifest["integration_type"] == "service"
    assert manifest["iot_class"] == "local_polling"
    assert manifest["zeroconf"] == ["_whisper-gpu._tcp.local."]
    assert manifest["config_flow"] is True
    assert all(owner.startswith("@") for owner in manifest["codeowners"])
    assert all(manifest[key].startswith("https://") for key in ("documentation", "issue_tracker"))


def test_wyoming_requirement_matches_core() -> None:
    """The same wyoming pin as Home Assistant's own wyoming integration: never a conflict."""
    core = load(Path(core_wyoming.__file__).parent / "manifest.json")
    ours = load(INTEGRATION / "manifest.json")
    assert ours["requirements"] == [req for req in core["requirements"] if req.startswith("wyoming==")]


def test_hacs_json() -> None:
    """Only keys HACS accepts; the oldest Home Assistant tested is the one tested."""
    hacs = HACS_SCHEMA(load(ROOT / "hacs.json"))
    assert hacs["homeassistant"] == ha_version


def test_license() -> None:
    """An MIT licence (SPDX: MIT) with the project's copyright line."""
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 whisper-gpu developers" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_brand_icon() -> None:
    """A 256 x 256 PNG icon in brand/, which Home Assistant serves for custom integrations."""
    with Image.open(INTEGRATION / "brand" / "icon.png") as icon:
        assert icon.format == "PNG"
        assert icon.size == (256, 256)


async def test_integration_has_branding(hass: HomeAssistant) -> None:
    """Home Assistant sees the brand folder."""
    integration = await async_get_integration(hass, "whisper_gpu")
    assert integration.has_branding


def test_translations_are_the_strings() -> None:
    """translations/en.json ships the literal strings (no [%key:...] references)."""
    strings = (INTEGRATION / "strings.json").read_text()
    assert (INTEGRATION / "translations" / "en.json").read_text() == strings
    assert "[%key:" not in strings
    assert "http://" not in strings
    assert "https://" not in strings


def _translated_names(keyword_or_key: str) -> set[str]:
    """The names the integration's code gives as `keyword=...`, as `{"key": ...}` or as `x["key"] = ...`.

    Constant names (SETTING_MODEL, say) are resolved through the module that uses them.
    """
    names: set[str] = set()
    for path in INTEGRATION.glob("*.py"):
        module = importlib.import_module(f"custom_components.whisper_gpu.{path.stem}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            values: list[ast.expr] = []
            if isinstance(node, ast.keyword) and node.arg == keyword_or_key:
                values.append(node.value)
            elif isinstance(node, ast.Dict):
                values += [
                    value
                    for key, value in zip(node.keys, node.values, strict=True)
                    if isinstance(key, ast.Constant) and key.value == keyword_or_key
                ]
            elif isinstance(node, ast.Assign):
                values += [
                    node.value
                    for target in node.targets
                    if isinstance(target, ast.Subscript)
                    and isinstance(target.slice, ast.Constant)
                    and target.slice.value == keyword_or_key
                ]
            for value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    names.add(value.value)
                elif isinstance(value, ast.Name) and isinstance(getattr(module, value.id, None), str):
                    names.add(getattr(module, value.id))
    return names


def test_the_name_finder_sees_every_way_the_code_names_a_key() -> None:
    """The check below sees literals, constants and `errors["base"] = ...` assignments."""
    assert "invalid_auth" in _translated_names("base"), 'errors["base"] = "invalid_auth"'
    assert "cannot_connect" in _translated_names("base"), '{"base": "cannot_connect"}'
    assert "model" in _translated_names("translation_key"), "translation_key=SETTING_MODEL"
    assert "model_failed" in _translated_names("translation_key"), 'translation_key="model_failed"'


def test_every_error_and_reason_is_translated() -> None:
    """Each error, abort reason, step and translation key the code names has its text."""
    strings = load(INTEGRATION / "strings.json")
    config, options = strings["config"], strings["options"]
    assert isinstance(config, dict)
    assert isinstance(options, dict)
    for error in _translated_names("base") - {"unknown"}:
        assert error in config["error"] or error in options["error"], error
    for reason in _translated_names("reason"):
        assert reason in config["abort"] or reason in options["abort"], reason
    for step in _translated_names("step_id"):
        assert step in config["step"] or step in options["step"], step
    groups = [strings["exceptions"], strings["issues"], *strings["entity"].values()]
    for key in _translated_names("translation_key"):
        assert any(key in group for group in groups), key
    assert set(options["error"]) >= {*SETTINGS_ERROR_CODES, "unknown_setting_error"}
    for action in _translated_names("progress_action"):
        assert action in options["progress"], action
    # A failed model load: its reason on the options form and as the Model select's error.
    for key in ["load_timeout", *(f"model_{code}" for code in LOAD_FAILURE_CODES)]:
        assert key in options["error"], key
        assert key in strings["exceptions"], key


async def test_entity_icons(hass: HomeAssistant) -> None:
    """Each entity has its own icon; each model state one too."""
    icons = (await async_get_icons(hass, "entity", integrations=[DOMAIN]))[DOMAIN]
    strings = load(INTEGRATION / "strings.json")
    entities = strings["entity"]
    assert isinstance(entities, dict)
    named = {(platform, key) for platform, keys in entities.items() for key in keys}
    with_icons = {(platform, key) for platform, keys in icons.items() for key in keys}
    assert with_icons == named
    assert all(icon["default"].startswith("mdi:") for keys in icons.values() for icon in keys.values())
    assert set(icons["sensor"]["model_state"]["state"]) == set(MODEL_STATES)


@pytest.mark.parametrize("path", ["docs/home-assistant.md"])
def test_docs_exist(path: str) -> None:
    """The user guide is there."""
    assert (ROOT / path).read_text().startswith("#")
