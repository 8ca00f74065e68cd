"""Prometheus, its alert rules and the Grafana dashboard agree with the services and with each other.

Every metric a dashboard panel or an alert reads must be one that ``services/ranking/metrics.py``
or ``services/stream/metrics.py`` declares, with the labels the query uses; names are read from a
fresh ``CollectorRegistry`` of each (a counter ``x`` exposes ``x_total``, a histogram ``x_bucket``,
``x_sum`` and ``x_count``). Scrape targets, ports, mounts and the datasource uid must line up
between prometheus.yml, docker-compose.yml, the Grafana provisioning and the Kubernetes manifests.
tests/integration/test_metrics_exported.py checks the same names against live ``/metrics``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "infra" / "prometheus"
GRAFANA_DIR = ROOT / "infra" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "recstack.json"

# Sample names each metric type exposes, with the labels the suffix adds; None: any label (an
# Info's labels are the keys of its value).
_EXPOSED = {
    "counter": (("_total", frozenset()), ("_created", frozenset())),
    "gauge": (("", frozenset()),),
    "histogram": (
        ("_bucket", frozenset({"le"})),
        ("_sum", frozenset()),
        ("_count", frozenset()),
        ("_created", frozenset()),
    ),
    "summary": (("", frozenset({"quantile"})), ("_sum", frozenset()), ("_count", frozenset())),
    "info": (("_info", None),),
    "stateset": (("", None),),
    "unknown": (("", None),),
}


def _load_queries_module():
    spec = importlib.util.spec_from_file_location("recstack_infra_queries", PROMETHEUS_DIR / "queries.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


queries = _load_queries_module()


def declared_metrics(registry: CollectorRegistry) -> dict[str, frozenset[str] | None]:
    """``{sample name: its label names}`` for every metric of ``registry``, children or not."""
    labels_of: dict[str, frozenset[str] | None] = {}
    # Label names are not part of a family that has no children yet: take them from the
    # collectors (prometheus_client keeps them in ``_labelnames``); unknown -> any label.
    for collector in list(getattr(registry, "_collector_to_names", {})):
        name = getattr(collector, "_name", None)
        if name is not None:
            names = getattr(collector, "_labelnames", None)
            labels_of[name] = None if names is None else frozenset(names)
    declared: dict[str, frozenset[str] | None] = {}
    for family in registry.collect():
        own = labels_of.get(family.name)
        for suffix, extra in _EXPOSED[family.type]:
            declared[family.name + suffix] = None if own is None or extra is None else own | extra
        for sample in family.samples:  # whatever the registry really renders is declared too
            declared.setdefault(sample.name, own)
    return declared


@pytest.fixture(scope="module")
def declared() -> dict[str, frozenset[str] | None]:
    from services.attribution.metrics import AttributionMetrics
    from services.ranking.metrics import RankingMetrics
    from services.stream.metrics import StreamMetrics

    found = declared_metrics(RankingMetrics(CollectorRegistry()).registry)
    found.update(declared_metrics(StreamMetrics(CollectorRegistry()).registry))
    found.update(declared_metrics(AttributionMetrics(CollectorRegistry()).registry))
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def alerts() -> dict:
    return yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())


@pytest.fixture(scope="module")
def prometheus() -> dict:
    return yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _all_queries() -> list:
    return queries.all_queries()


# ------------------------------------------------------------------------------ metric names


def test_registry_reading_matches_what_the_registry_renders() -> None:
    """The suffix rules above agree with prometheus_client for metrics that already have samples."""
    from prometheus_client import Counter, Gauge, Histogram, Info

    registry = CollectorRegistry()
    Counter("t_events", "x", registry=registry).inc()
    Counter("t_paths", "x", ["path"], registry=registry)  # no child: no samples, still declared
    Histogram("t_seconds", "x", ["stage"], registry=registry).labels("fetch").observe(0.1)
    Gauge("t_depth", "x", registry=registry)
    Info("t_model", "x", registry=registry).info({"version": "v1"})
    declared = declared_metrics(registry)
    assert declared["t_events_total"] == frozenset()
    assert declared["t_paths_total"] == frozenset({"path"})
    assert declared["t_seconds_bucket"] == frozenset({"stage", "le"})
    assert declared["t_seconds_count"] == frozenset({"stage"})
    assert declared["t_depth"] == frozenset()
    assert "t_model_info" in declared
    rendered = {s.name for family in registry.collect() for s in family.samples}
    assert rendered <= set(declared)


@pytest.mark.parametrize("query", _all_queries(), ids=lambda q: q.where)
def test_every_metric_read_is_declared_by_a_service(query, declared) -> None:
    for metric, matcher_labels in query.metrics.items():
        if metric in queries.PROMETHEUS_SERIES:
            continue
        assert metric in declared, (
            f"{query.where} reads {metric!r}, which neither services/ranking/metrics.py nor "
            f"services/stream/metrics.py declares:\n  {query.expr}"
        )
        labels = declared[metric]
        if labels is not None:
            unknown = matcher_labels - labels - queries.TARGET_LABELS
            assert not unknown, f"{query.where}: {metric} has no label(s) {sorted(unknown)}"


@pytest.mark.parametrize("query", _all_queries(), ids=lambda q: q.where)
def test_grouping_labels_exist_on_the_metrics_read(query, declared) -> None:
    available = set(queries.TARGET_LABELS)
    for metric in query.metrics:
        labels = declared.get(metric)
        if labels is None and metric in declared:
            return  # an Info metric: its labels are its values, anything goes
        available |= labels or set()
    unknown = query.grouping - available
    assert not unknown, f"{query.where} groups by {sorted(unknown)}, a label of none of its metrics"


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


@pytest.mark.parametrize("query", _all_queries(), ids=lambda q: q.where)
def test_rates_are_taken_of_counters_and_quantiles_of_buckets(query, declared) -> None:
    expr = _strip_strings(query.expr)
    for function, metric in re.findall(r"\b(rate|irate|increase)\s*\(\s*([a-zA-Z_:][\w:]*)", expr):
        assert metric.endswith(("_total", "_bucket", "_sum", "_count")), (
            f"{query.where}: {function}() of {metric}, which is not a counter (a gauge needs deriv/delta)"
        )
    if "histogram_quantile" in expr:
        assert any(m.endswith("_bucket") for m in query.metrics), (
            f"{query.where}: histogram_quantile over no _bucket series"
        )


def test_the_query_parser_finds_metrics_and_skips_the_rest() -> None:
    q = queries.parse(
        'histogram_quantile(0.99, sum by (le, stage) (rate(recstack_x_bucket{code!="A{b}",job=~"r|s"}'
        "[$__rate_interval]))) > 0.010 and on (instance) up offset 5m / count without (job) (other_total)"
    )
    assert set(q.metrics) == {"recstack_x_bucket", "up", "other_total"}
    assert q.metrics["recstack_x_bucket"] == {"code", "job"}
    assert q.grouping == {"le", "stage", "instance", "job"}


# ---------------------------------------------------------------------- dashboard coverage


def _panel_exprs(dashboard: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        out[panel["title"]] = [t["expr"] for t in panel.get("targets", [])]
    return out


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        (
            "request latency percentiles",
            r"histogram_quantile\(0\.99, .*recstack_ranking_request_seconds_bucket",
        ),
        ("batch sizes", r"recstack_ranking_batch_(requests|candidates)_"),
        ("path mix", r"sum by \(path\) \(rate\(recstack_ranking_path_total"),
        ("shed counts", r"recstack_ranking_shed_total"),
        ("degraded counts", r"recstack_ranking_degraded_total"),
        ("consumer lag", r"recstack_stream_consumer_lag"),
        ("freshness", r"histogram_quantile\(.*recstack_stream_freshness_seconds_bucket"),
        ("DLQ rate", r"rate\(recstack_stream_events_dead_lettered_total"),
        ("events applied/s", r"rate\(recstack_stream_events_applied_total"),
    ],
)
def test_dashboard_shows(dashboard: dict, what: str, pattern: str) -> None:
    exprs = [e for panel in _panel_exprs(dashboard).values() for e in panel]
    assert any(re.search(pattern, e) for e in exprs), f"no dashboard panel shows {what}"


def test_dashboard_is_well_formed(dashboard: dict) -> None:
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the grid"
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"panel {panel['title']!r} repeats a refId"


def test_dashboard_and_datasource_share_the_uid(dashboard: dict) -> None:
    provisioned = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus"
    for panel in dashboard["panels"]:
        for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            if ref is not None:
                assert ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]


# ------------------------------------------------------------------- prometheus and compose


def _mounts(service: dict) -> dict[str, str]:
    """``{container path: host path}`` of a service's bind mounts (short syntax)."""
    mounts = {}
    for entry in service.get("volumes", []):
        parts = str(entry).split(":")
        if parts[0].startswith("."):
            mounts[parts[1]] = parts[0]
    return mounts


@pytest.mark.parametrize(
    ("job", "service", "port"), [("recstack-ranking", "ranking", 9464), ("recstack-stream", "stream", 9465)]
)
def test_prometheus_discovers_every_replica_through_dns(
    prometheus: dict, compose: dict, job: str, service: str, port: int
) -> None:
    jobs = {c["job_name"]: c for c in prometheus["scrape_configs"]}
    assert job in jobs, f"prometheus.yml has no job {job}"
    (sd,) = jobs[job]["dns_sd_configs"]
    assert sd["names"] == [service] and sd.get("type", "SRV") == "A" and sd["port"] == port
    container = compose["services"][service]
    assert str(container["environment"]["RECSTACK_METRICS_PORT"]) == str(port)
    assert "container_name" not in container  # DNS answers with every replica of the service


def test_compose_mounts_the_prometheus_and_grafana_files(prometheus: dict, compose: dict) -> None:
    prom = compose["services"]["prometheus"]
    mounts = _mounts(prom)
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    assert mounts[config_flag.split("=", 1)[1]] == "./infra/prometheus/prometheus.yml"
    for rule_file in prometheus["rule_files"]:
        assert mounts.get(rule_file) == "./infra/prometheus/alerts.yml"
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./infra/grafana/provisioning"
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "recstack.yml").read_text())
    (provider,) = providers["providers"]
    assert mounts[provider["options"]["path"]] == "./infra/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    source = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in prom["ports"]


def test_kubernetes_scrape_config_matches_the_manifests() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    relabels = job["relabel_configs"]
    assert any(
        r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]
        and r.get("action") == "keep"
        and r.get("regex") == "metrics"
        for r in relabels
    )
    assert any(
        r.get("source_labels") == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
        and r.get("target_label") == "job"
        for r in relabels
    )
    compose_jobs = {
        c["job_name"]
        for c in yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
    }
    for manifest, port in (("ranking.yaml", 9464), ("stream.yaml", 9465)):
        docs = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "base" / manifest).read_text()))
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        template = deployment["spec"]["template"]
        name = template["metadata"]["labels"]["app.kubernetes.io/name"]
        assert name in compose_jobs, f"pods of {manifest} would be job {name}, unknown to the dashboard"
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        assert ports["metrics"] == port
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)


# ----------------------------------------------------------------------------------- alerts


def _runbook_anchors() -> set[str]:
    anchors = set()
    for line in (ROOT / "docs" / "OPERATIONS.md").read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_alert_rules_are_complete(alerts: dict) -> None:
    anchors = _runbook_anchors()
    names = set()
    for group in alerts["groups"]:
        for rule in group["rules"]:
            names.add(rule["alert"])
            assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            runbook = rule["annotations"]["runbook"]
            path, _, anchor = runbook.partition("#")
            assert path == "docs/OPERATIONS.md" and anchor in anchors, (
                f"{rule['alert']}: runbook {runbook} has no matching heading in docs/OPERATIONS.md"
            )
    assert len(names) == sum(len(g["rules"]) for g in alerts["groups"]), "alert names repeat"


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        (
            "p99 above 10 ms",
            r"histogram_quantile\(0\.99,[\s\S]*recstack_ranking_request_seconds_bucket[\s\S]*> 0\.010",
        ),
        ("shed rate", r"recstack_ranking_shed_total"),
        ("degraded rate", r"recstack_ranking_degraded_total"),
        ("consumer lag", r"recstack_stream_consumer_lag"),
        ("DLQ rate", r"rate\(recstack_stream_events_dead_lettered_total"),
        ("a partition held at a dead letter", r"recstack_stream_dlq_held_partitions"),
        ("impressions lost", r"recstack_impressions_dropped_total[\s\S]*recstack_impressions_failed_total"),
    ],
)
def test_alerts_cover(alerts: dict, what: str, pattern: str) -> None:
    exprs = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    assert any(re.search(pattern, e) for e in exprs), f"no alert rule for {what}"


def test_promtool_accepts_the_configuration_and_rules(tmp_path: Path) -> None:
    # `make test` installs promtool (infra/tools.sh, Debian's prometheus package): no skip.
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run `make tools` (infra/tools.sh)"

    def check(*args: str) -> None:
        result = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=PROMETHEUS_DIR)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"

    check("check", "rules", "alerts.yml")
    check("test", "rules", "alerts_test.yml")  # the alerts fire, and only, when they should
    for name in ("prometheus.yml", "kubernetes.yml"):
        config = yaml.safe_load((PROMETHEUS_DIR / name).read_text())
        config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]  # the container path, made local
        for job in config["scrape_configs"]:
            # Debian's promtool is built without Kubernetes discovery: a static target stands in for
            # it, so the rest of the job (relabelling, timeouts) is still checked by promtool; the
            # discovery block itself by test_kubernetes_scrape_config_matches_the_manifests.
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["127.0.0.1:9464"]}]
        local = tmp_path / name
        local.write_text(yaml.safe_dump(config))
        check("check", "config", str(local))
    # Every dashboard query is valid PromQL: checked as recording rules, Grafana's variables filled in.
    records = [
        {"record": f"dashboard:query_{n}", "expr": q.expr.replace("$__rate_interval", "1m")}
        for n, q in enumerate(queries.dashboard_queries(json.loads(DASHBOARD.read_text())))
    ]
    dashboard_rules = tmp_path / "dashboard_rules.yml"
    dashboard_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    check("check", "rules", str(dashboard_rules))
