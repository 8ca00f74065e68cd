"""The PromQL of the recstack Grafana dashboard and alert rules, and the metrics it reads.

Tests use it to check that every metric a panel or an alert reads is one the services declare
(tests/unit/test_observability.py) and really export (tests/integration/test_metrics_exported.py).
Run it to list them:

    python infra/prometheus/queries.py
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "recstack.json"
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"

# Series Prometheus makes itself for every target; no service declares them.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# Labels Prometheus attaches to every scraped series (target labels), usable in any expression.
TARGET_LABELS = frozenset({"instance", "job", "pod", "namespace"})

_KEYWORDS = frozenset(
    {
        # aggregation operators (may be followed by `by (...)` rather than by their parenthesis)
        "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
        "count_values", "group", "limitk", "limit_ratio",
        # binary and modifier keywords
        "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
        "offset", "atan2", "inf", "nan",
    }
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_NUMBER_OR_DURATION = re.compile(
    r"^(?:\d+(?:\.\d+)?(?:e[+-]?\d+)?|(?:\d+(?:ms|s|m|h|d|w|y))+)$", re.IGNORECASE
)


@dataclass
class Query:
    """One PromQL expression and what it reads."""

    where: str  # e.g. "dashboard panel 'Request latency' (A)" or "alert RecstackStreamStalled"
    expr: str
    metrics: dict[str, set[str]] = field(default_factory=dict)  # metric -> labels its matchers use
    grouping: set[str] = field(default_factory=set)  # labels of by/without/on/ignoring clauses


def parse(expr: str, where: str = "") -> Query:
    """The metric names of ``expr``, the labels each one's matchers use, and the grouping labels."""
    query = Query(where=where, expr=expr)
    text = _STRING.sub('""', expr)
    for match in _SELECTOR.finditer(text):
        name, body = match.group(1), match.group(2)
        labels = set(_MATCHER.findall(body))
        if name:
            query.metrics.setdefault(name, set()).update(labels - {"__name__"})
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    for match in _GROUPING.finditer(text):
        query.grouping.update(label.strip() for label in match.group(1).split(",") if label.strip())
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS or _NUMBER_OR_DURATION.match(name):
            continue  # a function, an operator keyword or a number
        query.metrics.setdefault(name, set())
    return query


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold their panels


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every target expression of every panel (rows included), parsed."""
    queries = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                where = f"dashboard panel {panel.get('title')!r} ({target.get('refId', '?')})"
                queries.append(parse(target["expr"], where))
    return queries


def rule_queries(rules: dict[str, Any]) -> list[Query]:
    """Every alerting and recording rule expression of a Prometheus rules file, parsed."""
    return [
        parse(rule["expr"], f"rule {rule.get('alert') or rule.get('record')}")
        for group in rules.get("groups", [])
        for rule in group.get("rules", [])
    ]


def all_queries(dashboard: Path = DASHBOARD, alerts: Path = ALERTS) -> list[Query]:
    return dashboard_queries(json.loads(dashboard.read_text())) + rule_queries(
        yaml.safe_load(alerts.read_text())
    )


def metric_names(queries: list[Query]) -> set[str]:
    """The metric names the queries read (Prometheus' own series such as ``up`` left out)."""
    return {name for q in queries for name in q.metrics} - PROMETHEUS_SERIES


def main() -> int:
    for name in sorted(metric_names(all_queries())):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
