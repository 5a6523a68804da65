"""The real operator against an emulator as strict as a real API server (issue 18): what the API server refuses (NaN,
stale resourceVersions), denials by RBAC, admission and quota, APF throttling, watches that stall without closing,
terminating pods; and a Secret value that looks like a number. Each ran through the real operator process's code
(`OperatorRunner`), with Jobs completed at once by the harness and a stand-in RunStore, so each takes seconds."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import api_rules
import pytest
from cluster import Harness, pod_base_env
from operator_runner import OperatorRunner
from runs import phase, tiny_run, wait_for
from spa_workers.contract import StageManifest
from test_cluster_failures import Store, run_doc
from test_faults import FAKE, S3_KEYS, condition, finish, stages

pytestmark = pytest.mark.asyncio
OPERATOR = "spa-operator/"


def by_operator(request: Any) -> bool:
    return (request.headers.get("User-Agent") or "").startswith(OPERATOR)


def creating_job(request: Any) -> bool:
    return by_operator(request) and request.method.value.upper() == "POST" and request.resource is not None \
        and request.resource.plural == "jobs"


class FiguresStore(Store):
    """Every stage done, its manifest holding `metrics`/`counts` as given (not read through StageManifest.from_json,
    as a RunStore other than the operator's own may hand them over), its heartbeat saying `fraction`."""

    def __init__(self, metrics: dict[str, float], counts: dict[str, int] | None = None,
                 fraction: float | None = None) -> None:
        super().__init__(done=True)
        self.metrics, self.counts, self.fraction = metrics, counts or {}, fraction

    def manifests(self, args: Any) -> list[StageManifest] | None:
        return [StageManifest(stage="x", files={}, metrics=dict(self.metrics), counts=dict(self.counts))]

    def progress(self, args: Any) -> float | None:
        return self.fraction


async def test_a_nan_in_a_manifest_or_heartbeat_never_freezes_the_status(cluster):
    """A diverged stage's NaN loss (a manifest an old worker wrote) and a NaN heartbeat: the API server refuses a
    status holding one with 400, so every later status patch failed and the run showed its first stage running for
    good. Now non-finite figures are left out of the status and every body is written without NaN: the run ends."""
    nan = math.nan
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: FiguresStore(
        {"loss": nan, "reward_gap": math.inf, "reward_accuracy": 0.75}, fraction=nan))
    async with Harness(cluster, {}, instant=True):
        await op.start()
        await cluster.create_run(run_doc("diverged", iterations=1))
        assert await finish(cluster, "diverged", timeout=60) == "Succeeded"
        await op.stop()
    refused = [a for a in cluster.emulator.answers if a[1].startswith(OPERATOR) and a[4] == 400]
    assert refused == []
    train = stages(cluster, "diverged")["iter-01/train"]
    assert train["metrics"]["reward_accuracy"] == 0.75 and "loss" not in train["metrics"]
    assert "reward_gap" not in train["metrics"]


async def test_a_secret_that_looks_like_a_number_does_not_corrupt_the_status(cluster):
    """Redaction ran on the serialised patch: a Secret value "9000" turned `"responses": 19000` into `1***`, the
    patch was no longer JSON and every reconcile failed. Now only string values are redacted."""
    await cluster.create_secret("creds", {"AWS_ACCESS_KEY_ID": "9000", "AWS_SECRET_ACCESS_KEY": "s3cr3t-9f8e7d"})
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: FiguresStore(
        {}, {"responses": 19000, "pairs": 9000}))
    async with Harness(cluster, {}, instant=True):
        await op.start()
        doc = run_doc("nine9000", iterations=1)
        doc["spec"]["storage"]["secretRef"] = {"name": "creds"}
        await cluster.create_run(doc)
        assert await finish(cluster, "nine9000", timeout=60) == "Succeeded"
        await op.stop()
    generate = stages(cluster, "nine9000")["iter-01/generate"]
    assert generate["metrics"]["responses"] == 19000 and stages(cluster, "nine9000")["iter-01/judge"]["metrics"][
        "pairs"] == 9000  # numbers are never touched
    status = cluster.run("nine9000")["status"]
    assert "***" in status["storagePrefix"] and "9000" not in status["storagePrefix"]  # strings are redacted
    written = json.dumps([cluster.run_history("nine9000"), cluster.events()])
    assert "s3cr3t-9f8e7d" not in written


DENIALS = {
    "quota": (api_rules.quota_denial("batch", "jobs", "", "team-gpus", "count/jobs.batch", 4, 4), "QuotaExceeded"),
    "webhook": (api_rules.webhook_denial("policy.example.com", "image registry not allowed (token s3cr3t-9f8e7d)",
                                         "batch", "jobs"), "AdmissionDenied"),
    "rbac": (api_rules.rbac_denial("system:serviceaccount:spa:spa-operator", "create", "batch", "jobs", "ns"),
             "Forbidden"),
}


async def test_rbac_admission_and_quota_denials_are_told_apart_and_backed_off(cluster):
    """Every 403 was reported as missing RBAC, without the API server's message, and retried every retry_s. Now
    each run says who refused and keeps the refusal's own message (its secrets redacted) in its Progressing
    condition and a Warning Event, tries again after a doubling backoff, and goes on once the denial is lifted."""
    await cluster.create_secret("creds", {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "s3cr3t-9f8e7d"})
    lifted: set[str] = set()

    def deny(request: Any) -> api_rules.Denial | None:
        if not creating_job(request):
            return None
        run = request.data["metadata"]["name"].split("-i00-")[0]
        return None if run in lifted else DENIALS[run][0]

    cluster.emulator.faults.deny = deny
    op = OperatorRunner(cluster.url, ["ns"], retry_s=0.5, store_factory=lambda run, secret: Store(done=True))
    async with Harness(cluster, {}, instant=True):
        await op.start()
        for name in DENIALS:
            doc = run_doc(name)
            doc["spec"]["storage"]["secretRef"] = {"name": "creds"}
            await cluster.create_run(doc)
        t0 = time.monotonic()
        for name, (denial, reason) in DENIALS.items():
            await wait_for(lambda n=name, r=reason: condition(cluster, n, "Progressing").get("reason") == r, 20,
                           f"{name} refused with {reason}")
            said = denial.message.replace("s3cr3t-9f8e7d", "***")
            assert said in condition(cluster, name, "Progressing")["message"]
            assert said in cluster.run(name)["status"]["message"]
            warnings = await wait_for(lambda n=name: [e for e in cluster.events() if e["type"] == "Warning"
                                                      and e["involvedObject"]["name"] == n], 10, f"{name}'s Event")
            assert [e["reason"] for e in warnings] == [reason] and said in warnings[0]["message"]
        await asyncio.sleep(max(0.0, 3.5 - (time.monotonic() - t0)))
        posts = [r for r in cluster.emulator.timeline if r[2].startswith(OPERATOR) and r[1:4:2] == ("POST", "jobs")]
        # Backoff 0.5, 1, 2 s: at most 4 tries a run in 3.5 s (every 0.5 s would be 7 or more).
        assert 3 <= len(posts) <= 4 * len(DENIALS), len(posts)
        lifted.update(DENIALS)
        for name in DENIALS:
            assert await finish(cluster, name, timeout=30) == "Succeeded"
        await op.stop()
    assert "s3cr3t-9f8e7d" not in json.dumps([cluster.run_history(n) for n in DENIALS] + [cluster.events()])


async def test_apf_throttling_is_waited_out_as_retry_after_says(cluster):
    """A 429 from API Priority and Fairness carries Retry-After: the operator waits that long and sends the request
    again (as client-go does) instead of reporting a failed create and coming back after its own retry_s."""
    throttled: list[float] = []

    def throttle(request: Any) -> int | None:
        if creating_job(request) and len(throttled) < 2:
            throttled.append(time.monotonic())
            return 1
        return None

    cluster.emulator.faults.throttle = throttle
    op = OperatorRunner(cluster.url, ["ns"], retry_s=0.2, store_factory=lambda run, secret: Store(done=True))
    async with Harness(cluster, {}, instant=True):
        await op.start()
        await cluster.create_run(run_doc("throttled"))
        assert await finish(cluster, "throttled", timeout=30) == "Succeeded"
        await op.stop()
    posts = [t for t, m, agent, plural, _ in cluster.emulator.timeline
             if agent.startswith(OPERATOR) and (m, plural) == ("POST", "jobs")]
    assert len(throttled) == 2 and len(posts) == 4  # two refused, then the validate Job; then seed-train
    assert posts[1] - posts[0] >= 0.95 and posts[2] - posts[1] >= 0.95, posts  # Retry-After: 1, not retry_s
    messages = [v.get("status", {}).get("message", "") for v in cluster.run_history("throttled")]
    assert not any("failed" in m or "429" in m for m in messages), messages


async def test_a_terminating_pod_of_the_last_attempt_holds_the_next_one_back(cluster, s3_env):
    """A pod with a deletionTimestamp may still run (its node cut off from the API server) and write to the same
    prefix: it counts as live, so the next attempt starts only when it is gone (with the Job's podReplacementPolicy
    Failed, Kubernetes does the same for the replacement pods of one Job)."""
    held: dict[str, str] = {}

    async def before_finish(job: dict[str, Any]) -> None:
        if job["metadata"]["name"] != "cutoff-i00-validate-a1":
            return
        pod = await harness._pod(job, 0, 9, {"phase": "Running"})  # the pod on the cut-off node
        path = f"/api/v1/namespaces/ns/pods/{pod}"
        await cluster.request("PATCH", path, {"metadata": {"finalizers": ["test.spa.dev/node-unreachable"]}},
                              "application/merge-patch+json")
        assert (await cluster.request("DELETE", path))[0] == 200  # terminating: deletionTimestamp set, still there
        held["pod"] = path

    def fault(job: dict[str, Any], index: int, pod_attempt: int) -> str | None:
        return "fail" if job["metadata"]["name"].endswith("-a1") else None

    op = OperatorRunner(cluster.url, ["ns"])
    harness = Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=0.2, fault=fault,
                      before_finish=before_finish)
    async with harness:
        await op.start()
        await cluster.create_run(tiny_run("cutoff", FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"], iterations=0,
                                          heldout=False))
        await wait_for(lambda: "waiting for pods of an earlier attempt" in (cluster.run("cutoff") or {}).get(
            "status", {}).get("message", ""), 30, "the run waiting for the terminating pod")
        await asyncio.sleep(1.5)
        assert "cutoff-i00-validate-a2" not in cluster.jobs()
        pods = cluster.pods()
        assert any(p["metadata"].get("deletionTimestamp") for p in pods.values())  # still terminating
        await cluster.request("PATCH", held["pod"], {"metadata": {"finalizers": []}}, "application/merge-patch+json")
        assert await finish(cluster, "cutoff", timeout=60) == "Succeeded"
        await op.stop()
    assert stages(cluster, "cutoff")["iter-00/validate"]["attempts"] == 2


async def test_a_watch_that_stalls_without_closing_is_noticed_quickly(cluster):
    """A watch whose connection died silently (no FIN: a NAT or proxy dropped it) looked like a quiet one for the
    client's 330 s read timeout: the run waited that long for its Job's completion. Now a watch silent past the
    inactivity limit (kube-apiserver sends a bookmark every minute; here every 0.3 s) is resumed at once, and a
    quiet watch that gets its bookmarks is left alone."""
    cluster.emulator.faults.bookmark_s = 0.3
    stalled: list[str] = []

    def stall(request: Any) -> bool:
        if by_operator(request) and request.resource.plural == "jobs" and not stalled:
            stalled.append(request.params.get("resourceVersion", ""))
            return True
        return False

    cluster.emulator.faults.stall_watch = stall
    op = OperatorRunner(cluster.url, ["ns"], watch_idle_s=1.5, timer_s=60.0,
                        store_factory=lambda run, secret: Store(done=True))
    async with Harness(cluster, {}, instant=True):
        await op.start()
        t0 = time.monotonic()
        await cluster.create_run(run_doc("stalled"))
        assert await finish(cluster, "stalled", timeout=20) == "Succeeded"
        took = time.monotonic() - t0
        watches = sum(1 for agent, plural, how, _ in cluster.emulator.reads
                      if agent.startswith(OPERATOR) and plural == "jobs" and how == "watch")
        await asyncio.sleep(2.5)  # quiet, with bookmarks: no reconnect
        again = sum(1 for agent, plural, how, _ in cluster.emulator.reads
                    if agent.startswith(OPERATOR) and plural == "jobs" and how == "watch")
        await op.stop()
    assert stalled and watches == 2 and again == watches
    assert took < 10, took


async def test_a_status_decided_from_an_older_view_is_refused(cluster):
    """Status patches carry the resourceVersion they were decided from: one that arrives after someone else wrote
    the status (a replica that took the Lease over) is refused with 409 instead of overwriting it; the operator
    reads the run again and decides anew."""
    hold = {"on": False}
    cluster.emulator.faults.hang = lambda request: hold["on"] and by_operator(request) \
        and request.subresource == "status"
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=False))
    async with Harness(cluster, {}, instant=True, instant_after=lambda: 3.0):
        await op.start()
        await cluster.create_run(run_doc("raced"))
        await wait_for(lambda: stages(cluster, "raced"), 20, "the first stage recorded")
        hold["on"] = True
        await wait_for(lambda: cluster.emulator.faults.hung, 20, "a status patch held")
        status, _ = await cluster.request(  # the newer writer
            "PATCH", "/apis/spa.dev/v1alpha1/namespaces/ns/alignmentruns/raced/status",
            {"status": {"message": "written by the replica that took over"}}, "application/merge-patch+json")
        assert status == 200
        cluster.emulator.faults.release()
        assert await finish(cluster, "raced", timeout=30) == "Failed"  # no manifests: retried, then failed
        await op.stop()
    answers = [a[4] for a in cluster.emulator.answers if a[1].startswith(OPERATOR) and a[3] == "status"]
    assert 409 in answers
    history = [v.get("status", {}).get("message") for v in cluster.run_history("raced")]
    newer = history.index("written by the replica that took over")
    assert newer + 1 < len(history)  # the operator wrote after re-reading, not over it with its stale patch
    assert phase(cluster, "raced") == "Failed"


async def test_a_job_created_before_a_refused_status_patch_is_not_created_again(cluster):
    """A reconcile creates a Job, then its status patch is refused (409: kopf's finalizer or another writer changed
    the run meanwhile) and the run is decided again from the newer version. The Job watch may not have brought the
    new Job yet (a watch lags behind the writes; here it is stalled), so the new decision would create it again and
    get 409 AlreadyExists: one wasted write per run (316 in a 1000-run benchmark). The operator remembers the Jobs
    it created until its watch shows them, as client-go's ControllerExpectations do for the ReplicaSet and Job
    controllers (pkg/controller/controller_utils.go) for the same reason."""
    hold = {"on": True}
    cluster.emulator.faults.hang = lambda request: hold["on"] and by_operator(request) \
        and request.subresource == "status"
    cluster.emulator.faults.stall_watch = lambda request: by_operator(request) and request.resource.plural == "jobs"

    def answers(plural: str, sub: str | None = None) -> list[tuple[str, int]]:  # the operator's writes: 2xx, 409...
        return [(a[0], a[4] // 100 * 100 if a[4] < 300 else a[4]) for a in cluster.emulator.answers
                if a[1].startswith(OPERATOR) and a[2] == plural and a[3] == sub and a[0] in ("POST", "PATCH")]

    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=False))
    await op.start()
    try:
        await cluster.create_run(run_doc("twice"))
        await wait_for(lambda: cluster.emulator.faults.hung and answers("jobs") == [("POST", 200)], 20,
                       "the first Job created and the status patch after it held")
        status, _ = await cluster.request(  # the newer writer
            "PATCH", "/apis/spa.dev/v1alpha1/namespaces/ns/alignmentruns/twice/status",
            {"status": {"message": "written by someone else"}}, "application/merge-patch+json")
        assert status == 200
        hold["on"] = False
        cluster.emulator.faults.release()
        await wait_for(lambda: ("PATCH", 200) in answers("alignmentruns", "status"), 20,
                       "the status written after deciding again")
        assert ("PATCH", 409) in answers("alignmentruns", "status")
        assert stages(cluster, "twice")  # the new decision still records the stage whose Job it created
    finally:
        await op.stop()
    assert answers("jobs") == [("POST", 200)]


def kopf_finalizer_patch(request: Any) -> bool:
    return (request.headers.get("User-Agent") or "").startswith("kopf") and request.method.value.upper() == "PATCH" \
        and request.resource is not None and request.resource.plural == "alignmentruns" and not request.subresource


@pytest.mark.parametrize("late_s", [0.0, 3.0])
async def test_the_first_status_patch_follows_kopfs_finalizer_however_late_it_lands(cluster, late_s):
    """kopf adds its finalizer with a PATCH of its own when a run first shows up. The operator's first status patch
    carries the resourceVersion it decided from, so sent before the finalizer lands it is refused (409 Conflict: a
    precondition on a stale resourceVersion, kube-apiserver's optimistic concurrency) and costs a second write and a
    second decision. A busy API server answers that PATCH seconds late: in a 1000-run burst one status patch per run
    was refused, because the wait for the finalizer read a metadata dict kopf had already replaced (it never saw the
    finalizer) and gave up after 2 s. The first patch follows the finalizer at once, however late it lands.

    The run's first Job does not wait for the finalizer: holding the whole first decision delayed the first Jobs of
    a 1000-run burst, and sent them all at once when the finalizers' events arrived together
    (benchmarks/results/operator_scale-issue18.md). Its Events do, like the status they report."""
    cluster.emulator.faults.delay = lambda request: late_s if kopf_finalizer_patch(request) else 0.0

    def status_answers() -> list[int]:
        return [a[4] for a in cluster.emulator.answers
                if a[1].startswith(OPERATOR) and a[2] == "alignmentruns" and a[3] == "status" and a[0] == "PATCH"]

    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=False))
    await op.start()
    try:
        await cluster.create_run(run_doc("late"))
        await wait_for(lambda: status_answers(), 30, "the run's first status patch")
        await asyncio.sleep(0.5)
    finally:
        await op.stop()
    assert status_answers()[0] == 200, status_answers()
    sent = [(t, agent) for t, method, agent, plural, sub in cluster.emulator.timeline
            if method == "PATCH" and plural == "alignmentruns"]
    finalizer_landed = next(t for t, agent in sent if agent.startswith("kopf")) + late_s
    first_status = next(t for t, agent in sent if agent.startswith(OPERATOR))
    assert finalizer_landed <= first_status < finalizer_landed + 1.5  # not a fixed wait either
    posted = [(t, plural) for t, method, agent, plural, sub in cluster.emulator.timeline
              if method == "POST" and agent.startswith(OPERATOR)]
    job_posts = [t for t, plural in posted if plural == "jobs"]
    assert len(job_posts) == 1, posted  # created once: the decision after the finalizer expects it
    if late_s:
        assert job_posts[0] < finalizer_landed - 1.5, (job_posts, finalizer_landed)
    events = [t for t, plural in posted if plural == "events"]
    assert events and min(events) >= finalizer_landed, (events, finalizer_landed)
    reasons = [e["reason"] for e in cluster.events()]
    assert len(reasons) == len(set(reasons)), reasons  # the held decision's Events are not posted twice
