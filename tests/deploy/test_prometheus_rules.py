"""deploy/prometheus/canvas-jobs.rules.yaml and deploy/grafana/canvas-jobs.json: every
rule well formed and accepted by promtool, and every metric a rule or a panel names one
that a service really exports (read from the services' own Metrics)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "canvas-jobs.rules.yaml"
METRICS_MODULES = (
    "canvas_gateway.metrics",
    "canvas_orchestrator.metrics",
    "canvas_generator.metrics",
    "canvas_notifier.metrics",
)
# A metric name in an expression (recording rules are named canvas:..., with a colon).
_METRIC = re.compile(r"\bcanvas_[a-z0-9_]+\b")
_RECORDED = re.compile(r"\bcanvas:[a-z0-9_:]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: make promtool (Debian's prometheus package)"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False, timeout=60)


def exported() -> set[str]:
    """Every series name the four services can export, labelled families included
    before their first sample."""
    names: set[str] = set()
    for module in METRICS_MODULES:
        metrics = importlib.import_module(module).Metrics()
        for family in metrics.registry.collect():
            names.update(sample.name for sample in family.samples)
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_sum", "_count"),
            }.get(family.type, ("",))
            names.update(family.name + suffix for suffix in suffixes)
    return names


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def unknown_metrics(expressions: list[str], known: set[str]) -> set[str]:
    return {name for expr in expressions for name in _METRIC.findall(expr)} - known


def test_every_rule_is_a_recording_or_an_alert_with_what_an_operator_needs() -> None:
    document = yaml.safe_load(RULES.read_text())
    assert [group["name"] for group in document["groups"]] == [
        "canvas-jobs.recording",
        "canvas-jobs.alerts",
    ]
    for rule in rules():
        assert ("record" in rule) != ("alert" in rule), rule
        assert str(rule["expr"]).strip(), rule
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_every_metric_a_rule_names_is_exported_by_a_service() -> None:
    expressions = [str(rule["expr"]) for rule in rules()]

    assert unknown_metrics(expressions, exported()) == set()
    # And the check sees a name that does not exist.
    assert unknown_metrics(["rate(canvas_jobs_totl[5m])"], exported()) == {"canvas_jobs_totl"}


def test_alerts_use_only_recording_rules_the_file_defines() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = {name for rule in rules() for name in _RECORDED.findall(str(rule["expr"]))}

    assert used <= recorded
    assert used  # the alerts read the recorded ratios, not their own copies


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout

    # And it refuses what Prometheus would: an expression that does not parse.
    broken = tmp_path / "broken.rules.yaml"
    broken.write_text(RULES.read_text().replace("> 300", "> > 300", 1))
    assert promtool("check", "rules", str(broken)).returncode != 0


# -- the Grafana dashboard ----------------------------------------------------------------

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "canvas-jobs.json"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_every_dashboard_query_names_exported_metrics_or_recorded_rules() -> None:
    queries = [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]
    recorded = {rule["record"] for rule in rules() if "record" in rule}

    assert queries
    assert unknown_metrics(queries, exported()) == set()
    assert {name for query in queries for name in _RECORDED.findall(query)} <= recorded


def test_dashboard_panels_have_a_title_a_query_and_the_chosen_datasource() -> None:
    board = dashboard()
    [variable] = board["templating"]["list"]
    assert (variable["name"], variable["type"]) == ("datasource", "datasource")
    titles = [panel["title"] for panel in board["panels"]]
    assert len(titles) == len(set(titles))
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        for source in (panel["datasource"], *(t["datasource"] for t in panel["targets"])):
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    # The process collectors, under the canvas_ prefix every name carries.
    queries = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    assert "canvas_process_cpu_seconds_total" in queries
    assert "canvas_process_resident_memory_bytes" in queries
