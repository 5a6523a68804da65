"""What a tenant who may create AlignmentRuns can reach, as the chart installs it: the admission policy and the
operator refuse the same runs naming the same field, the operator's RBAC never reads every Secret of the cluster,
the worker NetworkPolicy selects the pods the operator makes, and the chart's worker settings reach the operator.

The policy's CEL is evaluated with cel-python, as the API server would evaluate it (the standard macros and string
functions these expressions use behave alike); helm renders the chart."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import celpy
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chartlib import helm_template
from spa_operator import config, jobs, tenancy
from spa_operator.spec import parse_run

LISTS = ["--set", "worker.allowedImages={registry.example.com/ml/}",
         "--set", "worker.allowedJudgeEndpoints={http://judge.llm.svc:8000/v1/}",
         "--set", "worker.allowedServiceAccounts={trainer}",
         "--set", "worker.allowedSecrets={s3-creds,judge-key}",
         "--set", "worker.allowedCapabilities={IPC_LOCK}",
         "--set", "storage.secretName=platform-s3"]
RUN: dict[str, Any] = {
    "apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r", "namespace": "ml"},
    "spec": {"model": {"sft": "s3://m/sft"}, "data": {"seed": "s3://d/s.jsonl", "prompts": "s3://d/p.jsonl"},
             "storage": {"uri": "s3://runs", "secretRef": {"name": "s3-creds"}},
             "evaluation": {"winRate": {"prompts": "s3://d/w.jsonl", "judge": {
                 "endpoint": "http://judge.llm.svc:8000/v1", "model": "j", "secretRef": {"name": "judge-key"}}}},
             "resources": {"train": {"gpus": 8, "capabilities": ["IPC_LOCK"]}},
             "image": "registry.example.com/ml/spa-worker:1", "serviceAccountName": "trainer"},
}


def run_with(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(RUN)
    node = doc["spec"]
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return doc


# (change, the field the admission policy and the operator both name)
REFUSED = [
    (("serviceAccountName", "default"), "spec.serviceAccountName"),
    (("serviceAccountName", "kube-admin"), "spec.serviceAccountName"),
    (("resources.train.capabilities", ["SYS_ADMIN"]), "spec.resources.train.capabilities"),
    (("resources.generate", {"capabilities": ["NET_RAW"]}), "spec.resources.generate.capabilities"),
    (("image", "evil.example.com/miner:1"), "spec.image"),
    (("resources.judge", {"image": "registry.example.com/other/x:1"}), "spec.resources.judge.image"),
    (("evaluation.winRate.judge.endpoint", "http://collector.evil.example/v1"),
     "spec.evaluation.winRate.judge.endpoint"),
    (("evaluation.winRate.judge.endpoint", "http://judge.llm.svc:8000.evil.example/v1"),
     "spec.evaluation.winRate.judge.endpoint"),
    (("evaluation.winRate.judge.endpoint", "http://judge.llm.svc:8000/v1beta"),
     "spec.evaluation.winRate.judge.endpoint"),
    (("storage.secretRef", {"name": "kube-root-creds"}), "spec.storage.secretRef.name"),
    (("evaluation.winRate.judge.secretRef", {"name": "other-team-key", "key": "k"}),
     "spec.evaluation.winRate.judge.secretRef.name"),
    (("imagePullSecrets", ["s3-creds", "someone-elses-registry"]), "spec.imagePullSecrets[1]"),
]
ALLOWED = [
    ("as given", RUN),
    ("the platform's storage Secret", run_with("storage.secretRef", {"name": "platform-s3"})),
    ("no account named", {**RUN, "spec": {k: v for k, v in RUN["spec"].items() if k != "serviceAccountName"}}),
    ("the endpoint's own path below the prefix", run_with("evaluation.winRate.judge.endpoint",
                                                          "http://judge.llm.svc:8000/v1/chat")),
]


@pytest.fixture(scope="module")
def installed() -> tuple[dict[str, Any], config.Config]:
    """The chart's admission policy and the operator's settings, as the chart renders them with LISTS."""
    docs = helm_template(*LISTS, include_crds=False)
    (policy,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    with pytest.MonkeyPatch.context() as mp:  # the operator reads the env the chart gives it
        for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]:
            if "value" in e:
                mp.setenv(e["name"], e["value"])
        return policy, config.Config.from_env()


def _cel(expression: str, **activation: Any) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expression)).evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})


def admission_denials(policy: dict[str, Any], doc: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """The messages of the policy's failed validations for a CREATE (or an UPDATE from `old`), [] when admitted."""
    request = {"operation": "UPDATE" if old else "CREATE"}
    if not all(bool(_cel(c["expression"], object=doc, oldObject=old or {}, request=request))
               for c in policy["spec"].get("matchConditions", [])):
        return []
    out = []
    for v in policy["spec"]["validations"]:
        result = _cel(v["expression"], object=doc)
        assert isinstance(result, celpy.celtypes.BoolType), (v["expression"], result)  # no evaluation error
        if not result:
            out.append(v["message"])
    return out


def operator_refusal(cfg: config.Config, doc: dict[str, Any]) -> tenancy.Violation | None:
    return tenancy.violation(parse_run(doc).spec, cfg.allowed(), cfg.worker_service_account)


@pytest.mark.parametrize(("change", "field"), REFUSED, ids=[f"{c[0]}={c[1]}" for c, _ in REFUSED])
def test_admission_and_operator_refuse_the_same_run_naming_the_same_field(installed, change, field):
    policy, cfg = installed
    doc = run_with(*change)
    denials = admission_denials(policy, doc)
    assert denials, "admitted"
    assert denials[0].startswith(field.split("[")[0] + ":"), denials
    refused = operator_refusal(cfg, doc)
    assert refused is not None and refused.field == field, refused


@pytest.mark.parametrize(("what", "doc"), ALLOWED, ids=[w for w, _ in ALLOWED])
def test_what_the_lists_allow_passes_both(installed, what, doc):
    policy, cfg = installed
    assert admission_denials(policy, doc) == []
    assert operator_refusal(cfg, doc) is None


def test_only_creation_and_spec_changes_are_checked(installed):
    """A run admitted under older lists must still get its status and finalizer writes (the API server runs the
    policy on every UPDATE of the main resource, such as kopf's finalizer patch)."""
    policy, _ = installed
    bad = run_with("serviceAccountName", "kube-admin")
    finalizer_only = copy.deepcopy(bad)
    finalizer_only["metadata"]["finalizers"] = ["spa.dev/finalizer"]
    assert admission_denials(policy, finalizer_only, old=bad) == []
    assert admission_denials(policy, run_with("serviceAccountName", "other"), old=RUN)


def test_without_lists_no_account_and_no_capability_but_anything_else():
    """The defaults: any image, endpoint and Secret (restrict them on shared clusters), but a run's pods never run
    as another account than the worker's, nor with an added capability."""
    (policy,) = [d for d in helm_template(include_crds=False) if d["kind"] == "ValidatingAdmissionPolicy"]
    open_run = run_with("image", "anything.example/x:1")
    open_run["spec"].pop("serviceAccountName")
    open_run["spec"]["resources"]["train"].pop("capabilities")
    assert admission_denials(policy, open_run) == []
    assert admission_denials(policy, run_with("serviceAccountName", "default"))
    assert operator_refusal(config.Config(), open_run) is None
    assert operator_refusal(config.Config(), RUN).field == "spec.serviceAccountName"


def _rules(role: dict[str, Any]) -> list[dict[str, Any]]:
    return role.get("rules") or []


def test_cluster_wide_the_operator_reads_secrets_only_where_bound():
    docs = helm_template("--set", "rbac.secretNamespaces={team-a}",
                         "--set", "worker.serviceAccount.namespaces={team-b}",
                         "--set", "worker.allowedSecrets={s3-creds}", "--set", "storage.secretName=platform-s3",
                         include_crds=False)
    secret_rules = [(d, r) for d in docs if d["kind"] in ("ClusterRole", "Role") for r in _rules(d)
                    if "secrets" in r["resources"]]
    ((role, rule),) = secret_rules
    assert role["kind"] == "ClusterRole" and rule["verbs"] == ["get"]
    assert sorted(rule["resourceNames"]) == ["platform-s3", "s3-creds"]  # only the names runs may use
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
                and d["roleRef"]["name"] == role["metadata"]["name"]]
    assert {(b["kind"], b["metadata"]["namespace"]) for b in bindings} == {("RoleBinding", "team-a"),
                                                                           ("RoleBinding", "team-b")}


def test_watching_namespaces_the_secret_rights_are_in_their_roles_only():
    docs = helm_template("--set", "watchNamespaces={ml}", include_crds=False)
    holders = {(d["kind"], d["metadata"].get("namespace")) for d in docs if d["kind"] in ("ClusterRole", "Role")
               for r in _rules(d) if "secrets" in r["resources"]}
    assert holders == {("Role", "ml")}


def test_network_policy_selects_the_worker_pods_of_every_worker_namespace():
    docs = helm_template("--set", "worker.networkPolicy.enabled=true", "--set", "watchNamespaces={ml,research}",
                         include_crds=False)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert {p["metadata"]["namespace"] for p in policies} == {"ml", "research"}
    pod_labels = jobs.labels(jobs.RunRef("r", "ml", "uid"), _stage(), 1)
    for p in policies:
        selector = p["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()  # it selects the operator's worker pods...
        assert p["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]  # ...every port
        assert p["spec"]["policyTypes"] == ["Ingress"]  # egress only when asked (it would isolate egress)
    egress = [d for d in helm_template("--set", "worker.networkPolicy.enabled=true",
                                       "--set", "worker.networkPolicy.egress=true", include_crds=False)
              if d["kind"] == "NetworkPolicy"]
    assert egress[0]["spec"]["policyTypes"] == ["Ingress", "Egress"] and egress[0]["spec"]["egress"]
    assert not [d for d in helm_template(include_crds=False) if d["kind"] == "NetworkPolicy"]


def _stage():
    from spa_operator.planner import stage_graph

    spec = parse_run(RUN).spec
    return stage_graph(spec, "s3://runs/ml/r/x")[0]


def test_worker_pod_defaults_and_gang_scheduler_reach_the_operator(monkeypatch):
    docs = helm_template("--set-json", 'worker.podDefaults={"gpu": {"extraResources": {"rdma/ib": "1"}, '
                                       '"env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}]}}',
                         "--set", "worker.gangScheduling.kind=volcano", "--set", "worker.gangScheduling.queue=gpu",
                         include_crds=False)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    cfg = config.Config.from_env()
    assert cfg.pod_defaults.gpu.extra_resources == {"rdma/ib": "1"} and cfg.pod_defaults.all is None
    assert (cfg.gang_scheduling.kind, cfg.gang_scheduling.scheduler_name, cfg.gang_scheduling.queue) == \
        ("volcano", "volcano", "gpu")
    roles = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "spa-spa-operator"]
    assert any(r["resources"] == ["podgroups"] and r["apiGroups"] == ["scheduling.volcano.sh"]
               for r in _rules(roles[0]))


def test_reserved_variables_in_the_chart_defaults_stop_the_operator_with_one_line(monkeypatch, capsys):
    from spa_operator import kube

    monkeypatch.setenv("SPA_WORKER_POD_DEFAULTS", '{"all": {"env": [{"name": "MASTER_ADDR", "value": "x"}]}}')
    assert kube.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spa-operator: error: SPA_WORKER_POD_DEFAULTS.all.env: MASTER_ADDR is set by the operator")
    assert "\n" not in err
