"""deploy/kubernetes/: every manifest validated offline by real schema validators (kubernetes-validate's
Kubernetes schemas, strict; KEDA's CRD schema kept in deploy/kubernetes/schemas/), and held to the worker's
settings (queue, port, probes, grace period, secrets)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from core.settings import Settings
from tests.helpers import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33"  # the oldest minor version still supported upstream when written
KEDA_SCHEMAS = {
    "ScaledObject": K8S / "schemas" / "keda.sh_v1alpha1_scaledobject.json",
    "TriggerAuthentication": K8S / "schemas" / "keda.sh_v1alpha1_triggerauthentication.json",
}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _all() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _documents(path):
            if doc["kind"] != "Kustomization":
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def validate(doc: dict[str, Any]) -> None:
    """Raise if the resource breaks its schema: KEDA's for KEDA kinds, Kubernetes' (strict) for the rest."""
    schema_path = KEDA_SCHEMAS.get(doc["kind"]) if doc["apiVersion"].startswith("keda.sh/") else None
    if schema_path is not None:
        jsonschema.validate(doc, json.loads(schema_path.read_text()), cls=jsonschema.Draft202012Validator)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_each_manifest_validates(path: Path) -> None:
    for doc in _documents(path):
        if doc["kind"] == "Kustomization":
            listed = set(doc["resources"])
            assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
            continue
        validate(doc)


def _rename_trigger_metadata(doc: dict[str, Any]) -> None:
    doc["spec"]["triggers"][0]["metdata"] = doc["spec"]["triggers"][0].pop("metadata")


def _replica_count_as_text(doc: dict[str, Any]) -> None:
    doc["spec"]["maxReplicaCount"] = "twenty"


def _no_scale_target(doc: dict[str, Any]) -> None:
    del doc["spec"]["scaleTargetRef"]


def _misspelt_probe(doc: dict[str, Any]) -> None:
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}


def _replicas_as_text(doc: dict[str, Any]) -> None:
    doc["spec"]["replicas"] = "one"


@pytest.mark.parametrize(
    ("resource", "breakage", "error"),
    [
        (("ScaledObject", "allscore-worker"), _rename_trigger_metadata, jsonschema.ValidationError),
        (("ScaledObject", "allscore-worker"), _replica_count_as_text, jsonschema.ValidationError),
        (("ScaledObject", "allscore-worker"), _no_scale_target, jsonschema.ValidationError),
        (("Deployment", "allscore-worker"), _misspelt_probe, kubernetes_validate.ValidationError),
        (("Deployment", "allscore-worker"), _replicas_as_text, kubernetes_validate.ValidationError),
    ],
    ids=[
        "ScaledObject trigger metadata misspelt",
        "ScaledObject replica count as text",
        "ScaledObject without a scale target",
        "Deployment probe misspelt",
        "Deployment replicas as text",
    ],
)
def test_the_validators_refuse_a_broken_resource(
    resource: tuple[str, str], breakage: Callable[[dict[str, Any]], None], error: type[Exception]
) -> None:
    doc = copy.deepcopy(_all()[resource])
    validate(copy.deepcopy(doc))  # whole, it passes: what fails below is the breakage alone
    breakage(doc)
    with pytest.raises(error):
        validate(doc)


def _env(container: dict[str, Any], config: dict[str, str]) -> dict[str, Any]:
    env: dict[str, Any] = dict(config)
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def test_the_worker_deployment_and_its_scaler_agree_with_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _all()
    config = docs[("ConfigMap", "allscore-config")]["data"]
    secret_keys = set(_documents(K8S / "secret.example.yaml")[0]["stringData"])
    deployment = docs[("Deployment", "allscore-worker")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container, config)
    # Every setting given is one allscore knows, with a value it takes.
    plain = {k: v for k, v in env.items() if isinstance(v, str) and k.startswith("ALLSCORE_")}
    for key, value in plain.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.metrics_port == 9540 and settings.log_format == "json"
    # Probes and the scrape annotation use the metrics port; the health endpoint is /healthz.
    (port,) = container["ports"]
    assert port["containerPort"] == settings.metrics_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port["containerPort"])
    # SIGTERM hands running samples back before the pod is killed.
    assert pod["terminationGracePeriodSeconds"] > settings.worker_shutdown_grace
    # Sizing: whole CPUs, requests equal to limits, one worker process per CPU at most.
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    assert int(resources["limits"]["cpu"]) >= settings.worker_concurrency >= 1
    # Workers log in as the least-privilege role, with the read-only store keys; every secret key exists.
    refs = [v["secretKeyRef"] for v in env.values() if isinstance(v, dict) and "secretKeyRef" in v]
    assert {r["key"] for r in refs} <= secret_keys
    assert "worker-database-url" in {r["key"] for r in refs}
    assert _documents(K8S / "secret.example.yaml")[0]["stringData"]["worker-database-url"].startswith(
        "postgresql+psycopg://allscore_worker:"
    )
    # KEDA scales this Deployment on the queue it consumes, authenticated from the same Secret.
    scaled = docs[("ScaledObject", "allscore-worker")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == settings.queue
    auth = docs[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    assert {ref["key"] for ref in auth["spec"]["secretTargetRef"]} <= secret_keys
    assert scaled["spec"]["minReplicaCount"] >= 1  # a worker is always there to take a sample at once


def test_the_other_pods_use_their_roles_and_secrets() -> None:
    docs = _all()
    secret_keys = set(_documents(K8S / "secret.example.yaml")[0]["stringData"])
    for kind, name, key in (
        ("Job", "allscore-migrate", "owner-database-url"),
        ("Deployment", "allscore-sweeper", "worker-database-url"),
    ):
        (container,) = docs[(kind, name)]["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item for item in container["env"]}
        assert env["ALLSCORE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == key
        keys = {i["valueFrom"]["secretKeyRef"]["key"] for i in container["env"] if "valueFrom" in i}
        assert keys <= secret_keys
    (migrate,) = docs[("Job", "allscore-migrate")]["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["db", "upgrade"]


def test_the_keda_schemas_name_their_source() -> None:
    for path in KEDA_SCHEMAS.values():
        assert "cloudcoil-models-keda 2.16.1.0 (KEDA v2.16.1 CRDs)" in json.loads(path.read_text())["$comment"]
