"""deploy/grafana/allscore-workers.json and deploy/prometheus/allscore.rules.yml name only metrics a worker exports."""

from __future__ import annotations

import json
import re

import yaml

from tests.helpers import REPO_ROOT
from worker import metrics

# What the main process adds at each scrape (worker.metrics.QueueAndStatusCollector) and what Prometheus adds.
SCRAPE_TIME = {
    "allscore_queue_length",
    "allscore_samples_by_status",
    "allscore_worker_consuming",
    "allscore_exporter_source_up",
}
PROMETHEUS = {"up"}


def _exported() -> set[str]:
    names = set(SCRAPE_TIME)
    for metric in (
        metrics.CELLS_SCORED,
        metrics.CELLS_FAILED,
        metrics.SAMPLES,
        metrics.BATCH_SECONDS,
        metrics.READ_SECONDS,
        metrics.MODEL_LOADS,
        metrics.MODEL_LOAD_SECONDS,
        metrics.CELLS_PER_SECOND,
    ):
        for family in metric.collect():
            names |= {sample.name for sample in family.samples}
            if family.type == "counter":  # a labelled counter shows no sample before its first label
                names.add(f"{family.name}_total")
    return names


def _named(expr: str) -> set[str]:
    return {name for name in re.findall(r"\ballscore_[a-z_]+\b", expr)} | (
        {"up"} if re.search(r"\bup\{", expr) else set()
    )


def test_dashboard_and_rules_use_exported_metrics() -> None:
    exported = _exported() | PROMETHEUS
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "allscore-workers.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "allscore.rules.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = set().union(*(_named(expr) for expr in exprs))
    assert used and used <= exported, sorted(used - exported)
    # Every panel reads the dashboard's Prometheus data source variable, so it imports into any Grafana.
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"])
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
