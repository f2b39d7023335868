"""Where settings come from, and what happens to invalid ones, through the real console script."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.server import ServerProcess, run_cli


def test_precedence_is_flag_then_prefixed_then_bare_then_default(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(
        args=["--compute-type", "int8", "--beam-size", "2"],
        env={
            "WHISPER_GPU_BEAM_SIZE": "3",
            "BEAM_SIZE": "4",
            "WHISPER_GPU_VAD_THRESHOLD": "0.25",
            "VAD_THRESHOLD": "0.75",
            "SPEECH_PAD_MS": "123",
            "LANGUAGE": "en_US:en",  # a desktop session's locale list, not a Whisper language
        },
    )
    _, body = server.get("/api/v1/settings")
    settings, source = body["settings"], body["source"]
    assert (settings["beam_size"], source["beam_size"]) == (2, "flag")
    assert (settings["vad_threshold"], source["vad_threshold"]) == (0.25, "env")
    assert (settings["speech_pad_ms"], source["speech_pad_ms"]) == (123, "env")
    assert (settings["min_speech_duration_ms"], source["min_speech_duration_ms"]) == (250, "default")
    assert (settings["language"], source["language"]) == ("en", "default")
    ignored = [line for line in server.log().splitlines() if "LANGUAGE=en_US:en" in line]
    assert len(ignored) == 1
    assert "not a Whisper language" in ignored[0]


def test_a_bare_language_that_is_a_whisper_code_is_used(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(model="base", args=["--compute-type", "int8"], env={"LANGUAGE": "de"})
    _, body = server.get("/api/v1/settings")
    assert (body["settings"]["language"], body["source"]["language"]) == ("de", "env")


def test_the_seed_configmap_works_unchanged(start_server: Callable[..., ServerProcess]) -> None:
    seed = {
        "MODEL": "tiny.en",
        "LANGUAGE": "en",
        "COMPUTE_TYPE": "float16",  # the seed's GPU value: a CPU falls back to int8 and says so
        "BEAM_SIZE": "5",
        "VAD_THRESHOLD": "0.5",
        "MIN_SPEECH_DURATION_MS": "250",
        "MAX_SPEECH_DURATION_S": "30",
        "SPEECH_PAD_MS": "400",
    }
    server = start_server(model="", env=seed)
    _, status = server.get("/api/v1/status")
    assert status["model"] == {**status["model"], "name": "tiny.en", "compute_type": "int8", "device": "cpu"}
    assert "cpu cannot compute in float16; using int8 instead" in server.log()
    _, body = server.get("/api/v1/settings")
    assert body["settings"]["compute_type"] == "float16"
    assert body["source"]["model"] == "env"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--beam-size", "11"], {}, "BEAM_SIZE (--beam-size): must be an integer from 1 to 10, got '11'"),
        (["--beam-size", "five"], {}, "BEAM_SIZE (--beam-size): must be an integer from 1 to 10, got 'five'"),
        ([], {"VAD_THRESHOLD": "loud"}, "VAD_THRESHOLD (--vad-threshold): must be a number from 0 to 1"),
        ([], {"WHISPER_GPU_COMPUTE_TYPE": "int4"}, "COMPUTE_TYPE (--compute-type): must be one of auto, float16"),
        ([], {"MODEL": "huge"}, "MODEL (--model): must be a model name (tiny, tiny.en, base"),
        (["--language", "klingon"], {}, "LANGUAGE (--language): must be a Whisper language code"),
        (["--device", "gpu"], {}, "DEVICE (--device): must be auto, cpu, cuda or cuda:N"),
        ([], {"OFFLINE": "maybe"}, "OFFLINE (--offline): must be true or false"),
        (["--wyoming-port", "70000"], {}, "WYOMING_PORT (--wyoming-port): must be an integer from 1 to 65535"),
        (["--zeroconf", "avahi"], {}, "ZEROCONF (--zeroconf): must be one of whisper-gpu, wyoming, off"),
        (
            ["--model-cache-limit-mb", "-1"],
            {},
            "MODEL_CACHE_LIMIT_MB (--model-cache-limit-mb): must be an integer of at least 0, got '-1'",
        ),
        ([], {"ALLOW_MODEL_PATHS": "sometimes"}, "ALLOW_MODEL_PATHS (--allow-model-paths): must be true or false"),
        ([], {"MODEL": "/no/such/model"}, "MODEL (--model): must be a model name"),
    ],
)
def test_an_invalid_setting_stops_the_server_with_a_message(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_cli("serve", "--data-dir", str(tmp_path), *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "server_id").exists()  # stopped before doing anything


def test_a_missing_token_file_stops_the_server(tmp_path: Path) -> None:
    result = run_cli("serve", "--data-dir", str(tmp_path), "--control-token-file", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "CONTROL_TOKEN_FILE" in result.stderr
    assert "cannot be read" in result.stderr


def test_a_device_this_machine_lacks_stops_the_server(tmp_path: Path) -> None:
    result = run_cli("serve", "--data-dir", str(tmp_path), "--device", "cuda:0", "--model", "tiny.en", "--offline")
    assert result.returncode == 2
    assert "device cuda:0 is not available" in result.stderr


def test_token_is_generated_once_kept_private_and_printed_by_the_cli(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "tokens"
    assert run_cli("token", "--data-dir", str(data_dir)).returncode == 1  # none yet
    server = start_server(data_dir=data_dir, token=None, args=["--compute-type", "int8"])
    token_file = data_dir / "control_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    printed = run_cli("token", "--data-dir", str(data_dir))
    assert printed.returncode == 0
    token = printed.stdout.strip()
    assert len(token) >= 32
    assert token == token_file.read_text().strip()
    assert token not in server.log()
    assert "whisper-gpu token" in server.log()
    assert server.request("GET", "/api/v1/auth", token=token)[0] == 204
    server.stop()
    second = start_server(data_dir=data_dir, token=None, args=["--compute-type", "int8"])
    assert second.request("GET", "/api/v1/auth", token=token)[0] == 204  # the same token after a restart


def test_token_from_the_environment_and_from_a_file(tmp_path: Path) -> None:
    assert run_cli("token", env={"CONTROL_TOKEN": "from-env"}).stdout.strip() == "from-env"
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    assert run_cli("token", env={"CONTROL_TOKEN_FILE": str(secret)}).stdout.strip() == "from-file"


def test_version_flag() -> None:
    from whisper_gpu import __version__  # noqa: PLC0415

    result = run_cli("--version")
    assert result.stdout.strip() == f"whisper-gpu {__version__}"


def test_an_unknown_model_is_refused_with_every_model_of_the_catalogue(tmp_path: Path) -> None:
    """The message lists the models the server can load by name: all of the catalogue, none forgotten."""
    from whisper_gpu.models import KNOWN_MODELS  # noqa: PLC0415 - the server's own catalogue

    result = run_cli("serve", "--data-dir", str(tmp_path), "--model", "no such model")

    assert result.returncode == 2
    listed = result.stderr.partition("a model name (")[2].partition(")")[0].split(", ")
    assert listed == list(KNOWN_MODELS)
