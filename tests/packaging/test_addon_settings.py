"""The add-on's options are server settings: same names, types, ranges and allowed values."""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

from whisper_gpu.models import KNOWN_MODELS

OPTION_TYPE = re.compile(r"^(?P<kind>int|float|bool|str|list)(?:\((?P<args>.*)\))?\??$")
KINDS = {"int": int, "float": float, "bool": bool, "str": str, "list": str}
# What an add-on user must be able to set, and what the add-on decides for them.
USER_FACING = {
    "model", "language", "compute_type", "beam_size", "vad_threshold", "min_speech_duration_ms",
    "max_speech_duration_s", "speech_pad_ms", "endpointing", "end_of_speech_s", "log_transcripts",
}  # fmt: skip
NOT_OPTIONS = {"wyoming_port", "control_port", "host", "data_dir", "control_token", "control_token_file", "device"}
CPU_COMPUTE_TYPES = {"auto", "int8", "int8_float32", "float32"}


def parse_type(element: str) -> tuple[type, str | None]:
    match = OPTION_TYPE.match(element)
    assert match, f"{element!r} is not a plain option type"
    return KINDS[match.group("kind")], match.group("args")


def test_every_option_is_a_server_setting(addon_config: dict[str, Any], server_settings: dict[str, Any]) -> None:
    unknown = set(addon_config["schema"]) - set(server_settings)
    assert not unknown, f"options the server has no setting for: {sorted(unknown)}"
    for name in addon_config["schema"]:
        assert server_settings[name].name == name
        assert server_settings[name].env == name.upper()


def test_options_cover_the_user_facing_settings(addon_config: dict[str, Any]) -> None:
    assert set(addon_config["schema"]) >= USER_FACING
    assert not set(addon_config["schema"]) & NOT_OPTIONS, "ports, data directory, token and device are fixed"


def test_option_types_and_ranges_are_the_servers(addon_config: dict[str, Any], server_settings: dict[str, Any]) -> None:
    for name, element in addon_config["schema"].items():
        spec = server_settings[name]
        kind, args = parse_type(element)
        assert kind is spec.kind, f"{name}: the add-on says {kind.__name__}, the server {spec.kind.__name__}"
        if kind in (int, float):
            low, high = (float(part) for part in args.split(","))
            assert (low, high) == (spec.minimum, spec.maximum), f"{name}: range differs from the server's"


def _choices(element: str) -> list[str]:
    _, args = parse_type(element)
    assert element.startswith("list("), element
    return args.split("|")


def test_every_listed_value_is_accepted_by_the_server(
    addon_config: dict[str, Any], server_settings: dict[str, Any]
) -> None:
    for name, element in addon_config["schema"].items():
        if element.startswith("list("):
            for choice in _choices(element):
                assert server_settings[name].validate(choice) == choice, f"{name}={choice}"


def test_model_list_is_every_known_model(addon_config: dict[str, Any], settings_module: ModuleType) -> None:
    assert _choices(addon_config["schema"]["model"]) == list(KNOWN_MODELS)


def test_language_list_is_every_whisper_language(addon_config: dict[str, Any], settings_module: ModuleType) -> None:
    assert _choices(addon_config["schema"]["language"]) == ["auto", *settings_module.WHISPER_LANGUAGES]


def test_compute_types_are_those_a_cpu_runs(addon_config: dict[str, Any], settings_module: ModuleType) -> None:
    offered = set(_choices(addon_config["schema"]["compute_type"]))
    assert offered <= set(settings_module.COMPUTE_TYPES)
    assert offered <= CPU_COMPUTE_TYPES, "Home Assistant OS has no NVIDIA GPU: float16 would fall back or fail"


def test_defaults_are_valid_settings_and_cpu_friendly(
    addon_config: dict[str, Any], server_settings: dict[str, Any]
) -> None:
    for name, value in addon_config["options"].items():
        spec = server_settings[name]
        assert spec.validate(value) == value, f"{name}={value!r}"
    assert addon_config["options"]["compute_type"] == "int8"
