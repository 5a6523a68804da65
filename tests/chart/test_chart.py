"""The Helm chart, statically: lint, render (defaults and every toggle on), Kubernetes schema validation, least
privilege, the CRD copy, the alert rules and the dashboard's queries (promtool). Needs helm and promtool
(scripts/install-tools.sh; skipped with that reason when absent)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spa_operator
from chartlib import (
    ALL_ON,
    ALL_ON_NAMESPACED,
    CHART,
    DASHBOARD,
    ROOT,
    concrete,
    dashboard,
    dashboard_queries,
    helm_template,
    metric_names,
    run,
    tool,
    write_rule_file,
)
from spa_operator import config, kube

K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]  # the oldest supported (Chart kubeVersion) and newest
RENDERINGS = {"defaults": [], "all-on": ALL_ON, "all-on-namespaced": ALL_ON_NAMESPACED}

# kubernetes-validate ships only the built-in Kubernetes schemas: the Prometheus Operator's kinds are CRDs it cannot
# know. They are checked against these minimal schemas instead (the fields the Prometheus Operator needs).
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name", "namespace"],
         "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS}}
MONITORING_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {"type": "object", "required": ["metadata", "spec"], "properties": {
        "metadata": _META,
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {"selector": {"type": "object"}, "namespaceSelector": {"type": "object"},
                                "endpoints": {"type": "array", "minItems": 1, "items": {
                                    "type": "object", "required": ["port"],
                                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                                   "interval": {"type": "string",
                                                                "pattern": "^[0-9]+(ms|s|m|h)$"}}}}}}}},
    "PodMonitor": {"type": "object", "required": ["metadata", "spec"], "properties": {
        "metadata": _META,
        "spec": {"type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
                 "properties": {"selector": {"type": "object"}, "namespaceSelector": {"type": "object"},
                                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                                    "type": "object", "required": ["port"],
                                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                                   "interval": {"type": "string"}}}}}}}},
    "PrometheusRule": {"type": "object", "required": ["metadata", "spec"], "properties": {
        "metadata": _META,
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "properties": {
                    "name": {"type": "string"},
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["expr"],
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}]}}}}}}}}},
}


@pytest.fixture(scope="module", params=sorted(RENDERINGS))
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, helm_template(*RENDERINGS[request.param])


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_helm_lint_strict():
    # helm lint has no --api-versions: it lints the monitoring templates' values; `helm template` renders them.
    for args in ([], [a for a in ALL_ON_NAMESPACED if a not in ("--api-versions", "monitoring.coreos.com/v1")]):
        r = run(tool("helm"), "lint", "--strict", str(CHART), *args)
        assert r.returncode == 0, r.stdout + r.stderr


def test_chart_version_and_crd_copy():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == spa_operator.__version__
    assert (CHART / "crds" / "alignmentrun.yaml").read_bytes() == (ROOT / "crds" / "alignmentrun.yaml").read_bytes(), \
        "the chart's CRD is stale: cp crds/alignmentrun.yaml charts/spa-operator/crds/"


def test_every_manifest_validates(rendered):
    name, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "Service", "ClusterRole", "CustomResourceDefinition"} <= kinds
    if name != "defaults":
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds, kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(doc, MONITORING_SCHEMAS[doc["kind"]])  # see MONITORING_SCHEMAS
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_monitoring_objects_need_the_api_and_the_value():
    kinds = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    # Values on, but the cluster does not serve monitoring.coreos.com/v1: nothing of it renders.
    without_api = [a for a in ALL_ON if a not in ("--api-versions", "monitoring.coreos.com/v1")]
    assert not kinds & {d["kind"] for d in helm_template(*without_api)}
    # The API served, but values off (the defaults).
    assert not kinds & {d["kind"] for d in helm_template("--api-versions", "monitoring.coreos.com/v1")}


def test_deployment_is_hardened(rendered):
    name, docs = rendered
    (dep,) = by_kind(docs, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SPA_WORKER_IMAGE"] == f"ghcr.io/spa-operator/spa-worker:{spa_operator.__version__}"
    assert env["SPA_METRICS_PORT"] == "8080" and env["SPA_WORKER_METRICS_PORT"] == "9400"
    # The worker account is the pods' default only where the chart creates it in every namespace runs may use.
    assert env.get("SPA_WORKER_SERVICE_ACCOUNT") == ("spa-worker" if name == "all-on-namespaced" else None)
    assert c["image"].endswith(f":{spa_operator.__version__}")


def test_rbac_least_privilege_and_scope(rendered):
    name, docs = rendered
    roles = by_kind(docs, "Role") + by_kind(docs, "ClusterRole")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
            assert "deletecollection" not in rule["verbs"]
            if "delete" in rule["verbs"]:  # only what the operator made: Jobs and their pods
                assert set(rule["resources"]) <= {"jobs", "pods"}, rule
            if "secrets" in rule["resources"]:
                assert rule["verbs"] == ["get"]
    (cluster_role,) = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] == "spa-spa-operator"]
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    # Never get on every Secret of the cluster: cluster-wide, a ClusterRole of its own bound only per namespace.
    assert "secrets" not in cluster_resources
    # The leader-election Lease: a Role of its own in the operator's namespace.
    lease_roles = [r for r in by_kind(docs, "Role") if any("leases" in x["resources"] for x in r["rules"])]
    assert [r["metadata"]["namespace"] for r in lease_roles] == ["spa-system"]
    run_roles = [r for r in by_kind(docs, "Role") if r not in lease_roles]
    run_bindings = [b for b in by_kind(docs, "RoleBinding") if not b["metadata"]["name"].endswith("-lease")]
    if name == "all-on-namespaced":
        # Watching listed namespaces: the namespaced rights live in a Role per namespace, not cluster-wide.
        assert {r["metadata"]["namespace"] for r in run_roles} == {"ml", "research"}
        assert {r["metadata"]["namespace"] for r in run_bindings} == {"ml", "research"}
        assert not cluster_resources & {"jobs", "services", "secrets", "alignmentruns"}
        assert all("services" in {r for rule in role["rules"] for r in rule["resources"]} for role in run_roles)
        dep = by_kind(docs, "Deployment")[0]
        assert dep["spec"]["template"]["spec"]["containers"][0]["args"] == ["--namespace=ml", "--namespace=research"]
    else:
        assert not run_roles
        assert {"jobs", "services", "alignmentruns", "alignmentruns/status", "events"} <= cluster_resources
        assert not [b for b in by_kind(docs, "ClusterRoleBinding") if b["roleRef"]["name"].endswith("-secrets")]
    # Jobs set blockOwnerDeletion on their run: OwnerReferencesPermissionEnforcement needs update on finalizers.
    for role in (run_roles or [cluster_role]):
        assert any("alignmentruns/finalizers" in r["resources"] and r["verbs"] == ["update"] for r in role["rules"])
        # spec.suspend of a run with queueName deactivates its Jobs' Kueue Workloads (and reactivates them).
        assert any(r["apiGroups"] == ["kueue.x-k8s.io"] and r["resources"] == ["workloads"]
                   and r["verbs"] == ["list", "patch"] for r in role["rules"])


def test_worker_service_account_has_no_binding(rendered):
    name, docs = rendered
    workers = [sa for sa in by_kind(docs, "ServiceAccount")
               if sa["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]
    expected = {"ml", "research"} if name == "all-on-namespaced" else {"spa-system"}
    assert {sa["metadata"]["namespace"] for sa in workers} == expected
    assert all(sa["automountServiceAccountToken"] is False for sa in workers)
    worker_name = workers[0]["metadata"]["name"]
    for binding in by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding"):
        assert all(s["name"] != worker_name for s in binding["subjects"]), binding


def test_worker_service_account_namespaces_cluster_wide():
    docs = helm_template("--set", "worker.serviceAccount.namespaces={team-a,team-b}", include_crds=False)
    workers = [d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "spa-worker"]
    assert {sa["metadata"]["namespace"] for sa in workers} == {"team-a", "team-b"}
    (dep,) = by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPA_WORKER_SERVICE_ACCOUNT"] == "spa-worker"


def test_dashboard_configmap_carries_the_dashboard():
    (cm,) = [d for d in helm_template() if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["spa-operator.json"].strip() == DASHBOARD.read_text().strip()
    assert not [d for d in helm_template("--set", "dashboard.enabled=false") if d["kind"] == "ConfigMap"]


def test_values_schema_rejects_bad_values():
    r = run(tool("helm"), "template", "spa", str(CHART), "--set", "metrics.port=0")
    assert r.returncode != 0 and "metrics" in r.stderr
    r = run(tool("helm"), "template", "spa", str(CHART), "--set", "watchNamespaces={Not_A_Namespace}")
    assert r.returncode != 0


def test_alert_rules_pass_promtool(tmp_path):
    docs = helm_template(*ALL_ON, include_crds=False)
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"SpaRunFailed", "SpaStageStuck", "SpaRunNoProgress", "SpaOperatorDown", "SpaWorkerNoHeartbeat"} <= alerts
    path = write_rule_file(tmp_path / "rules.yaml", rule["spec"]["groups"])
    r = run(tool("promtool"), "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_queries_parse(tmp_path):
    d = dashboard()
    assert d["uid"] == "spa-operator" and d["title"] == "spa-operator"
    queries = dashboard_queries()
    for title in ("Runs by phase", "Stage per run", "Iteration", "Stage duration (mean)", "Job failures",
                  "Reward gap (chosen - rejected)", "Held-out gold agreement", "Generated tokens/s",
                  "Training samples/s"):
        assert title in queries, title
    rules = [{"record": f"dashboard:query_{i}:expr", "expr": concrete(e)}
             for i, e in enumerate(e for exprs in queries.values() for e in exprs)]
    path = write_rule_file(tmp_path / "dashboard.yaml", [{"name": "dashboard", "rules": rules}])
    r = run(tool("promtool"), "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_metric_names_extraction():
    assert metric_names('histogram_quantile(0.9, sum by (stage, le) (rate(a_bucket{x="y"}[5m]))) / b') == \
        {"a_bucket", "b"}
    assert metric_names('(time() - c) > on (stage) group_left () (3 * sum by (stage) (d_sum))') == {"c", "d_sum"}
    assert metric_names('up{job="x"} == 1 and on (namespace, run) changes(e[30m]) == 0') == {"up", "e"}


def test_notes_render():
    for args, expect in (([], "all namespaces"), (["--set", "watchNamespaces={ml}"], 'ServiceAccount "spa-worker"'),
                         (["--set", "metrics.serviceMonitor.enabled=true"], "monitoring.coreos.com/v1 is not served")):
        r = run(tool("helm"), "install", "spa", str(CHART), "-n", "spa-system", "--dry-run=client", *args)
        assert r.returncode == 0, r.stderr
        notes = r.stdout.split("NOTES:", 1)[1]
        assert expect in notes and "spa-spa-operator-metrics" in notes


def test_alerts_fire_when_they_should(tmp_path):
    """promtool's rule unit tests on synthetic series: each alert fires in its situation and stays quiet in a
    healthy one (annotations are stripped: the expressions and `for` durations are under test)."""
    docs = helm_template(*ALL_ON, include_crds=False)
    (rule,) = by_kind(docs, "PrometheusRule")
    groups = rule["spec"]["groups"]
    for group in groups:
        for r in group["rules"]:
            r.pop("annotations", None)
    write_rule_file(tmp_path / "rules.yaml", groups)
    run_labels = {"namespace": "ns", "run": "r"}

    def alert(name: str, at: str, *labels: dict[str, str]) -> dict[str, Any]:
        return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": lab} for lab in labels]}

    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'spa_run_phase{namespace="ns",run="r",phase="Failed"}', "values": "0 0 1x10"},
            {"series": 'spa_run_phase{namespace="ns",run="ok",phase="Failed"}', "values": "0x12"},
            # judge has run 80 min against a 10 min mean; train 80 min against a 50 min mean (under 3x).
            {"series": 'spa_run_stage_started_timestamp_seconds{namespace="ns",run="r",iteration="1",'
                       'stage="judge"}', "values": "0x90"},
            {"series": 'spa_run_stage_started_timestamp_seconds{namespace="ns",run="ok",iteration="1",'
                       'stage="train"}', "values": "0x90"},
            {"series": 'spa_stage_duration_seconds_sum{stage="judge"}', "values": "600x90"},
            {"series": 'spa_stage_duration_seconds_count{stage="judge"}', "values": "1x90"},
            {"series": 'spa_stage_duration_seconds_sum{stage="train"}', "values": "3000x90"},
            {"series": 'spa_stage_duration_seconds_count{stage="train"}', "values": "1x90"},
            # r's progress is stuck at 0.5; ok's moves every minute.
            {"series": 'spa_run_phase{namespace="ns",run="r",phase="Running"}', "values": "1x60"},
            {"series": 'spa_run_phase{namespace="ns",run="ok",phase="Running"}', "values": "1x60"},
            {"series": 'spa_run_stage_progress{namespace="ns",run="r"}', "values": "0.5x60"},
            {"series": 'spa_run_stage_progress{namespace="ns",run="ok"}', "values": "0+0.01x60"},
            {"series": 'spa_worker_last_progress_timestamp_seconds{pod="w",stage="train"}', "values": "0x60"},
            {"series": 'up{job="spa-spa-operator-metrics"}', "values": "1 1 1 0x20"},
        ],
        "alert_rule_test": [
            alert("SpaRunFailed", "1m"),
            alert("SpaRunFailed", "5m", {"severity": "warning", "phase": "Failed", **run_labels}),
            alert("SpaStageStuck", "65m"),  # over 3x the mean, but not yet for 10m past the 1h minimum
            alert("SpaStageStuck", "75m", {"severity": "warning", "iteration": "1", "stage": "judge", **run_labels}),
            alert("SpaRunNoProgress", "40m", {"severity": "warning", "phase": "Running", **run_labels}),
            alert("SpaWorkerNoHeartbeat", "20m"),
            alert("SpaWorkerNoHeartbeat", "40m", {"severity": "warning", "pod": "w", "stage": "train"}),
            alert("SpaOperatorDown", "4m"),
            alert("SpaOperatorDown", "12m", {"severity": "critical"}),
        ],
    }]}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    r = run(tool("promtool"), "test", "rules", str(tmp_path / "tests.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_storage_defaults_from_values_reach_the_operator():
    def operator_env(*args: str) -> dict[str, str]:
        (dep,) = by_kind(helm_template(*args, include_crds=False), "Deployment")
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e["value"] for e in c["env"] if "value" in e}

    assert "SPA_DEFAULT_STORAGE_URI" not in operator_env()
    env = operator_env("--set", "storage.uri=s3://team/spa", "--set", "storage.endpoint=http://minio:9000",
                       "--set", "storage.region=eu-west-1", "--set", "storage.secretName=s3-creds")
    assert config.default_storage_from_env(env) == {"uri": "s3://team/spa", "endpoint": "http://minio:9000",
                                                  "region": "eu-west-1", "secretRef": {"name": "s3-creds"}}
    bad = run(tool("helm"), "template", "spa", str(CHART), "--set", "storage.uri=/mnt/runs")
    assert bad.returncode != 0 and "storage" in bad.stderr


def test_worker_image_allow_list_and_pending_timeout_reach_the_operator(monkeypatch):
    docs = helm_template("--set", "worker.allowedImages={registry.example.com/ml/,ghcr.io/spa-operator/}",
                         "--set", "operator.pendingTimeoutSeconds=600", include_crds=False)
    (dep,) = by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPA_ALLOWED_IMAGES"] == "registry.example.com/ml/,ghcr.io/spa-operator/"
    assert env["SPA_PENDING_TIMEOUT_S"] == "600" and "SPA_QUEUED_TIMEOUT_S" not in env
    # The operator reads them as the chart writes them.
    for key in ("SPA_ALLOWED_IMAGES", "SPA_PENDING_TIMEOUT_S"):
        monkeypatch.setenv(key, env[key])
    cfg = kube.Config.from_env()
    assert cfg.allowed_images == ("registry.example.com/ml/", "ghcr.io/spa-operator/")
    assert cfg.pending_timeout_s == 600.0 and cfg.queued_timeout_s is None
