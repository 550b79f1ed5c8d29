"""The operations files: Prometheus rules (promtool), the Grafana dashboard, the metrics doc.

Every PromQL expression, in the rules and in the dashboard, may only name metrics that the
pipeline serves (dataflow/metrics.py, plus Bytewax's own), series recorded by our rules, or
Prometheus' `up`; a renamed metric breaks this test instead of silently emptying a panel.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import bytewax.connectors.kafka  # noqa: F401 (registers bytewax_kafka_consumer_lag)
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

import dataflow.metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops/prometheus/search-features.rules.yml"
RULE_TESTS = ROOT / "ops/prometheus/tests/search-features.test.yml"
DASHBOARD = ROOT / "ops/grafana/search-features-dashboard.json"
DOC = ROOT / "docs/observability.md"
README = ROOT / "README.md"

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip
SCRAPE_LABELS = {"job", "instance", "le", "__name__"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: `make up` installs it (Debian's `prometheus` package, "
            "which the local stack needs anyway), or run `apt-get install prometheus`",
            pytrace=False,
        )
    return path


def our_families() -> list[Metric]:
    """Every metric family of our module or Bytewax in the registry /metrics serves."""
    assert dataflow.metrics.NAMESPACE == "search_features"
    prefixes = ("search_features_", "bytewax_")
    return [f for f in REGISTRY.collect() if f.name.startswith(prefixes)]


@cache
def served_metrics() -> dict[str, set[str]]:
    """Every series name /metrics can serve (from our module or Bytewax) → its label names."""
    names: dict[str, set[str]] = {}
    for family in our_families():
        labels = {k for s in family.samples for k in s.labels}
        # A labelled metric with no child yet has no samples: take its declared names.
        collector = REGISTRY._names_to_collectors.get(family.name)  # noqa: SLF001
        labels |= set(getattr(collector, "_labelnames", ()))
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        for suffix in suffixes.get(family.type, [""]):
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


@cache
def rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return loaded


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rules()["groups"] for rule in group["rules"]]


def recorded() -> set[str]:
    return {rule["record"] for rule in all_rules() if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (Grafana variables allowed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"\$\{?\w+\}?", "1m", text)  # $job, $__rate_interval
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        following = text[match.end() :].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue  # a function or a keyword
        names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring clauses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    found: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        found |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        found |= {label.strip() for label in grouping.split(",") if label.strip()}
    return found


def check_expr(expr: str, where: str) -> None:
    known = served_metrics()
    allowed = set(known) | recorded() | {"up"}
    unknown = metric_names(expr) - allowed
    assert not unknown, f"{where}: {sorted(unknown)} not served by the pipeline in {expr!r}"
    labels = set().union(*known.values()) | SCRAPE_LABELS
    assert label_names(expr) <= labels, f"{where}: unknown labels in {expr!r}"


# --- the PromQL helpers themselves ---------------------------------------------------------


def test_metric_names_finds_series_and_skips_functions_labels_and_variables() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (sink, le) (rate(search_features_sink_flush_seconds_"
        'bucket{job=~"$job",sink="redis"}[$__rate_interval]))) / ignoring (reason) '
        "group_left job:x:rate5m > bool 0 and on (job) up"
    )
    assert metric_names(expr) == {"search_features_sink_flush_seconds_bucket", "job:x:rate5m", "up"}
    assert label_names(expr) == {"sink", "le", "job", "reason"}


def test_an_unknown_metric_is_reported() -> None:
    with pytest.raises(AssertionError, match="search_features_typo_total"):
        check_expr("rate(search_features_typo_total[5m])", "test")


# --- Prometheus rules ----------------------------------------------------------------------


@pytest.mark.external
def test_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@pytest.mark.external
def test_rules_pass_their_promtool_unit_tests() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=RULE_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_select_only_served_metrics() -> None:
    for rule in all_rules():
        check_expr(rule["expr"], rule.get("record") or rule["alert"])


def test_rules_cover_the_rates_and_the_alerts_operators_need() -> None:
    assert {
        "job:search_features_events:rate1m",
        "job_reason:search_features_events_dropped:rate5m",
        "job_reason:search_features_events_dropped:ratio_rate5m",
        "job_topic:search_features_consumer_lag:sum",
    } <= recorded()
    alerts = {rule["alert"]: rule for rule in all_rules() if "alert" in rule}
    assert {
        "SearchFeaturesConsumerLagGrowing",
        "SearchFeaturesClockStalled",
        "SearchFeaturesDropRateHigh",
        "SearchFeaturesSinkFailures",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_the_rule_file_matches_the_glob_prometheus_loads_and_its_tests_do_not() -> None:
    # stack/stack.sh and docker-compose load ops/prometheus/*.rules.yml.
    assert RULES in set(RULES.parent.glob("*.rules.yml"))
    assert RULE_TESTS not in set(RULES.parent.glob("*.rules.yml"))


# --- Grafana dashboard -------------------------------------------------------------------


@cache
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_is_a_grafana_dashboard_with_unique_panel_ids() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 30
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_dashboard_query_selects_only_served_metrics() -> None:
    for panel in panels():
        for target in panel["targets"]:
            check_expr(target["expr"], f"panel {panel['title']!r}")


def test_the_dashboard_has_a_panel_for_each_signal() -> None:
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    for signal in (
        "search_features_consumer_lag",
        "search_features_events_total",
        "search_features_events_dropped_total",
        "search_features_sink_writes_total",
        "search_features_sink_batch_size_bucket",
        "search_features_sink_flush_seconds_bucket",
        "search_features_sink_up",
        "search_features_freshness_seconds_bucket",
        "search_features_clock_seconds",
        "search_features_dedup_ids",
        "search_features_state_keys",
    ):
        assert signal in exprs, f"no panel shows {signal}"


# --- the metrics doc ---------------------------------------------------------------------


def test_the_doc_describes_every_metric_and_alert() -> None:
    doc = DOC.read_text()
    names = [f.name + ("_total" if f.type == "counter" else "") for f in our_families()]
    assert "search_features_consumer_lag" in names
    undocumented = [name for name in names if f"`{name}`" not in doc]
    assert not undocumented, f"docs/observability.md lacks {undocumented}"
    for rule in all_rules():
        name = rule.get("alert") or rule["record"]
        assert name in doc, f"docs/observability.md lacks {name}"


def test_the_readme_points_to_the_doc_and_the_dashboard() -> None:
    readme = README.read_text()
    assert "docs/observability.md" in readme
    assert "ops/grafana" in readme


def test_stack_kafka_cluster_ids_never_start_with_a_dash() -> None:
    # The formatting tool's argument parser takes "-xyz" for an option; one random id in
    # 64 starts that way, so 4096 draws without the guard fail with near certainty.
    script = ROOT / "stack" / "stack.sh"
    text = script.read_text()
    function = re.search(r"^new_kafka_cluster_id\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert function, "stack.sh defines new_kafka_cluster_id"
    assert text.count("cluster_id=$(new_kafka_cluster_id)") == 2  # kafka and kafka-sasl
    body = function.group(0)
    ids = subprocess.run(
        ["bash", "-c", body + "new_kafka_cluster_id 4096"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len(ids) == 4096
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", i) for i in ids), ids
