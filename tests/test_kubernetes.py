"""deploy/: the Kubernetes manifests checked against Kubernetes' own schemas (kubernetes-validate,
offline), the KEDA ScaledObject against a schema written from KEDA's docs, and the Grafana
dashboard's queries against the metrics the farm really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

pytest_plugins = ["tests.dashboard_fixtures"]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30"


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def find(kind: str, name: str) -> dict:
    [doc] = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in documents()
                                      if not d["apiVersion"].startswith("keda.sh/")],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_is_valid_kubernetes(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# What KEDA's docs (keda.sh/docs/2.x/reference/scaledobject-spec, scalers/prometheus) define.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "name": {"type": "string"},
                                   "envSourceContainerName": {"type": "string"}}},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object"},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {"type": "object",
                                         "additionalProperties": {"type": "string"}},
                        },
                        "if": {"properties": {"type": {"const": "prometheus"}}},
                        "then": {"properties": {"metadata": {
                            "required": ["serverAddress", "query", "threshold"],
                            "properties": {"threshold": {"pattern": r"^\d+(\.\d+)?$"},
                                           "activationThreshold": {
                                               "pattern": r"^\d+(\.\d+)?$"},
                                           "serverAddress": {"pattern": "^https?://"}}}}},
                    },
                },
            },
        },
    },
}


def test_keda_scales_the_gpu_workers_on_the_farms_queued_jobs():
    scaled = find("ScaledObject", "renderfarm-worker-gpu")
    jsonschema.validate(scaled, SCALED_OBJECT)
    spec = scaled["spec"]
    target = find(spec["scaleTargetRef"].get("kind", "Deployment"), spec["scaleTargetRef"]["name"])
    assert target["metadata"]["namespace"] == scaled["metadata"]["namespace"]
    containers = target["spec"]["template"]["spec"]["containers"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers)
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert "renderfarm_jobs_queued" in trigger["metadata"]["query"]
    assert 'hardware=~"any|gpu"' in trigger["metadata"]["query"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_secrets_come_from_the_secret_never_a_command_line():
    secret_keys = set(find("Secret", "renderfarm")["stringData"])
    for _, doc in documents():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            line = " ".join(c.get("command", []) + c.get("args", []))
            for name, e in _env(c).items():
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "renderfarm" and ref["key"] in secret_keys
                else:  # a plain value may only refer to secret variables, never hold them
                    assert not re.search(r"(PASSWORD|TOKEN|SECRET)", name), name
            assert "requirepass " not in line.replace("requirepass \"%s\"", "")
            assert "--requirepass" not in line
    redis = find("StatefulSet", "renderfarm-redis")["spec"]["template"]["spec"]["containers"][0]
    assert "$REDIS_PASSWORD" in redis["args"][0] and "REDIS_PASSWORD" in _env(redis)


def test_gpu_worker_has_a_gpu_probes_and_time_to_finish_a_render():
    worker = find("Deployment", "renderfarm-worker-gpu")["spec"]["template"]["spec"]
    [c] = worker["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["startupProbe"]["exec"]["command"] == ["renderfarm", "health", "worker"]
    assert c["livenessProbe"]["exec"]["command"][:3] == ["renderfarm", "health", "worker"]
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "models load slowly"
    assert worker["terminationGracePeriodSeconds"] >= 60
    dashboard = find("Deployment", "renderfarm-dashboard")["spec"]["template"]["spec"]
    assert dashboard["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/healthz"


def _exported(families) -> set[str]:
    names = set()
    for family in families:
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def test_grafana_queries_name_only_metrics_the_farm_exports(dash_client, dash_farm, make_job):
    from prometheus_client import REGISTRY
    from prometheus_client.parser import text_string_to_metric_families

    import worker.metrics  # noqa: F401 (registers the worker's metrics)

    dash_farm.submit_batch([make_job()])  # a queued job, so the labelled gauges have samples
    text = dash_client.get("/metrics").get_data(as_text=True)
    exported = _exported(text_string_to_metric_families(text)) | _exported(REGISTRY.collect())
    board = json.loads((DEPLOY / "grafana" / "renderfarm.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert exprs
    used = {name for e in exprs for name in re.findall(r"\brenderfarm_\w+", e)}
    assert used - exported == set()
    # every metric the farm exports is on the board
    assert {n for n in exported if n.startswith("renderfarm_")
            and not n.endswith(("_count", "_sum"))} - used == set()
