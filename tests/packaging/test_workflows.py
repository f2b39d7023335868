"""The GitHub Actions workflows: actionlint-clean, and what they promise about a release.

They cannot run here; actionlint checks their syntax, expressions, action inputs and shell scripts
(with shellcheck), and the tests below check the promises: what triggers them, the least permissions,
trusted publishing, and that the names they push are the names users pull.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging_support import (
    ADDON,
    ADDON_DOCKERFILE,
    KUSTOMIZE,
    REPO,
    VENV_BIN,
    WORKFLOWS,
    instructions,
    load_yaml,
)

CI = WORKFLOWS / "ci.yml"
RELEASE = WORKFLOWS / "release.yml"
PYPI_PUBLISH = "pypa/gh-action-pypi-publish@release/v1"


def workflow(path: Path) -> dict[str, Any]:
    loaded = load_yaml(path)
    # YAML 1.1 reads the key `on` as the boolean true.
    loaded["on"] = loaded.pop(True, loaded.get("on"))
    return dict(loaded)


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps", []))


def uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    """The job's steps that use the action (any version when `action` has no @)."""
    return [step for step in steps(job) if step.get("uses", "").split("@")[0] == action or step.get("uses") == action]


def scripts(job: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in steps(job))


def actionlint() -> str:
    """actionlint from this virtual environment (the test extra installs it) or the PATH."""
    for candidate in (VENV_BIN / "actionlint", shutil.which("actionlint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    message = "actionlint is not installed: run scripts/dev-env"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def test_there_are_the_two_workflows() -> None:
    assert sorted(path.name for path in WORKFLOWS.iterdir()) == ["ci.yml", "release.yml"]


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yml")), ids=lambda path: path.name)
def test_actionlint(path: Path) -> None:
    environment = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    assert shutil.which("shellcheck", path=environment["PATH"]), "actionlint checks run: scripts with shellcheck"
    result = subprocess.run(
        [actionlint(), "-no-color", "-shellcheck", "shellcheck", str(path)],
        capture_output=True, text=True, env=environment, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_finds_a_mistake(tmp_path: Path) -> None:
    """The control for the test above: a wrong permission and an unknown context fail."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\npermissions:\n  id-token: writ\njobs:\n  a:\n    runs-on: ubuntu-24.04\n"
        "    steps:\n      - run: echo ${{ nothing.here }}\n",
        encoding="utf-8",
    )
    result = subprocess.run([actionlint(), "-no-color", str(broken)], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "id-token" in result.stdout
    assert "nothing" in result.stdout


# ---- least privilege -------------------------------------------------------------------------------------------


def granted(scope: dict[str, Any] | str | None) -> dict[str, str]:
    if scope is None:
        return {}
    assert isinstance(scope, dict), f"permissions must name each scope, not {scope!r}"
    return {name: str(level) for name, level in scope.items()}


@pytest.mark.parametrize("path", [CI, RELEASE], ids=lambda path: path.name)
def test_permissions_are_the_least_each_job_needs(path: Path) -> None:
    loaded = workflow(path)
    assert "permissions" in loaded, "set the workflow's permissions; the default token may write everything"
    top = granted(loaded["permissions"])
    assert all(level in ("read", "none") for level in top.values()), f"{path.name}: the workflow grants {top}"
    for name, job in loaded["jobs"].items():
        writes = {scope for scope, level in granted(job.get("permissions")).items() if level == "write"}
        needed: set[str] = set()
        if uses(job, "pypa/gh-action-pypi-publish"):
            needed.add("id-token")
        if any(step.get("with", {}).get("push") is True for step in uses(job, "docker/build-push-action")):
            needed.add("packages")
        if "gh release create" in scripts(job):
            needed.add("contents")
        assert writes == needed, f"{path.name}: job {name} may write {sorted(writes)}, needs {sorted(needed)}"


@pytest.mark.parametrize("path", [CI, RELEASE], ids=lambda path: path.name)
def test_checkouts_leave_no_token_behind(path: Path) -> None:
    """Later steps (and the images built from the checkout) must not find the job's token in .git/config."""
    for name, job in workflow(path)["jobs"].items():
        for step in uses(job, "actions/checkout"):
            assert step.get("with", {}).get("persist-credentials") is False, f"{path.name}: job {name}"


# ---- CI ----------------------------------------------------------------------------------------------------------


def test_ci_runs_the_tests_and_linters_on_pushes_and_pull_requests() -> None:
    loaded = workflow(CI)
    assert {"push", "pull_request"} <= set(loaded["on"])
    ci_script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "scripts/test" in ci_script
    assert "scripts/lint" in ci_script
    runs = [job for job in loaded["jobs"].values() if ".ci/run" in scripts(job)]
    assert len(runs) == 1, "one job runs .ci/run: the README's test command and the linters"
    (python,) = uses(runs[0], "actions/setup-python")
    versions = set(str(python["with"]["python-version"]).split())
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    floor = re.search(r'^requires-python = ">=([\d.]+)"', pyproject, re.MULTILINE)
    assert floor
    assert floor.group(1) in versions, "the oldest Python the server supports"
    assert any(version.startswith("3.14") for version in versions), "Home Assistant's Python, for scripts/ha-env"
    test_extra = tomllib.loads(pyproject)["project"]["optional-dependencies"]["test"]
    assert any(requirement.startswith("actionlint") for requirement in test_extra), "test_actionlint must not skip"


def test_ci_validates_the_integration_like_home_assistant_and_hacs() -> None:
    jobs = workflow(CI)["jobs"].values()
    hassfest = [job for job in jobs if uses(job, "home-assistant/actions/hassfest")]
    assert len(hassfest) == 1
    assert uses(hassfest[0], "actions/checkout"), "hassfest checks the checked-out integration"
    (hacs,) = [step for job in jobs for step in uses(job, "hacs/action")]
    assert hacs["with"]["category"] == "integration"


# ---- release -----------------------------------------------------------------------------------------------------


def release_jobs() -> dict[str, dict[str, Any]]:
    return dict(workflow(RELEASE)["jobs"])


def job_using(action: str) -> tuple[str, dict[str, Any]]:
    found = [(name, job) for name, job in release_jobs().items() if uses(job, action)]
    assert len(found) == 1, f"one release job uses {action}"
    return found[0]


def needs(job: dict[str, Any]) -> set[str]:
    value = job.get("needs", [])
    return {value} if isinstance(value, str) else set(value)


def upstream(name: str) -> set[str]:
    """Every job that must finish before the named one."""
    jobs, seen, todo = release_jobs(), set(), [name]
    while todo:
        for before in needs(jobs[todo.pop()]):
            if before not in seen:
                seen.add(before)
                todo.append(before)
    return seen


def test_release_runs_on_version_tags_only() -> None:
    trigger = workflow(RELEASE)["on"]
    assert set(trigger) == {"push"}
    assert set(trigger["push"]) == {"tags"}, "branches never release"
    patterns = trigger["push"]["tags"]
    assert any(fnmatch.fnmatchcase("v1.2.3", pattern) for pattern in patterns)
    assert any(fnmatch.fnmatchcase("v1.2.3rc1", pattern) for pattern in patterns)
    assert not any(fnmatch.fnmatchcase("nightly", pattern) for pattern in patterns)


def test_release_checks_the_tag_with_set_version_before_anything_else() -> None:
    jobs = release_jobs()
    checking = [name for name, job in jobs.items() if 'scripts/set-version --check "$version"' in scripts(job)]
    assert len(checking) == 1
    script = scripts(jobs[checking[0]])
    assert 'version="${TAG#v}"' in script
    assert "scripts/release-notes" in script, "no release without notes"
    for name in jobs:
        if name != checking[0]:
            assert checking[0] in upstream(name), f"{name} may run before the tag is checked"


def test_pypi_gets_the_sdist_and_wheel_by_trusted_publishing_after_the_images() -> None:
    name, job = job_using("pypa/gh-action-pypi-publish")
    (publish,) = uses(job, PYPI_PUBLISH)
    assert not set(publish.get("with", {})) & {"password", "user"}, "trusted publishing: no token"
    assert granted(job["permissions"]) == {"id-token": "write"}
    assert job["environment"]["name"] == "pypi", "the environment PyPI's trusted publisher names"
    (build_name,) = [n for n, j in release_jobs().items() if "python -m build" in scripts(j)]
    assert build_name in upstream(name)
    # A PyPI release cannot be taken back: publish only when every image is pushed.
    pushing = {n for n, j in release_jobs().items() if uses(j, "docker/build-push-action")}
    assert pushing
    assert pushing <= upstream(name)


def docker_build(job: dict[str, Any]) -> dict[str, Any]:
    """The inputs of the job's build that pushes."""
    (step,) = [step for step in uses(job, "docker/build-push-action") if step["with"].get("push") is True]
    return dict(step["with"])


def smoke_tested(job: dict[str, Any]) -> bool:
    """The job loads its image and runs it before the push."""
    builds = uses(job, "docker/build-push-action")
    loaded = [index for index, step in enumerate(steps(job)) if step in builds and step["with"].get("load") is True]
    pushed = [index for index, step in enumerate(steps(job)) if step in builds and step["with"].get("push") is True]
    if not loaded or not pushed:
        return False
    tag = steps(job)[loaded[0]]["with"]["tags"]
    between = steps(job)[loaded[0] + 1 : pushed[0]]
    return any(tag in step.get("run", "") and "--version" in step.get("run", "") for step in between)


def test_every_image_is_smoke_tested_before_it_is_pushed() -> None:
    pushing = [job for job in release_jobs().values() if uses(job, "docker/build-push-action")]
    assert len(pushing) == 2
    for job in pushing:
        assert smoke_tested(job), job["name"]
        loaded = [s["with"] for s in uses(job, "docker/build-push-action") if s["with"].get("load")]
        pushed = docker_build(job)
        same = ("context", "file", "build-args")
        assert {k: loaded[0].get(k) for k in same} == {k: pushed.get(k) for k in same}, "the tested image is pushed"


def test_server_images_are_the_ones_the_kubernetes_overlays_pull() -> None:
    (job,) = [j for j in release_jobs().values() if docker_build_file(j) == "server/Dockerfile"]
    variants = {entry["variant"]: entry["image"] for entry in job["strategy"]["matrix"]["include"]}
    assert set(variants) == {"gpu", "cpu"}
    build = docker_build(job)
    assert build["build-args"] == "VARIANT=${{ matrix.variant }}"
    assert "${{ matrix.image }}:${{ needs.version.outputs.version }}" in build["tags"]
    pulled = {}
    for overlay in ("gpu", "yeezyai", "cpu"):
        for image in load_yaml(KUSTOMIZE / "overlays" / overlay / "kustomization.yaml")["images"]:
            pulled[overlay] = image["newName"]
    assert pulled == {"gpu": variants["gpu"], "yeezyai": variants["gpu"], "cpu": variants["cpu"]}


def docker_build_file(job: dict[str, Any]) -> str | None:
    if not uses(job, "docker/build-push-action"):
        return None
    return str(docker_build(job).get("file", f"{docker_build(job)['context']}/Dockerfile"))


def test_addon_images_are_pushed_under_the_name_the_supervisor_pulls() -> None:
    config = load_yaml(ADDON / "config.yaml")
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    homepage = re.search(r'^Homepage = "https://github.com/([^/]+)/', pyproject, re.MULTILINE)
    assert homepage
    assert re.fullmatch(rf"ghcr\.io/{homepage.group(1)}/\{{arch\}}-addon-[a-z0-9-]+", config["image"])

    (job,) = [j for j in release_jobs().values() if docker_build_file(j) == "addon/Dockerfile"]
    arches = [entry["arch"] for entry in job["strategy"]["matrix"]["include"]]
    assert sorted(arches) == sorted(config["arch"]), "an image for every architecture the add-on lists"
    script = scripts(job)
    assert "yq '.image' addon/config.yaml" in script, "the name comes from config.yaml, so the two cannot differ"
    assert "${image//\\{arch\\}/$ARCH}" in script
    assert 'yq ".build_from.$ARCH" addon/build.yaml' in script
    build = docker_build(job)
    assert build["context"] == "addon"
    assert build["tags"] == "${{ steps.addon.outputs.image }}:${{ needs.version.outputs.version }}"
    assert "BUILD_VERSION=${{ needs.version.outputs.version }}" in build["build-args"]
    assert "BUILD_FROM=${{ steps.addon.outputs.build_from }}" in build["build-args"]


def test_addon_image_installs_the_wheel_built_in_the_same_run() -> None:
    (job,) = [j for j in release_jobs().values() if docker_build_file(j) == "addon/Dockerfile"]
    (download,) = uses(job, "actions/download-artifact")
    (copy,) = [i.arguments for i in instructions(ADDON_DOCKERFILE) if i.keyword == "COPY" and "wheels" in i.arguments]
    assert download["with"]["path"].rstrip("/") == f"addon/{copy.split()[0].rstrip('/')}"
    (upload_job,) = [j for j in release_jobs().values() if uses(j, "actions/upload-artifact")]
    (upload,) = uses(upload_job, "actions/upload-artifact")
    assert upload["with"]["name"] == download["with"]["name"]
    assert "python -m build" in scripts(upload_job)


def test_github_release_comes_last_with_the_changelog_as_notes() -> None:
    jobs = release_jobs()
    (name,) = [n for n, j in jobs.items() if "gh release create" in scripts(j)]
    assert upstream(name) == set(jobs) - {name}, "the release appears once everything is published"
    script = scripts(jobs[name])
    assert 'scripts/release-notes "$VERSION" > notes.md' in script
    assert "--notes-file notes.md" in script
    assert "--prerelease" in script, "HACS offers release candidates only to those who ask for them"
