"""The Grafana dashboard: valid PromQL, only metric names the server documents and exports."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
from packaging_support import DASHBOARD, README
from prometheus_client import generate_latest
from whisper_gpu.metrics import Metrics

GRAFANA_RANGES = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.*),\s*\w+\s*\)\s*$", re.DOTALL)
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.match(text)
        yield f"variable {variable['name']}", match.group("expr") if match else text


def parse(expr: str) -> promql_parser.Expr:
    """Parse a query as Prometheus would see it once Grafana has put in the time ranges."""
    return promql_parser.parse(GRAFANA_RANGES.sub("5m", expr))


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers if m.name == "__name__")
        return True

    promql_parser.walk(parse(expr), visit)
    return names


def documented_families() -> dict[str, str]:
    """The metric table of README.md: family name -> type."""
    rows = re.findall(r"^\| `(whisper_gpu_\w+)` \| (\w+) \|", README.read_text(encoding="utf-8"), re.MULTILINE)
    assert rows, "README.md has no metric table"
    return dict(rows)


def series_names(families: dict[str, str]) -> set[str]:
    """Every name a query may use for these families (histogram series included)."""
    names = set(families)
    for family, kind in families.items():
        names |= {family + suffix for suffix in SUFFIXES.get(kind, ())}
    return names


def test_every_query_is_valid_promql() -> None:
    for where, expr in queries(load_dashboard()):
        try:
            parse(expr)
        except ValueError as err:
            pytest.fail(f"{where}: {err}: {expr}")


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{job=~"$job"}[$__rate_interval]))) / on() b + {__name__="c"}'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c"}


def test_dashboard_uses_only_documented_metrics() -> None:
    allowed = series_names(documented_families())
    for where, expr in queries(load_dashboard()):
        unknown = metric_names(expr) - allowed
        assert not unknown, f"{where} uses {sorted(unknown)}, which README.md does not list"


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(expr for _, expr in queries(load_dashboard()))
    used = set().union(*(metric_names(expr) for _, expr in queries(load_dashboard())))
    assert {
        "whisper_gpu_requests_total",
        "whisper_gpu_real_time_factor_bucket",
        "whisper_gpu_requests_queued",
        "whisper_gpu_model_loads_total",
        "whisper_gpu_gpu_memory_used_bytes",
        "whisper_gpu_gpu_utilization_ratio",
    } <= used
    assert "histogram_quantile(0.95, sum by (le) (rate(whisper_gpu_request_duration_seconds_bucket" in exprs
    assert re.search(r'whisper_gpu_requests_total\{[^}]*outcome!~"ok\|', exprs), "a panel for failed requests"


def test_panels_are_laid_out_and_use_the_chosen_data_source() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"]
    assert dashboard["title"]
    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    (source,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")


# ---- against the running server --------------------------------------------------------------------------------


def exported_families(text: str) -> dict[str, str]:
    """Family name -> type from the exposition; families without samples still print # TYPE."""
    families: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind
    return families


def exported_names(text: str) -> set[str]:
    names = series_names(exported_families(text))
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


@pytest.fixture(params=["registry", "server"])
def metrics_text(request: pytest.FixtureRequest) -> str:
    """The exposition of the server's metrics registry (fast), and of the running server's /metrics."""
    if request.param == "registry":
        return generate_latest(Metrics(lambda: None).registry).decode()
    server = request.getfixturevalue("whisper_server")
    with urllib.request.urlopen(f"{server.control_url}/metrics", timeout=10) as response:  # noqa: S310 - local
        assert response.status == 200
        return response.read().decode()


def test_server_exports_every_metric_the_dashboard_queries(metrics_text: str) -> None:
    exported = exported_names(metrics_text)
    for where, expr in queries(load_dashboard()):
        missing = metric_names(expr) - exported
        assert not missing, f"{where} queries {sorted(missing)}, which the server does not export"


def test_metric_reference_matches_the_server(metrics_text: str) -> None:
    exported = {name: kind for name, kind in exported_families(metrics_text).items() if name.startswith("whisper_gpu_")}
    assert exported == documented_families(), "README.md's metric table must list exactly what the server exports"
