"""Every kustomization renders, every object is valid Kubernetes, and the deployment keeps its promises.

Each overlay is built, and each component on top of the base, with `kubectl kustomize`; core objects are
validated strictly with kubernetes-validate, the ServiceMonitor and the cert-manager Certificate (custom
resources it has no schema for) field by field here.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging_support import KUSTOMIZE, REPO, load_yaml, project_version

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")
# The oldest Kubernetes release still in common use, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
NAMESPACE = "whisper"
SEED_SETTINGS = {
    "MODEL", "LANGUAGE", "COMPUTE_TYPE", "BEAM_SIZE", "VAD_THRESHOLD", "MIN_SPEECH_DURATION_MS",
    "MAX_SPEECH_DURATION_S", "SPEECH_PAD_MS",
}  # fmt: skip
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
SERVICEMONITOR_SPEC_FIELDS = {
    "attachMetadata", "bodySizeLimit", "convertClassicHistogramsToNHCB", "endpoints", "fallbackScrapeProtocol",
    "jobLabel", "keepDroppedTargets", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
    "namespaceSelector", "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "podTargetLabels",
    "sampleLimit", "scrapeClass", "scrapeClassicHistograms", "scrapeProtocols", "selector", "selectorMechanism",
    "serviceDiscoveryRole", "targetLabels", "targetLimit",
}  # fmt: skip
SERVICEMONITOR_ENDPOINT_FIELDS = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2", "filterRunning",
    "followRedirects", "honorLabels", "honorTimestamps", "interval", "metricRelabelings", "noProxy", "oauth2",
    "params", "path", "port", "proxyConnectHeader", "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme",
    "scrapeTimeout", "targetPort", "tlsConfig", "trackTimestampsStaleness",
}  # fmt: skip
CERTIFICATE_SPEC_FIELDS = {
    "additionalOutputFormats", "commonName", "dnsNames", "duration", "emailAddresses", "encodeUsagesInRequest",
    "ipAddresses", "isCA", "issuerRef", "keystores", "literalSubject", "nameConstraints", "otherNames",
    "privateKey", "renewBefore", "renewBeforePercentage", "revisionHistoryLimit", "secretName",
    "secretTemplate", "signatureAlgorithm", "subject", "uris", "usages",
}  # fmt: skip
CERTIFICATE_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
    "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
    "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
}  # fmt: skip
CUSTOM_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")
CLUSTER_SCOPED = {"Namespace"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def kustomization_dirs(kind: str) -> list[Path]:
    found = []
    for path in sorted(KUSTOMIZE.rglob("kustomization.yaml")):
        declared = load_yaml(path).get("kind", "Kustomization")
        if declared == kind:
            found.append(path.parent)
    return found


OVERLAYS = kustomization_dirs("Kustomization")
COMPONENTS = kustomization_dirs("Component")


@dataclass
class Build:
    """One rendered kustomization and the components it was built with."""

    name: str
    objects: list[dict[str, Any]]
    components: set[str] = field(default_factory=set)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        matches = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        assert len(matches) == 1, f"{self.name}: expected one {kind} {name}"
        return matches[0]

    @property
    def workload(self) -> dict[str, Any]:
        """The server's pods: the base's Deployment, or the StatefulSet of overlays/replicas."""
        matches = [
            obj for kind in WORKLOAD_KINDS for obj in self.of_kind(kind) if obj["metadata"]["name"] == "whisper-gpu"
        ]
        assert len(matches) == 1, f"{self.name}: expected one Deployment or StatefulSet whisper-gpu"
        return matches[0]

    @property
    def pod(self) -> dict[str, Any]:
        return self.workload["spec"]["template"]

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["spec"]["containers"]
        assert len(containers) == 1
        return containers[0]

    @property
    def gpu(self) -> bool:
        return "cpu-only" not in self.components and "overlays/cpu" not in self.name


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def compose(workdir: Path, resources: list[Path], components: list[Path]) -> list[dict[str, Any]]:
    """Render an overlay made on the spot (kustomize wants paths relative to the kustomization)."""
    workdir.mkdir(parents=True)
    relative = lambda path: os.path.relpath(path, workdir)  # noqa: E731
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [relative(path) for path in resources],
        "components": [relative(path) for path in components],
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    return kustomize(workdir)


def _name(path: Path) -> str:
    return str(path.relative_to(KUSTOMIZE))


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> list[Build]:
    work = tmp_path_factory.mktemp("kustomize")
    rendered = [Build(_name(path), kustomize(path)) for path in OVERLAYS]
    base = KUSTOMIZE / "base"
    for component in COMPONENTS:
        name = component.name
        rendered.append(Build(f"base+{name}", compose(work / name, [base], [component]), {name}))
    # Components are meant to be combined: the GPU node reached from outside and monitored, and the CPU variant.
    # The TLS component after the ServiceMonitor, as its comment asks, so that both are patched.
    combinations = [
        ("overlays/gpu", ["servicemonitor", "external-loadbalancer"]),
        ("overlays/gpu", ["servicemonitor", "external-loadbalancer", "control-tls"]),
        ("overlays/yeezyai", ["servicemonitor", "external-loadbalancer"]),
        ("overlays/cpu", ["servicemonitor", "external-nodeport"]),
        ("overlays/replicas", ["servicemonitor", "control-tls"]),
        ("overlays/replicas", ["servicemonitor", "external-loadbalancer", "control-tls"]),
    ]
    for overlay, names in combinations:
        paths = [KUSTOMIZE / "components" / name for name in names]
        label = f"{overlay}+{'+'.join(names)}"
        rendered.append(Build(label, compose(work / label.replace("/", "_"), [KUSTOMIZE / overlay], paths), set(names)))
    return rendered


def each(builds: list[Build]) -> Iterator[tuple[Build, dict[str, Any]]]:
    for build in builds:
        for obj in build.objects:
            yield build, obj


def test_every_overlay_and_component_is_rendered(builds: list[Build]) -> None:
    names = {build.name for build in builds}
    assert {"base", "overlays/gpu", "overlays/yeezyai", "overlays/cpu", "overlays/replicas"} <= names
    used = set().union(*(build.components for build in builds))
    assert used == {component.name for component in COMPONENTS}
    assert {
        "node-yeezyai", "cpu-only", "external-loadbalancer", "external-nodeport", "servicemonitor", "control-tls"
    } <= used  # fmt: skip


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_core_object_is_valid(builds: list[Build], version: str) -> None:
    for build, obj in each(builds):
        if obj["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{build.name}: {obj['kind']} {obj['metadata']['name']}: {err.message} at {list(err.path)}")


def test_everything_lives_in_the_whisper_namespace(builds: list[Build]) -> None:
    for build, obj in each(builds):
        if obj["kind"] in CLUSTER_SCOPED:
            continue
        assert obj["metadata"].get("namespace") == NAMESPACE, f"{build.name}: {obj['kind']} {obj['metadata']['name']}"


def test_the_seed_names_are_kept(builds: list[Build]) -> None:
    for build in builds:
        build.one("Namespace", NAMESPACE)
        assert build.workload
        build.one("ConfigMap", "whisper-gpu-configmap")
        service = build.one("Service", "whisper-gpu")
        assert service["spec"]["type"] == "ClusterIP"
        assert {(port["name"], port["port"]) for port in service["spec"]["ports"]} == {
            ("wyoming", 10300),
            ("control", 10301),
        }


def test_configmap_holds_server_settings(builds: list[Build], server_settings: dict[str, Any]) -> None:
    by_env = {spec.env: spec for spec in server_settings.values()}
    for build in builds:
        data = build.one("ConfigMap", "whisper-gpu-configmap")["data"]
        assert set(data) >= SEED_SETTINGS
        for key, value in data.items():
            assert key in by_env, f"{build.name}: {key} is no server setting"
            by_env[key].parse(value)
        env = {item["name"]: item.get("value") for item in build.container.get("env", [])}
        assert set(env) <= set(by_env), f"{build.name}: container env names that are no settings"


def test_hardened_replicas(builds: list[Build]) -> None:
    for build in builds:
        workload = build.workload
        if workload["kind"] == "Deployment":
            assert workload["spec"]["replicas"] == 1
            assert workload["spec"]["strategy"]["type"] == "Recreate", "one GPU and a ReadWriteOnce volume"
        else:
            assert workload["spec"]["replicas"] >= 2, f"{build.name}: a StatefulSet is for several replicas"
        pod = build.pod["spec"]
        assert pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["fsGroup"] == 1000
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["enableServiceLinks"] is False, "service links put WHISPER_GPU_* variables into the environment"
        context = build.container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]


def test_data_and_tmp_are_the_writable_places(builds: list[Build]) -> None:
    for build in builds:
        mounts = {mount["mountPath"]: mount for mount in build.container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in build.pod["spec"]["volumes"]}
        if build.workload["kind"] == "StatefulSet":
            assert mounts["/data"]["name"] not in volumes, "each replica's /data is its own claim"
            templates = {claim["metadata"]["name"]: claim for claim in build.workload["spec"]["volumeClaimTemplates"]}
            claim = templates[mounts["/data"]["name"]]
            assert not build.of_kind("PersistentVolumeClaim"), "no volume shared between replicas"
        else:
            data = volumes[mounts["/data"]["name"]]
            claim = build.one("PersistentVolumeClaim", data["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        for path, mount in mounts.items():
            if path not in ("/data", "/tmp"):
                assert mount.get("readOnly") is True, f"{build.name}: {path} is writable"


def test_control_token_comes_from_the_operators_secret(builds: list[Build]) -> None:
    for build in builds:
        assert not build.of_kind("Secret"), "no token in the repository: the operator creates the Secret"
        env = {item["name"]: item for item in build.container["env"]}
        assert "CONTROL_TOKEN" not in env
        token_path = Path(env["CONTROL_TOKEN_FILE"]["value"])
        mount = next(m for m in build.container["volumeMounts"] if Path(m["mountPath"]) == token_path.parent)
        volume = next(v for v in build.pod["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "whisper-gpu-control"
        assert {"key": "token", "path": token_path.name} in volume["secret"]["items"]
        assert volume["secret"].get("optional") is not True, "without the Secret the pod must not start"


def test_probes(builds: list[Build]) -> None:
    for build in builds:
        container = build.container
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"wyoming": 10300, "control": 10301}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            http = container[probe]["httpGet"]
            assert (http["path"], ports.get(http["port"], http["port"])) == (path, 10301), probe
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] in ("/readyz", "/healthz")
        allowed_s = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        assert allowed_s >= 20 * 60, "the first start downloads the model: allow at least 20 minutes"


def test_gpu_builds_have_the_seeds_resources(builds: list[Build]) -> None:
    for build in builds:
        resources = build.container["resources"]
        assert (resources["requests"]["cpu"], resources["limits"]["cpu"]) == ("2", "4")
        assert (resources["requests"]["memory"], resources["limits"]["memory"]) == ("2Gi", "4Gi")
        if build.gpu:
            assert build.pod["spec"]["runtimeClassName"] == "nvidia"
            assert resources["limits"]["nvidia.com/gpu"] == 1
        else:
            assert "runtimeClassName" not in build.pod["spec"]
            assert "nvidia.com/gpu" not in yaml.safe_dump(build.objects)
            data = build.one("ConfigMap", "whisper-gpu-configmap")["data"]
            assert (data["DEVICE"], data["COMPUTE_TYPE"]) == ("cpu", "int8")
            assert build.container["image"].split(":")[0].endswith("whisper-gpu-cpu")


def test_node_pin(builds: list[Build]) -> None:
    for build in builds:
        selector = build.pod["spec"].get("nodeSelector", {})
        pinned = "node-yeezyai" in build.components or build.name.startswith("overlays/yeezyai")
        assert selector == ({"kubernetes.io/hostname": "yeezyai"} if pinned else {}), build.name


def test_overlay_images_are_set_and_tagged_with_the_version(builds: list[Build]) -> None:
    for build in builds:
        image = build.container["image"]
        name, _, tag = image.rpartition(":")
        assert tag == project_version(), f"{build.name}: {image}"
        if build.name.startswith("overlays/"):
            assert "/" in name, f"{build.name}: set the registry with an `images:` entry ({image})"


def test_services_reach_the_pod(builds: list[Build]) -> None:
    for build in builds:
        labels = build.pod["metadata"]["labels"]
        container_ports = {port["name"] for port in build.container["ports"]}
        for service in build.of_kind("Service"):
            selector = service["spec"]["selector"]
            assert selector.items() <= labels.items(), f"{service['metadata']['name']} selects no pod"
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in container_ports
        external = [s for s in build.of_kind("Service") if s["spec"]["type"] in ("LoadBalancer", "NodePort")]
        expect_external = bool(build.components & {"external-loadbalancer", "external-nodeport"})
        assert bool(external) == expect_external, build.name
        for service in external:
            assert {port["port"] for port in service["spec"]["ports"]} == {10300, 10301}


def _admitted(build: Build, peer: dict[str, Any]) -> set[int]:
    """Pod ports a peer may reach under the build's NetworkPolicies."""
    ports: set[int] = set()
    for policy in build.of_kind("NetworkPolicy"):
        if not policy["spec"]["podSelector"]["matchLabels"].items() <= build.pod["metadata"]["labels"].items():
            continue
        for rule in policy["spec"].get("ingress", []):
            if peer in rule.get("from", []):
                ports |= {port["port"] for port in rule["ports"]}
    return ports


def test_network_policy_admits_home_assistant_and_monitoring(builds: list[Build]) -> None:
    # A default install: the namespaces by the name Kubernetes labels every namespace with, no labelling needed.
    home_assistant = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "home-assistant"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    # Other namespace names: a label.
    home_assistant_label = {"namespaceSelector": {"matchLabels": {"whisper-gpu/home-assistant": "true"}}}
    monitoring_label = {"namespaceSelector": {"matchLabels": {"whisper-gpu/monitoring": "true"}}}
    for build in builds:
        assert _admitted(build, home_assistant) == {10300, 10301}
        assert _admitted(build, home_assistant_label) == {10300, 10301}
        assert _admitted(build, monitoring) == {10301}
        assert _admitted(build, monitoring_label) == {10301}
        assert _admitted(build, {"namespaceSelector": {}}) == set(), "no namespace is admitted wholesale"
        if build.components & {"external-loadbalancer", "external-nodeport"}:
            blocks = _ip_blocks(build)
            assert blocks, "Home Assistant outside the cluster needs an ipBlock"
            assert all(_admitted(build, peer) == {10300, 10301} for peer in blocks)


def _ip_blocks(build: Build) -> list[dict[str, Any]]:
    return [
        peer
        for policy in build.of_kind("NetworkPolicy")
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if "ipBlock" in peer
    ]


# Where pods, nodes and home networks get their addresses: a placeholder must not fall into any of them.
USED_RANGES = [ipaddress.ip_network(net) for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")]
DOCUMENTATION_RANGES = [ipaddress.ip_network(net) for net in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]


def test_the_external_placeholder_admits_nothing_until_set(builds: list[Build]) -> None:
    external = [build for build in builds if build.components & {"external-loadbalancer", "external-nodeport"}]
    assert external
    for build in external:
        for peer in _ip_blocks(build):
            network = ipaddress.ip_network(peer["ipBlock"]["cidr"])
            assert any(network.subnet_of(doc) for doc in DOCUMENTATION_RANGES), f"{build.name}: {network}"
            assert not any(network.overlaps(used) for used in USED_RANGES), f"{build.name}: {network} admits pods"


def documented_overlay() -> str:
    """The own-overlay example in docs/deploy.md."""
    text = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    match = re.search(r"```yaml\n(# my-whisper/kustomization\.yaml\n.*?)```", text, re.DOTALL)
    assert match, "docs/deploy.md shows an own overlay (my-whisper/kustomization.yaml)"
    return match.group(1)


def test_the_documented_overlay_sets_home_assistants_network(tmp_path: Path) -> None:
    """The example in docs/deploy.md, rendered where it says it lives: beside the checkout's deploy/."""
    (tmp_path / "deploy").symlink_to(KUSTOMIZE.parent)
    overlay = tmp_path / "my-whisper"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(documented_overlay(), encoding="utf-8")
    build = Build("my-whisper", kustomize(overlay))
    (peer,) = _ip_blocks(build)
    network = ipaddress.ip_network(peer["ipBlock"]["cidr"])
    assert network.subnet_of(ipaddress.ip_network("192.168.0.0/16")), "the example sets a LAN"
    assert _admitted(build, peer) == {10300, 10301}
    assert "nodeSelector" not in build.pod["spec"], "the example starts from the generic GPU overlay"
    (monitor,) = build.of_kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_default_overlay_runs_on_any_nvidia_node(builds: list[Build]) -> None:
    (build,) = [build for build in builds if build.name == "overlays/gpu"]
    pod = build.pod["spec"]
    assert not {"nodeSelector", "nodeName", "affinity"} & set(pod), "no node is named"
    assert pod["runtimeClassName"] == "nvidia"
    resources = build.container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert build.container["image"] == f"ghcr.io/whisper-gpu/whisper-gpu:{project_version()}", "the released image"


def test_the_recipe_creates_its_namespace(builds: list[Build]) -> None:
    for build in builds:
        labels = build.one("Namespace", NAMESPACE)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted", "the pod is hardened; keep it so"


def test_the_control_port_stays_reachable_while_not_ready(builds: list[Build]) -> None:
    """A model that fails to load makes the pod not ready; the API that can fix it must stay reachable."""
    for build in builds:
        service = build.one("Service", "whisper-gpu-control")
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert [(port["port"], port["targetPort"]) for port in service["spec"]["ports"]] == [(10301, "control")]
        for other in build.of_kind("Service"):
            if other is not service and any(port["port"] == 10300 for port in other["spec"]["ports"]):
                assert not other["spec"].get("publishNotReadyAddresses"), "Wyoming only once the model is ready"


def test_servicemonitor_scrapes_the_control_port(builds: list[Build]) -> None:
    monitored = [build for build in builds if "servicemonitor" in build.components]
    assert monitored
    for build in monitored:
        (monitor,) = build.of_kind("ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        assert set(spec) <= SERVICEMONITOR_SPEC_FIELDS, set(spec) - SERVICEMONITOR_SPEC_FIELDS
        assert "namespaceSelector" not in spec or spec["namespaceSelector"].get("matchNames") == [NAMESPACE]
        selected = [
            service
            for service in build.of_kind("Service")
            if spec["selector"]["matchLabels"].items() <= service["metadata"].get("labels", {}).items()
        ]
        assert [s["metadata"]["name"] for s in selected] == ["whisper-gpu-control"], "scrape the pod once"
        assert selected[0]["spec"]["publishNotReadyAddresses"] is True, "metrics also while the model is not ready"
        service_ports = {port["name"]: port for port in selected[0]["spec"]["ports"]}
        assert spec["endpoints"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= SERVICEMONITOR_ENDPOINT_FIELDS, set(endpoint) - SERVICEMONITOR_ENDPOINT_FIELDS
            assert service_ports[endpoint["port"]]["targetPort"] == "control"
            assert endpoint.get("path", "/metrics") == "/metrics"
            interval = endpoint.get("interval", "30s")
            timeout = endpoint.get("scrapeTimeout", "10s")
            assert DURATION.match(interval)
            assert DURATION.match(timeout)
            assert _seconds(timeout) <= _seconds(interval)


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", duration))


def _replicas_builds(builds: list[Build]) -> list[Build]:
    found = [build for build in builds if build.name.startswith("overlays/replicas")]
    assert found
    return found


def test_replicas_each_have_a_gpu_a_cache_and_a_node_of_their_own(builds: list[Build]) -> None:
    for build in _replicas_builds(builds):
        statefulset = build.one("StatefulSet", "whisper-gpu")
        spec = statefulset["spec"]
        assert spec["replicas"] >= 2
        assert build.container["resources"]["limits"]["nvidia.com/gpu"] == 1, "one GPU per replica"
        (claim,) = spec["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data"
        assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi", "a model cache per replica"
        (term,) = build.pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= build.pod["metadata"]["labels"].items()
        assert spec["selector"]["matchLabels"].items() <= build.pod["metadata"]["labels"].items()


def test_the_control_name_resolves_to_every_replica(builds: list[Build]) -> None:
    """Headless, ready or not: one address per pod for the integration; Wyoming balanced over ready pods only."""
    for build in _replicas_builds(builds):
        control = build.one("Service", "whisper-gpu-control")
        assert control["spec"]["clusterIP"] == "None"
        assert control["spec"]["publishNotReadyAddresses"] is True
        assert build.one("StatefulSet", "whisper-gpu")["spec"]["serviceName"] == "whisper-gpu-control"
        wyoming = build.one("Service", "whisper-gpu")
        assert wyoming["spec"].get("clusterIP") != "None", "Wyoming clients get one balanced address"
        assert not wyoming["spec"].get("publishNotReadyAddresses")


def test_a_drain_takes_one_replica_at_a_time(builds: list[Build]) -> None:
    for build in _replicas_builds(builds):
        budget = build.one("PodDisruptionBudget", "whisper-gpu")["spec"]
        assert budget["selector"]["matchLabels"].items() <= build.pod["metadata"]["labels"].items()
        replicas = build.one("StatefulSet", "whisper-gpu")["spec"]["replicas"]
        unavailable = budget.get("maxUnavailable", replicas - budget.get("minAvailable", replicas))
        assert 1 <= unavailable < replicas


def test_the_autoscaler_follows_a_metric_the_server_exports(builds: list[Build]) -> None:
    from whisper_gpu.metrics import Metrics  # noqa: PLC0415 - the server package, only for this check

    exported = {family.name: family.type for family in Metrics(lambda: None).registry.collect()}
    for build in _replicas_builds(builds):
        autoscaler = build.one("HorizontalPodAutoscaler", "whisper-gpu")
        assert autoscaler["apiVersion"] == "autoscaling/v2"
        spec = autoscaler["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "whisper-gpu"}
        assert 2 <= spec["minReplicas"] <= spec["maxReplicas"]
        (metric,) = spec["metrics"]
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        assert name == "whisper_gpu_requests_queued"
        assert exported.get(name) == "gauge", f"{name} is no gauge the server exports"
        assert metric["pods"]["target"]["type"] == "AverageValue"


def test_the_replicas_pod_is_the_base_pod(builds: list[Build]) -> None:
    """statefulset.yaml repeats the base's pod: it may differ only in anti-affinity and where /data comes from."""
    (base,) = [build for build in builds if build.name == "overlays/gpu"]
    (replicas,) = [build for build in builds if build.name == "overlays/replicas"]

    def comparable(pod: dict[str, Any]) -> dict[str, Any]:
        spec = {key: value for key, value in pod["spec"].items() if key != "affinity"}
        spec["volumes"] = [volume for volume in spec["volumes"] if volume["name"] != "data"]
        return {"metadata": pod["metadata"], "spec": spec}

    assert comparable(replicas.pod) == comparable(base.pod)


def test_the_tls_component_serves_the_control_port_from_the_certificate(builds: list[Build]) -> None:
    tls_builds = [build for build in builds if "control-tls" in build.components]
    assert {build.workload["kind"] for build in tls_builds} == {"Deployment", "StatefulSet"}
    for build in tls_builds:
        (certificate,) = build.of_kind("Certificate")
        assert certificate["apiVersion"] == "cert-manager.io/v1"
        spec = certificate["spec"]
        assert set(spec) <= CERTIFICATE_SPEC_FIELDS, set(spec) - CERTIFICATE_SPEC_FIELDS
        assert set(spec["usages"]) <= CERTIFICATE_USAGES
        assert "server auth" in spec["usages"]
        assert {"kind", "name"} <= set(spec["issuerRef"])
        assert _seconds(spec["renewBefore"]) < _seconds(spec["duration"])
        names = set(spec["dnsNames"])
        assert {"whisper-gpu-control.whisper.svc", "*.whisper-gpu-control.whisper.svc.cluster.local"} <= names
        env = {item["name"]: item["value"] for item in build.container["env"]}
        cert, key = Path(env["CONTROL_TLS_CERT"]), Path(env["CONTROL_TLS_KEY"])
        assert cert.parent == key.parent
        mount = next(m for m in build.container["volumeMounts"] if Path(m["mountPath"]) == cert.parent)
        assert mount["readOnly"] is True
        volume = next(v for v in build.pod["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == spec["secretName"]
        assert {"key": "tls.crt", "path": cert.name} in volume["secret"]["items"]
        assert {"key": "tls.key", "path": key.name} in volume["secret"]["items"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert build.container[probe]["httpGet"]["scheme"] == "HTTPS", "the port answers nothing else"
        for monitor in build.of_kind("ServiceMonitor"):
            (endpoint,) = monitor["spec"]["endpoints"]
            assert endpoint["scheme"] == "https"
            assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": spec["secretName"], "key": "ca.crt"}
            assert endpoint["tlsConfig"]["serverName"] in names
    for build in builds:
        if "control-tls" not in build.components:
            assert "CONTROL_TLS_CERT" not in {item["name"] for item in build.container["env"]}
            assert build.container["readinessProbe"]["httpGet"].get("scheme", "HTTP") == "HTTP"


def test_the_documented_adapter_rule_offers_the_autoscalers_metric_per_pod(builds: list[Build]) -> None:
    """The Prometheus adapter rule in docs/deploy.md names the HPA's metric and maps it onto pods."""
    text = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    match = re.search(r"```yaml\n# prometheus-adapter rules.*?\n(.*?)```", text, re.DOTALL)
    assert match, "docs/deploy.md shows the adapter rule"
    (rule,) = yaml.safe_load(match.group(1))
    (replicas,) = [build for build in builds if build.name == "overlays/replicas"]
    (metric,) = replicas.one("HorizontalPodAutoscaler", "whisper-gpu")["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith(name + "{")
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["name"]["as"] == name
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


def test_the_documented_tls_overlay_sets_the_issuer_and_the_outside_name(tmp_path: Path) -> None:
    """The TLS example in docs/deploy.md renders on top of the replicas overlay and does what it says."""
    text = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    tls_section = text[text.index("### TLS on the control port") :]
    match = re.search(r"```yaml\n(components:\n.*?)```", tls_section, re.DOTALL)
    assert match, "docs/deploy.md shows how to set the issuer"
    (tmp_path / "deploy").symlink_to(KUSTOMIZE.parent)
    overlay = tmp_path / "my-whisper"
    overlay.mkdir()
    head = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n"
    head += "  - ../deploy/kubernetes/overlays/replicas\n"
    (overlay / "kustomization.yaml").write_text(head + match.group(1), encoding="utf-8")
    build = Build("my-whisper", kustomize(overlay), {"servicemonitor", "control-tls"})
    (certificate,) = build.of_kind("Certificate")
    assert certificate["spec"]["issuerRef"]["kind"] == "Issuer"
    assert "whisper.example.lan" in certificate["spec"]["dnsNames"]
    (monitor,) = build.of_kind("ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["scheme"] == "https"
    assert build.container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
