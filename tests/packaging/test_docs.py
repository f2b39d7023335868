"""The user documentation agrees with the code and with itself: versions, models, links, the first steps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from packaging_support import ADDON, KUSTOMIZE, README, REPO, load_yaml
from whisper_gpu import models
from whisper_gpu.settings import SETTINGS

DOCS = sorted((REPO / "docs").glob("*.md"))
USER_DOCS = [README, *DOCS, ADDON / "DOCS.md", ADDON / "README.md"]
HA_VERSION_MENTION = re.compile(r"Home Assistant (20\d\d\.\d+(?:\.\d+)?)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def minimum_home_assistant() -> str:
    return str(json.loads((REPO / "hacs.json").read_text(encoding="utf-8"))["homeassistant"])


def test_one_minimum_home_assistant_version_everywhere() -> None:
    minimum = minimum_home_assistant()
    assert load_yaml(ADDON / "config.yaml")["homeassistant"] == minimum, "the add-on's discovery needs the integration"
    mentioned = {
        (path.relative_to(REPO).as_posix(), version)
        for path in USER_DOCS
        for version in HA_VERSION_MENTION.findall(path.read_text(encoding="utf-8"))
    }
    assert mentioned, "the docs name the minimum version"
    assert {version for _, version in mentioned} == {minimum}, sorted(mentioned)


def test_the_integration_has_one_name() -> None:
    assert json.loads((REPO / "hacs.json").read_text(encoding="utf-8"))["name"] == "Whisper GPU"
    for path in USER_DOCS:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"whisper-gpu\*{0,2} integration", text, re.IGNORECASE), path.name
        assert "Configure** next" not in text


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {github_anchor(match) for match in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda path: path.relative_to(REPO).as_posix())
def test_links_between_the_docs_resolve(path: Path) -> None:
    """Each fact is said once and linked to: the links must land."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    project = "https://github.com/whisper-gpu/whisper-gpu/blob/main/"
    for target in LINK.findall(text):
        if target.startswith(project):
            target_path, _, anchor = target.removeprefix(project).partition("#")
            resolved = REPO / target_path
        elif re.match(r"^[a-z]+:", target):
            continue
        else:
            target_path, _, anchor = target.partition("#")
            resolved = (path.parent / target_path).resolve() if target_path else path
        assert resolved.exists(), f"{path.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{path.name}: {target}: no such heading"


def test_anchor_rule_follows_github() -> None:
    assert github_anchor("1. Install the integration through HACS") == "1-install-the-integration-through-hacs"
    assert github_anchor("Zeroconf (mDNS)") == "zeroconf-mdns"
    assert github_anchor("4. Change the server's settings") == "4-change-the-servers-settings"


def section(path: Path, heading: str) -> str:
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"(?ms)^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text)
    assert match, f"{path.name} has no section {heading!r}"
    return match.group(1)


def test_the_addon_path_starts_with_the_integration_from_hacs() -> None:
    steps = re.findall(r"(?m)^\d+\. (.*)$", section(REPO / "docs" / "deploy.md", "Home Assistant add-on"))
    assert steps
    assert "HACS" in steps[0]
    assert "HACS" in section(ADDON / "DOCS.md", "Installation")


def test_the_kubernetes_quick_start_is_the_generic_gpu_overlay() -> None:
    for path in (README, REPO / "docs" / "deploy.md"):
        text = path.read_text(encoding="utf-8")
        assert "kubectl apply -k deploy/kubernetes/overlays/gpu" in text, path.name
        assert "kubectl apply -k deploy/kubernetes/overlays/yeezyai" not in text, "yeezyai is an example, not the path"


def test_the_configmap_points_at_the_list_of_settings() -> None:
    assert "`whisper-gpu serve --help`" in (KUSTOMIZE / "base" / "configmap.yaml").read_text(encoding="utf-8")


def test_model_table_matches_the_catalogue_and_the_memory_estimate() -> None:
    rows = re.findall(
        r"^\| `([^`]+)` \| (\d+) M \| ([\d.]+) (MB|GB) \| (\d+) MB \| (\d+) MB \|",
        (REPO / "docs" / "models.md").read_text(encoding="utf-8"),
        re.MULTILINE,
    )
    assert [row[0] for row in rows] == list(models.KNOWN_MODELS), "every model of the catalogue, in its order"
    for name, parameters, size, unit, float16, int8 in rows:
        known = models.KNOWN_MODELS[name]
        assert int(parameters) == known.parameters_m, name
        on_disk_mb = float(size) * (1000 if unit == "GB" else 1)
        assert abs(on_disk_mb - known.parameters_m * 2) <= 50, f"{name}: float16 files, two bytes per parameter"
        assert int(float16) == models.approximate_memory_mb(name, "float16"), name
        assert int(int8) == models.approximate_memory_mb(name, "int8"), name


def test_the_model_extras_are_said_to_be_third_party_and_checked() -> None:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    models = section(README, "Using the server")
    for extra in ("base", "tiny-en"):
        match = re.search(rf"^{extra} = \[(.*)\]$", pyproject, re.MULTILINE)
        assert match
        for requirement in re.findall(r'"([^"=]+)==', match.group(1)):
            package = requirement.rsplit("-", 1)[0] if requirement.endswith(("-1", "-2")) else requirement
            assert package in models, f"the README names the third-party package {requirement}"
    assert "sha256" in models


def test_the_mdns_table_says_what_the_images_and_the_deployment_set() -> None:
    table = section(REPO / "docs" / "deploy.md", "Zeroconf (mDNS)")
    rows = dict(re.findall(r"^\| ([^|]+?) \| (yes|no)\b", table, re.MULTILINE))
    deployment = load_yaml(KUSTOMIZE / "base" / "deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert (env["ZEROCONF"], rows["Kubernetes"]) == ("off", "no")
    dockerfile = (REPO / "server" / "Dockerfile").read_text(encoding="utf-8")
    assert ("ZEROCONF=off" in dockerfile, rows["Docker"]) == (True, "no")
    addon_dockerfile = (ADDON / "Dockerfile").read_text(encoding="utf-8")
    assert ("WHISPER_GPU_ZEROCONF=off" in addon_dockerfile, rows["the add-on"]) == (True, "no")
    announces = SETTINGS["zeroconf"].default != "off"
    assert (announces, rows["`pip install`, `whisper-gpu` on a machine in Home Assistant's network"]) == (True, "yes")
