"""The executor's pieces without a cluster: no torch on import, /metrics and /healthz, Job state reading, status
patches, and the Job-event latency on the emulator."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import socket
import subprocess
import sys

import aiohttp
import pytest
from cluster import Harness, label_selector, pod_base_env, start_cluster
from operator_runner import OperatorRunner
from runs import phase, tiny_run, wait_for
from spa_operator import kube, reconcile, status


def test_operator_imports_without_torch():
    code = ("import sys; import spa_operator.kube, spa_operator.crd, spa_operator.jobs, spa_operator.runstore; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_job_view_reads_job_conditions():
    def job(status, spec=None):
        return {"metadata": {"name": "j", "labels": {"spa.dev/attempt": "3"},
                             "annotations": {"spa.dev/stage-key": "iter-01/train"}},
                "spec": spec or {}, "status": status}

    v = kube.job_view(job({}))
    assert (v.state, v.attempt, v.stage_key) == ("active", 3, "iter-01/train")
    assert kube.job_view(job({}, {"suspend": True})).state == "suspended"
    evicted = kube.job_view(job({"conditions": [{"type": "Suspended", "status": "True",
                                                 "lastTransitionTime": "2027-01-15T08:00:00Z"}]}, {"suspend": True}))
    assert evicted.suspended_since == status.parse_iso("2027-01-15T08:00:00Z") > 0
    assert kube.job_view(job({"conditions": [{"type": "Complete", "status": "True"}]})).state == "succeeded"
    bad = kube.job_view(job({"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                             "message": "exit code 2"}]}))
    assert (bad.state, bad.permanent) == ("failed", True) and "exit code 2" in bad.reason
    flaky = kube.job_view(job({"conditions": [{"type": "Failed", "status": "True",
                                               "reason": "BackoffLimitExceeded"}]}))
    assert (flaky.state, flaky.permanent) == ("failed", False)


@pytest.mark.parametrize("selector,labels,matches", [
    ("spa.dev/run-uid", {"spa.dev/run-uid": "u"}, True), ("spa.dev/run-uid", {}, False),
    ("!a", {}, True), ("!a", {"a": ""}, False), ("a=x,b==y", {"a": "x", "b": "y"}, True),
    ("a=x,b==y", {"a": "x"}, False), ("a!=x", {}, True), ("a!=x", {"a": "x"}, False),
    ("a in (x, y),c", {"a": "y", "c": "1"}, True), ("a in (x,y)", {}, False), ("a notin (x,y)", {"a": "z"}, True),
    ("a notin (x,y)", {"a": "x"}, False), ("", {}, True)])
def test_emulator_label_selectors_match_as_the_api_server_does(selector, labels, matches):
    """The emulator's labelSelector (kmock has none): what the operator's Job and pod watches rely on."""
    assert label_selector(selector)(labels) is matches


def test_emulator_label_selector_refuses_bad_syntax():
    with pytest.raises(ValueError, match="unable to parse"):
        label_selector("a b")


def test_merge_patch_and_spec_difference():
    assert status.merge_patch({"a": 1, "b": [1], "c": 3}, {"a": 1, "b": [1, 2]}) == {"b": [1, 2], "c": None}
    ignore = {"spec.suspend"}
    assert kube.first_difference({"suspend": False}, {"suspend": True}, "spec", ignore) is None
    assert kube.first_difference({"training": {"beta": 0.1}, "suspend": False},
                                 {"training": {"beta": 0.2}, "suspend": True}, "spec", ignore) == "spec.training.beta"
    assert kube.first_difference({"a": [1]}, {"a": [1], "b": 2}, "spec") == "spec.b"
    assert kube.run_root("s3://b/p/", "ns", "r", "0c6f2a9e-1111") == "s3://b/p/ns/r/0c6f2a9e"


@pytest.mark.asyncio
async def test_metrics_and_healthz_are_served():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctl = kube.make_controller(kube.Config(server="http://127.0.0.1:9", metrics_port=port))
    ctl.metrics.set_phase("ns", "r", "Running")
    runner = await kube.serve_http(ctl, "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 503  # not started yet
            ctl.healthy = True
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        assert 'spa_run_phase{namespace="ns",phase="Running",run="r"} 1.0' in text
        for name in ("spa_stage_duration_seconds", "spa_job_outcomes_total", "spa_transition_seconds",
                     "spa_iteration_reward_gap", "spa_iteration_heldout_agreement"):
            assert name in text
    finally:
        await runner.cleanup()
        await ctl.api.close()


@pytest.mark.asyncio
async def test_next_job_follows_a_finished_one_within_a_second(cluster, s3_env):
    """Event-driven transitions: Job marked Complete -> the next stage's Job exists (stub pods, see test_faults)."""
    op = OperatorRunner(cluster.url, ["ns"], timer_s=60.0)  # the safety-net timer cannot be what moves it
    async with Harness(cluster, pod_base_env({"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"}), stub=True,
                       stub_seconds=0.2) as harness:
        await op.start()
        await cluster.create_run(tiny_run("quick", {"model": "/m", "seed": "/s", "prompts": "/p"},
                                          s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"], iterations=1, heldout=False))
        await wait_for(lambda: phase(cluster, "quick") == "Succeeded", 60, "Succeeded")
        await op.stop()
    chain = ["quick-i00-validate-a1", "quick-i00-seed-train-a1", "quick-i01-generate-a1", "quick-i01-judge-a1",
             "quick-i01-train-a1"]
    gaps = [harness.created[b] - harness.finished[a] for a, b in itertools.pairwise(chain)]
    assert max(gaps) < 1.0, gaps


class NoManifests:
    """A RunStore in which no stage has finished."""

    def manifests(self, args):
        return None

    def progress(self, args):
        return None


@pytest.mark.asyncio
async def test_job_created_and_deleted_between_two_reconciles_is_retried(cluster):
    """The race behind a flaky hand-deletion test: a Job's ADDED and DELETED events both arrive before its run's
    reconciler looks again, so the Job index never showed it. The watch saw it: the stage counts a failed attempt
    and starts the next one, rather than waiting for a Job that no longer exists. Driven through the operator's own
    Job watch (list + watch against the emulator) and the real reconciler."""
    doc = tiny_run("race", {"model": "/m", "seed": "/s", "prompts": "/p"}, "bucket", "http://127.0.0.1:9",
                   iterations=1, heldout=False)
    _, run = await cluster.create_run(doc)
    ctl = kube.make_controller(kube.Config(namespaces=["ns"], server=cluster.url, metrics_port=None,
                                           store_factory=lambda run, secret: NoManifests()))
    uid = run["metadata"]["uid"]
    rs = ctl.runs.setdefault(uid, kube.RunState(uid))
    logger = logging.getLogger("test")
    watches = ctl.watch()
    try:
        await asyncio.wait_for(ctl.synced(), 10)
        await ctl.reconcile(rs, cluster.run("race"), ctl.jobs, logger, ctl.pods)
        assert not rs.waker.is_set()
        job = "race-i00-validate-a1"
        await wait_for(lambda: ctl.jobs.get(uid), 10, "the Job in the operator's index")
        assert not rs.waker.is_set()  # its ADDED event showed nothing the reconcile did not know
        assert (await cluster.request("DELETE", f"/apis/batch/v1/namespaces/ns/jobs/{job}"))[0] == 200
        await wait_for(lambda: not ctl.jobs.get(uid), 10, "the Job gone from the index")
        assert rs.waker.is_set() and job in rs.seen_jobs
        await ctl.reconcile(rs, cluster.run("race"), ctl.jobs, logger, ctl.pods)
    finally:
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        await ctl.api.close()
    seed = {s["name"]: s for s in cluster.run("race")["status"]["stages"]}["iter-00/validate"]
    assert (seed["attempts"], seed["failures"], seed["job"]) == (2, 1, "race-i00-validate-a2"), seed
    assert "race-i00-validate-a2" in cluster.jobs()


@pytest.mark.asyncio
async def test_spec_edited_right_after_the_first_stage_started_fails_the_run():
    """The spec a run started with is the one the reconcile that created its first Job saw. It was taken from the
    first reconcile that saw a started stage, so an edit landing between the two (the API server's transition rule
    off) became the "started" spec and was never refused. Driven through the real reconciler against the emulator;
    the edit comes before any other reconcile, as when the Job's own ADDED event wakes none."""
    async with start_cluster(validate_runs=False) as cluster:
        doc = tiny_run("edited", {"model": "/m", "seed": "/s", "prompts": "/p"}, "bucket", "http://127.0.0.1:9",
                       iterations=1, heldout=False)
        _, run = await cluster.create_run(doc)
        ctl = kube.make_controller(kube.Config(namespaces=["ns"], server=cluster.url, metrics_port=None,
                                               store_factory=lambda run, secret: NoManifests()))
        uid = run["metadata"]["uid"]
        rs = ctl.runs.setdefault(uid, kube.RunState(uid))
        logger = logging.getLogger("test")
        try:
            await ctl.reconcile(rs, cluster.run("edited"), {}, logger)
            assert cluster.run("edited")["status"]["stages"]
            assert (await cluster.patch_run("edited", {"spec": {"training": {"beta": 0.3}}}))[0] == 200
            await ctl.reconcile(rs, cluster.run("edited"), {}, logger)
        finally:
            await ctl.api.close()
        failed = next(c for c in cluster.run("edited")["status"]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "SpecImmutable" and failed["message"].startswith("spec.training.beta:"), failed


@pytest.mark.asyncio
async def test_api_client_sends_the_configured_token_and_maps_answers():
    """KubeApi against a recording HTTP server: the kubernetes-client Configuration's token (refreshed through its
    hook, as in-cluster tokens are) goes in the header; 409 on create reads the existing object's controlling owner,
    404 on a Secret means None, other errors raise ApiError with the status and no response body; names are quoted
    into the path, so a Secret name cannot reach another namespace."""
    import base64

    import kubernetes
    from aiohttp import web

    seen: list[tuple[str, str, str | None, str | None, bytes]] = []
    answers = {"POST": [201, 409, 422], "GET": [200, 404, 200, 404], "PATCH": [200]}

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.raw_path, request.headers.get("authorization"),
                     request.headers.get("Content-Type"), body))
        status = answers[request.method].pop(0)
        data = {"data": {"key": base64.b64encode(b"value").decode()},
                "metadata": {"uid": "j1", "ownerReferences": [{"uid": "u1", "controller": True}]}} if status == 200 \
            else {"message": "echo", "details": {"causes": [
                {"field": "spec.template.spec.containers[0].image", "message": "echo"}]}}
        return web.json_response(data, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    conf = kubernetes.client.Configuration(host=f"http://127.0.0.1:{port}")
    calls = itertools.count(1)
    conf.api_key = {"authorization": "Bearer t0"}
    conf.refresh_api_key_hook = lambda c: c.api_key.update(authorization=f"Bearer t{next(calls)}")
    api = kube.KubeApi(conf)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "ns"}}
    try:
        created = await api.create(job)
        assert created.obj is not None and created.owner is None  # the object as stored (here the server's body)
        assert await api.create(job) == (None, "u1", "j1")  # exists (its uid j1): owned by the run with uid u1
        with pytest.raises(kube.ApiError) as err:
            await api.create(job)
        assert err.value.status == 422 and "echo" not in str(err.value)
        # A 422 names the field the API server refused (issue 10, #11), never its message or value.
        assert kube.api_error(err.value) == \
            "API error 422: Unprocessable Entity (spec.template.spec.containers[0].image)"
        assert await api.read_secret("ns", "missing") is None
        assert await api.read_secret("ns", "creds") == {"key": "value"}
        assert await api.read_secret("ns", "../../other/secrets/aws") is None
        await api.patch_status("ns", "r", {"phase": "Running"})
    finally:
        await api.close()
        await runner.cleanup()
    jobs_path = "/apis/batch/v1/namespaces/ns/jobs"
    assert [(m, p) for m, p, *_ in seen] == [("POST", jobs_path)] * 2 + [("GET", f"{jobs_path}/j"), ("POST", jobs_path),
        ("GET", "/api/v1/namespaces/ns/secrets/missing"), ("GET", "/api/v1/namespaces/ns/secrets/creds"),
        ("GET", "/api/v1/namespaces/ns/secrets/..%2F..%2Fother%2Fsecrets%2Faws"),
        ("PATCH", "/apis/spa.dev/v1alpha1/namespaces/ns/alignmentruns/r/status")]
    tokens = [auth for _, _, auth, _, _ in seen]
    assert tokens == [f"Bearer t{i}" for i in range(1, 9)], tokens  # refreshed before every call
    assert seen[-1][3] == "application/merge-patch+json" and seen[-1][4] == b'{"status": {"phase": "Running"}}'


def test_lean_diff_base_is_empty_and_nothing_registered_needs_one():
    """kopf builds a diff base for every watch event by deep-copying the object (twice): the operator's storage builds
    none, which holds only while no handler reads a diff: no on.create/update/field handler, no daemon or timer with
    `idle=` (kopf resets its idle clock on a diff). A handler that names fields still gets kopf's own essence."""
    import kopf

    run = {"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun",
           "metadata": {"name": "r", "namespace": "ns", "uid": "u", "labels": {"team": "a"},
                        "annotations": {"note": "x", "spa.dev/last-handled-configuration": "{}"}},
           "spec": {"iterations": {"count": 2}, "suspend": False},
           "status": {"phase": "Running", "stages": [{"name": "iter-00/seed-train", "state": "Succeeded"}]}}
    lean = kube.LeanDiffBaseStorage(prefix="spa.dev", key="last-handled-configuration")
    stock = kopf.AnnotationsDiffBaseStorage(prefix="spa.dev", key="last-handled-configuration")
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {"template": {}}}
    assert lean.build(body=kopf.Body(run)) == {} and lean.build(body=kopf.Body(job)) == {}
    fields = [("status", "phase")]
    assert lean.build(body=kopf.Body(run), extra_fields=fields) == stock.build(body=kopf.Body(run),
                                                                               extra_fields=fields)
    registry = kopf.get_default_registry()
    assert not registry._changing.get_all_handlers()
    assert registry._spawning.get_all_handlers()  # the run daemon: registered, so the check below means something
    assert all(getattr(h, "idle", None) is None for h in registry._spawning.get_all_handlers())


def test_rotated_credentials_replace_the_client_instead_of_adding_one():
    """Failure 6: one boto3 client (~12 MiB) per credential set was kept forever, so ~40 rotations of an STS session
    token outgrew the chart's memory limit. A rotation now replaces its Secret's client; clients are bounded."""
    from spa_operator.runstore import ClientCache

    cache = ClientCache(limit=2)
    stores = [cache.store("http://127.0.0.1:9", "us-east-1", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                                                             "AWS_SESSION_TOKEN": f"token-{i}"}, "creds")
              for i in range(5)]
    assert len(cache) == 1
    assert stores[-1].client is cache.store("http://127.0.0.1:9", "us-east-1", {
        "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "token-4"}, "creds").client
    for i in range(3):  # many Secrets: the least recently used clients go
        cache.store("http://127.0.0.1:9", "us-east-1", None, f"secret-{i}")
    assert len(cache) == 2


@pytest.mark.asyncio
async def test_only_the_lease_holder_acts_and_a_silent_holder_is_replaced(cluster):
    """Two replicas never act on one run: the operator acts only while it holds a Lease. A second candidate waits;
    when the holder stops renewing, the candidate takes over only after the Lease's duration, and the old holder,
    unable to renew, gives up (LeaseLost) before that."""
    import asyncio

    from spa_operator.lease import LeaseElector, LeaseLost

    apis = [kube.make_controller(kube.Config(server=cluster.url, metrics_port=None)).api for _ in range(2)]
    a, b = (LeaseElector(api, "ns", "spa-operator", who, duration_s=1.5, renew_s=0.3)
            for api, who in zip(apis, ("a", "b"), strict=True))
    try:
        assert await a.try_acquire() and not await b.try_acquire()
        assert await a.try_acquire()  # renewing its own
        holding = asyncio.ensure_future(a.hold())
        await asyncio.sleep(1.0)
        assert not await b.try_acquire()  # kept renewed
        holding.cancel()
        t0 = asyncio.get_running_loop().time()
        await b.acquire()
        assert asyncio.get_running_loop().time() - t0 >= 1.2  # not before the Lease ran out
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(a.hold(), 5)
    finally:
        for api in apis:
            await api.close()


def test_status_is_read_from_the_body_unless_it_predates_the_last_write():
    """The status diffed against is the API server's: the body's, or the operator's last write while the body is
    older than it (kopf's finalizer patch can arrive first: taking that body would re-announce a started stage)."""
    ctl = kube.Controller.__new__(kube.Controller)
    rs = kube.RunState("u", written=("7", {"phase": "Running", "message": "written"}))
    body = {"metadata": {"resourceVersion": "6"}, "status": {}}
    assert ctl._observed_status(rs, body)["message"] == "written"
    for newer in ("7", "12"):  # ours, or someone's later edit: the body is the truth
        body = {"metadata": {"resourceVersion": newer}, "status": {"phase": "Running", "message": "edited"}}
        assert ctl._observed_status(rs, body)["message"] == "edited"


def test_a_view_the_last_reconcile_saw_is_not_a_change():
    """The wake-up filter: a Job or pod view equal to what the last reconcile saw (or to the Job it created) is no
    change; when the operator first saw a Job finished does not count; anything the decision reads does."""
    rs = kube.RunState("u")
    job = reconcile.JobView("j", "iter-00/validate", 1, "active", created=100.0)
    pod = reconcile.PodView("j-0", "j", "iter-00/validate", 1, True)
    assert rs.changed(job) and rs.changed(pod)  # never seen
    rs.saw([job, pod])
    assert not rs.changed(job) and not rs.changed(pod)
    done = dataclasses.replace(job, state="succeeded", finished_at=5.0)
    assert rs.changed(done) and rs.changed(dataclasses.replace(pod, waiting="ImagePullBackOff"))
    rs.saw([dataclasses.replace(done, finished_at=7.0)])
    assert not rs.changed(done)


@pytest.mark.asyncio
async def test_events_that_change_nothing_decided_wake_no_reconcile(cluster, monkeypatch):
    """Operator CPU per transition (issue 10, Measure): every Job and pod event woke a full reconcile (the decision,
    storage reads). Most events of a cluster change nothing the decision reads: the Job's active and ready counts,
    its pod going from ContainerCreating to Running, the ADDED event of a Job the reconciler itself created. Those
    now wake none: about 3 reconciles per Job instead of 7. The run's writes are the same."""
    from test_cluster_failures import Store, run_doc

    decisions: list[str] = []
    decide = reconcile.decide
    monkeypatch.setattr(reconcile, "decide", lambda obs: decisions.append(obs.name) or decide(obs))
    op = OperatorRunner(cluster.url, ["ns"], timer_s=60.0, progress_s=60.0,
                        store_factory=lambda run, secret: Store(done=True))
    async with Harness(cluster, {}, instant=True, instant_pods=True):
        await op.start()
        await cluster.create_run(run_doc("quiet", iterations=1))
        await wait_for(lambda: phase(cluster, "quiet") == "Succeeded", 60, "Succeeded")
        await op.stop()
    jobs = cluster.all_jobs_ever()
    assert len(jobs) == 5, jobs
    writes = sorted(f"{m} {plural}{'/' + sub if sub else ''}" for m, plural, sub in cluster.writes())
    assert writes.count("POST jobs") == 5 and writes.count("PATCH alignmentruns/status") == 6, writes
    # per Job: its pod's ADDED and Succeeded events and the Job's Complete event; one more to start the run
    assert len(decisions) <= 3 * len(jobs) + 3, len(decisions)
