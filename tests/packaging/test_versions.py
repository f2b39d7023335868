"""One version everywhere, and the release helper that stamps it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging_support import ADDON, KUSTOMIZE, MANIFEST, REPO, load_yaml, project_version

SET_VERSION = REPO / "scripts" / "set-version"
STAMPED = (
    "server/whisper_gpu/__init__.py",
    "pyproject.toml",
    "addon/config.yaml",
    "addon/CHANGELOG.md",
    "custom_components/whisper_gpu/manifest.json",
    "deploy/kubernetes/base/kustomization.yaml",
    "deploy/kubernetes/overlays/replicas/kustomization.yaml",
)


def test_pyproject_takes_the_packages_version() -> None:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    static = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    if static:
        assert static.group(1) == project_version()
    else:
        assert 'version = { attr = "whisper_gpu.__version__" }' in pyproject


def test_addon_version_is_the_project_version() -> None:
    assert load_yaml(ADDON / "config.yaml")["version"] == project_version(), "the add-on installs this wheel from PyPI"


def test_integration_version_is_the_project_version() -> None:
    assert json.loads(MANIFEST.read_text(encoding="utf-8"))["version"] == project_version()


def test_kubernetes_image_tag_is_the_project_version() -> None:
    images = load_yaml(KUSTOMIZE / "base" / "kustomization.yaml")["images"]
    assert {"name": "whisper-gpu", "newTag": project_version()} in images


def test_addon_changelog_describes_this_version() -> None:
    changelog = (ADDON / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"\n## {project_version()}\n" in changelog, "the add-on store shows this section as the update's notes"


def test_set_version_check_agrees() -> None:
    result = subprocess.run([sys.executable, str(SET_VERSION), "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(project_version()) >= 3


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the files set-version touches."""
    for relative in STAMPED:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / relative, tmp_path / relative)
    return tmp_path


def set_version(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SET_VERSION), "--root", str(root), *args], capture_output=True, text=True, check=False
    )


def snapshot(root: Path) -> dict[str, str]:
    return {relative: (root / relative).read_text(encoding="utf-8") for relative in STAMPED}


def test_set_version_stamps_only_the_version_lines(checkout: Path) -> None:
    before = snapshot(checkout)

    result = set_version(checkout, "2.3.4rc1")

    assert result.returncode == 0, result.stderr
    after = snapshot(checkout)
    for relative, text in before.items():
        changed = [
            (old, new) for old, new in zip(text.splitlines(), after[relative].splitlines(), strict=True) if old != new
        ]
        if relative in ("pyproject.toml", "addon/CHANGELOG.md") and not changed:
            continue  # pyproject reads the package's version; the changelog is written by hand
        assert len(changed) == 1, f"{relative}: {changed}"
        assert "2.3.4rc1" in changed[0][1]
    assert load_yaml(checkout / "addon/config.yaml")["version"] == "2.3.4rc1"
    assert json.loads((checkout / "custom_components/whisper_gpu/manifest.json").read_text())["version"] == "2.3.4rc1"
    assert {"name": "whisper-gpu", "newTag": "2.3.4rc1"} in load_yaml(
        checkout / "deploy/kubernetes/base/kustomization.yaml"
    )["images"]
    assert '__version__ = "2.3.4rc1"' in after["server/whisper_gpu/__init__.py"]
    assert "## 2.3.4rc1" in result.stderr, "reminds to write the changelog"
    assert set_version(checkout, "--check").returncode == 0


@pytest.mark.parametrize("version", ["1.0 beta", "v1.2.3", "1.2", "1.2.3+local"])
def test_set_version_refuses_what_pypi_or_docker_would_not_take(checkout: Path, version: str) -> None:
    before = snapshot(checkout)

    result = set_version(checkout, version)

    assert result.returncode != 0
    assert snapshot(checkout) == before


def test_set_version_writes_nothing_when_a_file_has_no_version_line(checkout: Path) -> None:
    config = checkout / "addon/config.yaml"
    config.write_text(config.read_text(encoding="utf-8").replace('version: "', 'vers: "'), encoding="utf-8")
    before = snapshot(checkout)

    result = set_version(checkout, "9.9.9")

    assert result.returncode != 0
    assert "addon/config.yaml" in result.stderr
    assert snapshot(checkout) == before


def test_set_version_check_spots_a_disagreement(checkout: Path) -> None:
    manifest = checkout / "custom_components/whisper_gpu/manifest.json"
    manifest.write_text(re.sub(r'"version": "[^"]*"', '"version": "0.0.0"', manifest.read_text()), encoding="utf-8")

    assert set_version(checkout, "--check").returncode == 1


def test_set_version_check_holds_the_files_to_the_tag(checkout: Path) -> None:
    """The release workflow runs `--check <tag without v>`: a tag the files do not carry stops the release."""
    assert set_version(checkout, "--check", project_version()).returncode == 0
    result = set_version(checkout, "--check", "9.9.9")
    assert result.returncode == 1
    assert "9.9.9" in result.stderr


RELEASE_NOTES = REPO / "scripts" / "release-notes"


def release_notes(changelog: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RELEASE_NOTES), "--changelog", str(changelog), version],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_release_notes_are_the_changelog_section(tmp_path: Path) -> None:
    changelog = tmp_path / "CHANGELOG.md"
    changelog.write_text(
        "# Changelog\n\n## 0.3.0\n\n- Faster.\n- Smaller.\n\n## 0.2.0\n\n- Older.\n\n## 0.1.0\n", encoding="utf-8"
    )

    assert release_notes(changelog, "0.3.0").stdout == "- Faster.\n- Smaller.\n"
    assert release_notes(changelog, "0.2.0").stdout == "- Older.\n"
    assert release_notes(changelog, "0.1.0").returncode == 1, "an empty section is no release notes"
    assert release_notes(changelog, "0.4.0").returncode == 1
    assert release_notes(changelog, "0.3").returncode == 1, "0.3 is not 0.3.0"


def test_this_version_has_release_notes() -> None:
    result = release_notes(ADDON / "CHANGELOG.md", project_version())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
