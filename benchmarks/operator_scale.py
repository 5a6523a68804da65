"""Operator scale benchmark: N concurrent AlignmentRuns against kmock's Kubernetes emulator.

The operator runs as its own process (as in a cluster), pointed at the emulator. A harness plays the Job controller
and completes every Job at once: it writes the stage's manifest(s) into a stand-in object store (a local folder that
the operator reads through a RunStore; S3 latency is not part of what is measured) and marks the Job Complete.

Measured:
- Job finished (harness wrote Complete) -> next Job of the run created (harness sees it on its watch): p50, p99, max;
- API writes by the operator per transition (Jobs created, status patches, Events, kopf's finalizer patch);
- operator RSS (peak), wall time for all runs to reach Succeeded;
- with --namespaces N, runs spread over N watched namespaces, and the latency of the operator's Job creates (its
  `KubeApi.create` calls, waits for a pooled connection included) while all their watches are open.

    python benchmarks/operator_scale.py --runs 100 300 1000
writes benchmarks/results/operator_scale.md (and prints the table).

    python benchmarks/operator_scale.py --ab /tmp/old --namespaces 100 --pods --runs --paced-runs 1000 --pairs 2
runs the operator of another checkout (PYTHONPATH=<dir>/operator:<dir>/workers) and this one alternately on the same
emulator and harness (this tree's), and writes benchmarks/results/operator_scale-ab-ns<N>.md and .jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests" / "operator"))

STAGES_PER_RUN = 5  # validate, seed-train, and 1 iteration of generate, judge, train
METRICS_PORT = 18089


class DirStore:
    """A RunStore over a local folder that stands in for the bucket: s3://b/k -> <root>/b/k."""

    def __init__(self, root: str) -> None:
        self.root = root

    def _path(self, uri: str) -> str:
        return os.path.join(self.root, uri[len("s3://"):])

    def manifests(self, args: Any) -> Any:
        from spa_workers import contract

        out = []
        for d in contract.stage_manifest_dirs(args):
            p = self._path(f"{d}/{contract.MANIFEST}")
            if not os.path.exists(p):
                return None
            with open(p) as fh:
                out.append(contract.StageManifest.from_json(fh.read()))
        return out

    def progress(self, args: Any) -> float | None:
        return None

    def write_text(self, uri: str, text: str) -> None:  # a finished run's PUBLISHED.json
        path = self._path(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)


def namespaces_of(count: int) -> list[str]:
    return ["bench"] if count <= 1 else [f"bench-{i:03d}" for i in range(count)]


def operator_main(server: str, store: str, namespaces: str, creates_log: str, profile: str | None = None) -> None:
    """The operator process (run under either tree: only what both trees have is used). Its Job creates are timed
    (a wrapper around KubeApi.create: benchmark instrumentation) and written to `creates_log` when it stops."""
    import logging

    from spa_operator import kube

    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)d %(name)s %(message)s")
    if os.environ.get("SPA_BENCH_DEBUG"):
        logging.getLogger("spa_operator").setLevel(logging.DEBUG)
    timings: list[float] = []
    create = kube.KubeApi.create

    async def timed_create(self: Any, body: dict[str, Any]) -> Any:
        t0 = time.monotonic()
        try:
            return await create(self, body)
        finally:
            if body.get("kind") == "Job":
                timings.append(time.monotonic() - t0)

    kube.KubeApi.create = timed_create  # type: ignore[method-assign]
    cfg = kube.Config(namespaces=namespaces.split(","), server=server, scanning=False, metrics_port=METRICS_PORT,
                      timer_s=300, progress_s=3600, retry_s=5, store_factory=lambda run, secret: DirStore(store))
    try:
        if profile:
            import cProfile

            with cProfile.Profile() as prof:
                asyncio.run(kube.run_operator(cfg))
            prof.dump_stats(profile)
        else:
            asyncio.run(kube.run_operator(cfg))
    finally:
        Path(creates_log).write_text(json.dumps(timings))


# Call counts that say how the operator's work divides per transition: plain functions called once per step
# (cProfile counts a coroutine once per resume; manifests are read in threads, which it does not see).
PROFILE_COUNTS = {"run watch events through kopf": ("processing.py", ("_detect_causes",)),
                  "Job and pod watch events (informer)": ("spa_operator/informer.py", ("_apply",)),
                  "reconciles (decisions)": ("reconcile.py", ("decide",)),
                  "Jobs created": ("jobs.py", ("build_stage_objects",)),
                  "status patches computed": ("status.py", ("merge_patch",)),
                  "Events posted": ("spa_operator/kubeapi.py", ("event_body",))}


def profile_report(path: str, transitions: int, top: int = 25) -> str:
    """The operator's profile: calls per transition of the steps above, then the functions that cost the most.

    cProfile measures wall time per call: on a loaded machine a function's time includes waits for the CPU, so
    compare shares and call counts, not absolute times, between runs."""
    import io
    import pstats

    stats = pstats.Stats(path)
    calls: dict[str, int] = {}
    for (file, _, func), (_, ncalls, *_) in stats.stats.items():  # type: ignore[attr-defined]
        for what, (suffix, names) in PROFILE_COUNTS.items():
            if func in names and file.endswith(suffix):
                calls[what] = calls.get(what, 0) + ncalls
    out = io.StringIO()
    out.write("per transition: " + ", ".join(f"{what} {calls.get(what, 0) / transitions:.2f}"
                                             for what in PROFILE_COUNTS) + "\n")
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(r"spa_operator|kopf/_core/(reactor|engines)", top)
    return out.getvalue()


def run_doc(i: int, namespaces: list[str]) -> dict[str, Any]:
    return {"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun",
            "metadata": {"name": f"run-{i:05d}", "namespace": namespaces[i % len(namespaces)]},
            "spec": {"model": {"sft": "s3://models/sft"},
                     "data": {"seed": "s3://data/seed.jsonl", "prompts": "s3://data/p.jsonl"},
                     "iterations": {"count": 1, "promptsPerIteration": 100},
                     "storage": {"uri": "s3://bench/runs"}}}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_kib(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


async def bench(n: int, timeout: float, job_seconds: float | None = None, pods: bool = False,
                profile: str | None = None, namespaces: int = 1, tree: str | None = None) -> dict[str, Any]:
    """One size: n runs; Jobs complete at once (a burst), or after uniform(0.5, 1.5) x job_seconds (paced); over
    `namespaces` watched namespaces; the operator of checkout `tree` (default: this one)."""
    import random
    import tempfile

    from cluster import Harness, start_cluster
    from spa_workers import contract

    store = tempfile.mkdtemp(prefix="spa-bench-store-")

    def write_manifests(job: dict[str, Any]) -> None:
        argv = job["spec"]["template"]["spec"]["containers"][0]["command"][1:]
        args = contract.ARGS_BY_STAGE[argv[0]].from_argv(argv[1:])
        for d in contract.stage_manifest_dirs(args):
            path = os.path.join(store, d[len("s3://"):], contract.MANIFEST)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(contract.StageManifest(stage=args.stage, files={}).to_json())

    if os.environ.get("SPA_BENCH_DEBUG"):  # kill -USR1 <this process>: every task's stack to stderr
        def dump_tasks() -> None:
            for task in asyncio.all_tasks():
                task.print_stack(limit=8)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
    async with start_cluster(validate_runs=False) as cluster:
        rng = random.Random(n)
        harness = Harness(cluster, env={}, instant=True, on_instant=write_manifests, instant_pods=pods,
                          instant_after=None if job_seconds is None else lambda: rng.uniform(0.5, 1.5) * job_seconds)

        names = namespaces_of(namespaces)
        for ns in names:
            await cluster.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                                 "metadata": {"name": ns}})
        where = Path(tree) if tree else ROOT
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(where / "operator"), str(where / "workers")])}
        creates_log = os.path.join(store, "creates.json")
        proc = subprocess.Popen([sys.executable, __file__, "--operator", cluster.url, store, ",".join(names),
                                 creates_log, *([profile] if profile else [])], env=env)
        try:
            async with harness:
                await asyncio.sleep(3.0 + namespaces / 20)  # operator start-up (its lists and watches)
                cpu0, emu_cpu0 = cpu_seconds(proc.pid), cpu_seconds(os.getpid())
                # This process (emulator, harness) collects no garbage while it measures: its gen-2 collections over
                # the emulator's growing store paused it for up to 0.5 s (1.3 s seen), stalls a Go API server does
                # not have, which showed as the operator's latency. Its RSS is reported instead.
                gc.collect()
                gc.freeze()
                gc.disable()
                t0 = time.monotonic()
                run_created: dict[str, float] = {}  # run -> when the API server answered its create

                async def create_run(i: int) -> None:
                    doc = run_doc(i, names)
                    await cluster.create_run(doc)
                    run_created[doc["metadata"]["name"]] = time.monotonic()

                for start in range(0, n, 50):
                    await asyncio.gather(*(create_run(i) for i in range(start, min(n, start + 50))))
                created = time.monotonic() - t0

                def succeeded() -> int:
                    count = 0
                    for (res, _, _), obj in list(cluster.emulator.objects.items()):
                        if res == "spa.dev/v1alpha1/alignmentruns" and not obj.deleted:
                            count += (obj.raw.get("status") or {}).get("phase") == "Succeeded"
                    return count

                done = 0
                peak = (0, 0)
                while time.monotonic() - t0 < timeout:
                    done = succeeded()
                    peak = rss_kib(proc.pid)
                    if done == n:
                        break
                    if os.environ.get("SPA_BENCH_DEBUG"):
                        print(f"{time.monotonic() - t0:.1f}s: {done}/{n} succeeded, {len(harness.finished)} Jobs done",
                              flush=True)
                    await asyncio.sleep(2.0)
                wall = time.monotonic() - t0
                cpu, emu_cpu = cpu_seconds(proc.pid) - cpu0, cpu_seconds(os.getpid()) - emu_cpu0
                rss_now, rss_peak = peak
                emulator_rss = rss_kib(os.getpid())[0]
            try:
                import urllib.request

                text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
                op_metrics = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines()
                              if ln.startswith(("spa_transition_seconds_sum", "spa_transition_seconds_count"))}
            except OSError:
                op_metrics = {}
        finally:
            gc.enable()
            gc.unfreeze()
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            creates = sorted(json.loads(Path(creates_log).read_text()))
        except (OSError, ValueError):
            creates = []

        writes = cluster.writes()
        kinds: dict[str, int] = {}
        for method, plural, sub in writes:
            key = f"{method} {plural}{'/' + sub if sub else ''}"
            kinds[key] = kinds.get(key, 0) + 1
        reads: dict[str, int] = {}  # the operator's and kopf's GETs (lists, gets and watches) by resource
        for method, agent, plural, sub in cluster.emulator.log:
            if method == "GET" and agent.startswith(("kopf", "spa-operator")):
                key = f"{plural}{'/' + sub if sub else ''}"
                reads[key] = reads.get(key, 0) + 1
        jobs = sum(1 for (res, _, _) in cluster.emulator.objects if res == "batch/v1/jobs")
        watch_events = {plural: count for (agent, plural), count in sorted(cluster.emulator.watch_events.items())
                        if agent.startswith(("kopf", "spa-operator"))}
    transitions = n * STAGES_PER_RUN  # every Job's completion is one transition (the last one ends the run)
    # Job finished (the harness's Complete write returned) -> the run's next Job seen on the harness's watch.
    chains: dict[str, list[str]] = {}
    for job in sorted(harness.created, key=harness.created.__getitem__):
        chains.setdefault(job.split("-i")[0], []).append(job)
    lat = sorted(harness.created[b] - harness.finished[a] for chain in chains.values()
                 for a, b in itertools.pairwise(chain) if a in harness.finished)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) >= 2 else [float("nan")] * 99
    # Run created -> its first Job seen: what a user sees of the start burst (a Job create's own latency counts
    # only the time after the decision, so it is long where decisions run at once and queue their creates).
    first = sorted(harness.created[chain[0]] - run_created[run] for run, chain in chains.items() if run in run_created)
    fq = statistics.quantiles(first, n=100, method="inclusive") if len(first) >= 2 else [float("nan")] * 99
    cq = statistics.quantiles(creates, n=100, method="inclusive") if len(creates) >= 2 else [float("nan")] * 99
    return {"runs": n, "job_s": job_seconds, "namespaces": namespaces, "pods": pods, "succeeded": done, "jobs": jobs,
            "wall_s": round(wall, 1), "job_creates": len(creates),
            "create_p50_ms": round(cq[49] * 1000, 1), "create_p99_ms": round(cq[98] * 1000, 1),
            "create_s": round(created, 1), "first_job_p50_ms": round(fq[49] * 1000, 1),
            "first_job_p99_ms": round(fq[98] * 1000, 1), "transitions_per_s": round(transitions / wall, 1),
            "emulator_cpu_ms_per_transition": round(1000 * emu_cpu / transitions, 1),
            "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
            "max_ms": round(max(lat) * 1000, 1) if lat else float("nan"), "samples": len(lat),
            "writes": len(writes), "writes_per_transition": round(len(writes) / transitions, 2),
            "write_kinds": kinds, "read_kinds": reads,
            "watch_events_per_transition": {k: round(v / transitions, 2) for k, v in watch_events.items()},
            "operator_mean_ms": round(1000 * op_metrics.get("spa_transition_seconds_sum", float("nan"))
                                      / max(op_metrics.get("spa_transition_seconds_count", 0), 1), 1),
            "operator_cpu_ms_per_transition": round(1000 * cpu / transitions, 2),
            "rss_mib": round(rss_now / 1024, 1), "rss_peak_mib": round(rss_peak / 1024, 1),
            "emulator_rss_mib": round(emulator_rss / 1024, 1)}


def table(results: list[dict[str, Any]]) -> str:
    head = ("| Jobs finish | runs | Jobs | all Succeeded in | transitions / s | Job finished → next Job created "
            "p50 / p99 / max | same, inside the operator (mean) | operator CPU / transition | emulator + harness CPU "
            "/ transition | operator API writes / transition | operator RSS (peak) |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    rows = "".join(
        f"| {finish(r)} | {r['runs']} | {r['jobs']} | {r['wall_s']} s ({r['succeeded']}/{r['runs']}) | "
        f"{r['transitions_per_s']} | {r['p50_ms']} / {r['p99_ms']} / {r['max_ms']} ms | {r['operator_mean_ms']} ms | "
        f"{r['operator_cpu_ms_per_transition']} ms | {r['emulator_cpu_ms_per_transition']} ms | "
        f"{r['writes_per_transition']} | {r['rss_mib']} MiB ({r['rss_peak_mib']} MiB) |\n" for r in results)
    kinds = "\n".join(f"- {finish(r)}, {r['runs']} runs: " + ", ".join(f"{k}: {v}" for k, v in
                                                                       sorted(r["write_kinds"].items()))
                      for r in results)
    reads = "\n".join(f"- {finish(r)}, {r['runs']} runs: " + ", ".join(f"GET {k}: {v}" for k, v in
                                                                       sorted(r.get("read_kinds", {}).items()))
                      for r in results)
    return (head + rows + "\nOperator writes by kind:\n" + kinds + "\n\nOperator reads by resource:\n" + reads
            + "\n\n" + READING)


def finish(r: dict[str, Any]) -> str:
    return "at once" if r["job_s"] is None else f"after {r['job_s']:g} s ± 50%"


READING = """How to read it:
- "at once" is a burst: every Job completes the instant it is created, so N runs keep N transitions pending at all
  times and the latency is queueing, p99 ≈ N / throughput. Throughput is bound by CPU: the operator's CPU per
  transition plus the emulator's (kmock and the harness, in Python, serve every write and watch event) on a 2-core
  machine. A p99 of 1 s for a 1000-run burst needs about 1000 transitions/s, i.e. under 1 ms of operator CPU per
  transition; each transition is 1.6 run watch events through kopf (about 1 ms each: its own status patches come
  back), 2 Job watch events (4 and 3 pod events with --pods) through the operator's own informer, a reconcile, a Job
  create, a status patch and an Event. Here the emulator (about 2x the operator's CPU per transition) is the
  bottleneck of a burst, so its p99 measures the emulator more than the operator.
- "after T s" is paced: Jobs finish T s ± 50% after they are created, so transitions arrive at about
  runs / T per second, below the operator's throughput; then the latency is the reaction time itself. Real
  stages last minutes to hours: on a cluster transitions arrive far slower than in either row.
- "inside the operator" is the spa_transition_seconds histogram: from the operator's Job index first showing the
  Job finished to the next Job created. The rest of the end-to-end latency is the emulator and the watch stream.
- Writes per transition: Job create, one status patch, one Event, plus kopf's finalizer once per run. Memory is the
  operator process's RSS.
"""


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--operator":
        operator_main(*sys.argv[2:7])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="*", default=[100, 300, 1000], help="burst: Jobs complete at once")
    p.add_argument("--paced-runs", type=int, nargs="*", default=[1000],
                   help="paced: each Job completes after --job-seconds ± 50%%")
    p.add_argument("--job-seconds", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--pods", action="store_true",
                   help="each Job also gets a pod object, and the Job and pod statuses go through the steps a "
                        "cluster writes (pod Pending, Running, Succeeded; Job active, ready, Complete)")
    p.add_argument("--out", default=str(HERE / "results" / "operator_scale.md"))
    p.add_argument("--namespaces", type=int, default=1, help="spread the runs over this many watched namespaces")
    p.add_argument("--ab", metavar="DIR", help="alternate the operator of checkout DIR (old) and this one (new), "
                                               "--pairs times per size, and write operator_scale-ab.md/.jsonl")
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--old-timeout", type=float, help="--timeout for the old operator (default: --timeout)")
    p.add_argument("--profile", metavar="FILE",
                   help="run the operator under cProfile, write its stats to FILE[.N] (one per size) and print the "
                        "calls per transition and the top functions (the CPU figures then include cProfile's cost)")
    args = p.parse_args()
    results = []
    sizes = [(n, None) for n in args.runs] + [(n, args.job_seconds) for n in args.paced_runs]
    if args.ab:
        return ab(args, sizes)
    for i, (n, job_s) in enumerate(sizes):
        profile = None if not args.profile else args.profile if len(sizes) == 1 else f"{args.profile}.{i}"
        r = asyncio.run(bench(n, args.timeout, job_s, args.pods, profile, args.namespaces))
        print(json.dumps(r), flush=True)
        if profile:
            print(profile_report(profile, n * STAGES_PER_RUN), flush=True)
        results.append(r)
    md = (f"# Operator scale (benchmarks/operator_scale.py)\n\n{time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the end), Python "
          f"{platform.python_version()}; emulator + harness in one process, the operator in another; each run is "
          f"validate, seed-train + 1 iteration ({STAGES_PER_RUN} Jobs); manifests are read from a local folder "
          f"standing in for S3.\n\n`python benchmarks/operator_scale.py {' '.join(sys.argv[1:])}`\n\n" + table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md)
    print(md)
    return 0


AB_COLUMNS = (("succeeded", "runs Succeeded"), ("wall_s", "in (s)"),
              ("operator_cpu_ms_per_transition", "operator CPU / transition (ms)"),
              ("writes_per_transition", "writes / transition"), ("rss_peak_mib", "RSS peak (MiB)"),
              ("p50_ms", "finished → next Job p50 (ms)"), ("p99_ms", "p99 (ms)"),
              ("job_creates", "Job creates answered"), ("create_p50_ms", "Job create p50 (ms)"),
              ("create_p99_ms", "Job create p99 (ms)"), ("first_job_p50_ms", "run created → first Job p50 (ms)"),
              ("first_job_p99_ms", "p99 (ms)"))


def ab(args: argparse.Namespace, sizes: list[tuple[int, float | None]]) -> int:
    """Old and new alternately (old first in odd pairs, new first in even ones), on one machine in one session."""
    rows = []
    out = HERE / "results" / f"operator_scale-ab-ns{args.namespaces}.jsonl"
    for n, job_s in sizes:
        for pair in range(args.pairs):
            order = [("old", args.ab), ("new", None)]
            for label, tree in order if pair % 2 == 0 else order[::-1]:
                load = os.getloadavg()[0]
                timeout = args.old_timeout if label == "old" and args.old_timeout else args.timeout
                r = asyncio.run(bench(n, timeout, job_s, args.pods, None, args.namespaces, tree))
                r.update(tree=label, pair=pair + 1, load_before=round(load, 1), load_after=round(os.getloadavg()[0], 1),
                         at=time.strftime("%H:%M"))
                print(json.dumps(r), flush=True)
                with out.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")
                rows.append(r)
    head = "| pair | tree | at | load 1-min before → after | " + " | ".join(h for _, h in AB_COLUMNS) + " |\n"
    head += "| --- " * (4 + len(AB_COLUMNS)) + "|\n"
    body = "".join(f"| {r['pair']} | {r['tree']} | {r['at']} | {r['load_before']} → {r['load_after']} | "
                   + " | ".join(str(r[k]) for k, _ in AB_COLUMNS) + " |\n" for r in rows)
    md = (f"# Operator scale, old vs new (benchmarks/operator_scale.py --ab)\n\n{time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} CPUs shared with other work (the load averages are in the table), Python "
          f"{platform.python_version()}; old = the operator of `{args.ab}`, new = this tree; the same emulator, "
          f"harness and script for both; {args.namespaces} watched namespaces, "
          f"{'with' if args.pods else 'without'} pods.\n\n"
          f"`python benchmarks/operator_scale.py {' '.join(sys.argv[1:])}`\n\n" + head + body)
    (HERE / "results" / f"operator_scale-ab-ns{args.namespaces}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
