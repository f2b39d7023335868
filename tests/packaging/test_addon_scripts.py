"""The add-on's s6 services: the start script's settings and token, and the discovery message.

The scripts run here under bash with a stand-in `whisper-gpu` and a stand-in Supervisor.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Self

import pytest
from packaging_support import REPO, S6, tool

START = S6 / "whisper-gpu" / "run"
DISCOVERY = S6 / "discovery" / "run"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(not (BASH and shutil.which("jq")), reason="needs bash and jq (as in the base image)")

FAKE_SERVER = """#!/usr/bin/env bash
# Stand-in for the whisper-gpu CLI: records how it was called.
log="${FAKE_LOG:?}"
case "$1" in
  serve)
    env > "$log.env"
    echo "$@" > "$log.args"
    ;;
  health)
    count=$(( $(cat "$log.health" 2>/dev/null || echo 0) + 1 ))
    echo "$count" > "$log.health"
    [ "$count" -ge "${FAKE_HEALTHY_AFTER:-1}" ]
    ;;
  token)
    echo "token-from-cli"
    ;;
esac
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "whisper-gpu"
    fake.write_text(FAKE_SERVER, encoding="utf-8")
    fake.chmod(0o755)
    return bin_dir


def run_script(script: Path, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASH, str(script)], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def base_env(tmp_path: Path, fake_bin: Path) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return {
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(tmp_path / "fake"),
        "WHISPER_GPU_DATA_DIR": str(data),
        "WHISPER_GPU_ADDON_OPTIONS": str(data / "options.json"),
    }


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines() if "=" in line)


# ---- the start script ----------------------------------------------------------------------------------------


def test_start_passes_every_option_as_the_servers_setting(
    tmp_path: Path, fake_bin: Path, addon_config: dict[str, Any], server_settings: dict[str, Any], settings_module: Any
) -> None:
    env = base_env(tmp_path, fake_bin)
    # The options as the Supervisor writes them: defaults, with a few changed and floats written as floats.
    options = {**addon_config["options"], "model": "small.en", "beam_size": 3, "max_speech_duration_s": 30.0,
               "vad_threshold": 0.35, "log_transcripts": True, "language": "de"}  # fmt: skip
    Path(env["WHISPER_GPU_ADDON_OPTIONS"]).write_text(json.dumps(options), encoding="utf-8")

    result = run_script(START, env)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fake.args").read_text(encoding="utf-8").split() == ["serve"]
    started = read_env(tmp_path / "fake.env")
    for name, value in options.items():
        variable = settings_module.ENV_PREFIX + server_settings[name].env
        assert variable in started, f"{name} did not reach the server"
        assert server_settings[name].parse(started[variable]) == value, f"{name}: {started[variable]!r}"
    assert started["WHISPER_GPU_DATA_DIR"] == env["WHISPER_GPU_DATA_DIR"]


def test_start_makes_the_control_token_once(tmp_path: Path, fake_bin: Path, addon_config: dict[str, Any]) -> None:
    env = base_env(tmp_path, fake_bin)
    Path(env["WHISPER_GPU_ADDON_OPTIONS"]).write_text(json.dumps(addon_config["options"]), encoding="utf-8")
    token_file = Path(env["WHISPER_GPU_DATA_DIR"]) / "control_token"

    assert run_script(START, env).returncode == 0
    token = token_file.read_text(encoding="utf-8")
    assert len(token) == 64
    int(token, 16)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert read_env(tmp_path / "fake.env")["WHISPER_GPU_CONTROL_TOKEN_FILE"] == str(token_file)

    assert run_script(START, env).returncode == 0
    assert token_file.read_text(encoding="utf-8") == token, "a restart keeps the token Home Assistant has"


def test_start_keeps_an_existing_token(tmp_path: Path, fake_bin: Path, addon_config: dict[str, Any]) -> None:
    env = base_env(tmp_path, fake_bin)
    Path(env["WHISPER_GPU_ADDON_OPTIONS"]).write_text(json.dumps(addon_config["options"]), encoding="utf-8")
    token_file = Path(env["WHISPER_GPU_DATA_DIR"]) / "control_token"
    token_file.write_text("restored-from-backup\n", encoding="utf-8")

    assert run_script(START, env).returncode == 0
    assert token_file.read_text(encoding="utf-8") == "restored-from-backup\n"


def test_start_fails_without_options(tmp_path: Path, fake_bin: Path) -> None:
    env = base_env(tmp_path, fake_bin)

    result = run_script(START, env)

    assert result.returncode != 0
    assert "options" in result.stderr
    assert not (tmp_path / "fake.args").exists(), "the server must not start without its settings"


# ---- the discovery service -----------------------------------------------------------------------------------


class FakeSupervisor:
    """Answers POST /discovery like the Supervisor and records what it got."""

    def __init__(self, status: int) -> None:
        self.requests: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                owner.requests.append(
                    {
                        "path": self.path,
                        "authorization": self.headers.get("Authorization"),
                        "content_type": self.headers.get("Content-Type"),
                        "body": json.loads(self.rfile.read(length)),
                    }
                )
                body = json.dumps({"result": "ok", "data": {"uuid": "0" * 32}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def discovery_env(tmp_path: Path, fake_bin: Path) -> dict[str, str]:
    env = base_env(tmp_path, fake_bin)
    data = Path(env["WHISPER_GPU_DATA_DIR"])
    (data / "server_id").write_text("6f1c0d2e9a4b4e53a1d2b3c4d5e6f708\n", encoding="utf-8")
    (data / "control_token").write_text("a" * 64, encoding="utf-8")
    env |= {"SUPERVISOR_TOKEN": "supervisor-secret", "WHISPER_GPU_DISCOVERY_POLL_S": "0.05", "FAKE_HEALTHY_AFTER": "3"}
    return env


def test_discovery_waits_for_the_server_then_posts_whisper_gpu(
    tmp_path: Path, discovery_env: dict[str, str], server_settings: dict[str, Any]
) -> None:
    with FakeSupervisor(200) as supervisor:
        discovery_env["WHISPER_GPU_SUPERVISOR_URL"] = supervisor.url
        result = run_script(DISCOVERY, discovery_env)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fake.health").read_text(encoding="utf-8").strip() == "3", "posted before the server answered"
    assert len(supervisor.requests) == 1
    request = supervisor.requests[0]
    assert request["path"] == "/discovery"
    assert request["authorization"] == "Bearer supervisor-secret"
    assert request["content_type"] == "application/json"
    assert request["body"] == {
        "service": "whisper_gpu",
        "config": {
            "host": socket.gethostname(),
            "wyoming_port": server_settings["wyoming_port"].default,
            "control_port": server_settings["control_port"].default,
            "token": "a" * 64,
            "id": "6f1c0d2e9a4b4e53a1d2b3c4d5e6f708",
        },
    }


def test_a_refused_discovery_does_not_stop_the_add_on(discovery_env: dict[str, str]) -> None:
    with FakeSupervisor(500) as supervisor:
        discovery_env["WHISPER_GPU_SUPERVISOR_URL"] = supervisor.url
        result = run_script(DISCOVERY, discovery_env)

    assert result.returncode == 0, "a failing oneshot would stop the container (S6_BEHAVIOUR_IF_STAGE2_FAILS=2)"
    assert len(supervisor.requests) > 1, "retried"
    assert "by hand" in result.stderr


# ---- the s6-rc service tree ----------------------------------------------------------------------------------


def _git_mode(path: Path) -> str | None:
    listed = subprocess.run(
        ["git", "ls-files", "-s", "--", str(path.relative_to(REPO))],
        cwd=REPO, capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    return listed[0] if listed else None


def _assert_executable(path: Path) -> None:
    assert path.stat().st_mode & 0o111, f"{path.relative_to(REPO)} is not executable"
    mode = _git_mode(path)
    assert mode in (None, "100755"), f"{path.relative_to(REPO)} is committed without the executable bit"


def test_s6_services_are_complete() -> None:
    bundle = {entry.name for entry in (S6 / "user" / "contents.d").iterdir()}
    assert bundle == {"whisper-gpu", "discovery"}
    for name in bundle:
        service = S6 / name
        kind = (service / "type").read_text(encoding="utf-8").strip()
        if kind == "longrun":
            _assert_executable(service / "run")
            if (service / "finish").exists():
                _assert_executable(service / "finish")
        else:
            assert kind == "oneshot"
            command = (service / "up").read_text(encoding="utf-8").split()[0]
            target = REPO / "addon" / "rootfs" / command.lstrip("/")
            assert target.is_file(), f"{name}/up runs {command}, which the image does not have"
            _assert_executable(target)
        for dependency in (service / "dependencies.d").iterdir() if (service / "dependencies.d").is_dir() else ():
            assert dependency.name == "base" or (S6 / dependency.name / "type").is_file(), dependency
    assert (S6 / "discovery" / "dependencies.d" / "whisper-gpu").exists(), "discovery starts after the server"


def test_s6_scripts_read_the_container_environment() -> None:
    # s6-overlay v3 starts services with an empty environment; SUPERVISOR_TOKEN comes in through with-contenv.
    for script in (START, DISCOVERY, S6 / "whisper-gpu" / "finish"):
        assert script.read_text(encoding="utf-8").startswith("#!/command/with-contenv bash\n"), script


def test_s6_scripts_pass_shellcheck() -> None:
    scripts = [START, DISCOVERY, S6 / "whisper-gpu" / "finish"]
    result = subprocess.run(
        [tool("shellcheck"), "--shell=bash", "--severity=style", *map(str, scripts)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
