"""`spa run`'s warm start (issue 21): stage processes forked from a server that imported the libraries once give
the same outputs as fresh processes, keep `spa run`'s exit codes and logs, and run vLLM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import workerproc
from spa_operator import local, warm
from spa_operator.planner import stage_graph
from spa_operator.spec import load_run
from spa_workers import contract
from test_cli import ENV, _sigint_default, error_lines, spa, write_run

WARM_LINE = "warm start: forked from the server"


def _manifests(root: Path) -> dict[str, contract.StageManifest]:
    return {str(p.parent.relative_to(root)): contract.StageManifest.from_json(p.read_text())
            for p in sorted(root.rglob(contract.MANIFEST))}


@pytest.mark.slow
def test_warm_and_cold_runs_give_the_same_stage_outputs_with_vllm(tmp_path, tiny):
    """The same run, once with every stage a fresh process (`--cold`) and once forked from the warm server: every
    stage's files have the same checksums, answers sampled by vLLM included (its engine inside the forked stage)."""
    run = write_run(tmp_path, tiny, generation={"maxNewTokens": 8, "backend": "vllm"})
    runs = {}
    for mode in ("cold", "warm"):
        proc = spa("run", str(run), "--storage", str(tmp_path / mode), *(["--cold"] if mode == "cold" else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = tmp_path / mode / "ns" / "cli"
    cold, warm_ = _manifests(runs["cold"]), _manifests(runs["warm"])
    assert sorted(cold) == sorted(warm_) and len(cold) == 5  # validate, seed-train, generate, judge, train
    for stage in cold:
        assert sorted(warm_[stage].files) == sorted(cold[stage].files), stage
        assert warm_[stage].files and all("sha256" in f for f in warm_[stage].files.values()), stage
        differ = [f for f, digest in cold[stage].files.items() if warm_[stage].files[f] != digest]
        assert differ in ([], [TRAIN_LOG]), (stage, differ)  # the training log carries wall-clock step times
        if differ:
            assert _without_times(runs["warm"] / stage / TRAIN_LOG) == _without_times(runs["cold"] / stage / TRAIN_LOG)
        # scheduled -> libraries imported (spa run sets SPA_SCHEDULED_AT; benchmarks/warm_start.py compares them)
        assert cold[stage].timings["startup_s"] >= 0 and warm_[stage].timings["startup_s"] >= 0
    generate = next(k for k in cold if k.startswith("iter-01/generate"))
    assert warm_[generate].versions["vllm_engine"] == "cpu float32 eager in-process"
    for mode, root in runs.items():
        stage_logs = [p for p in (root / "logs").iterdir() if p.name != warm.SERVER_LOG]
        assert len(stage_logs) == 5
        forked = [p.name for p in stage_logs if WARM_LINE in p.read_text()]
        assert forked == ([] if mode == "cold" else [p.name for p in stage_logs]), mode
    assert not (runs["cold"] / "logs" / warm.SERVER_LOG).exists()
    # The server forked before any thread pool started: it has the threads importing the same modules gives a fresh
    # interpreter (OpenBLAS's, jemalloc's), no more (torch's OpenMP pool would add one per extra core).
    server_log = (runs["warm"] / "logs" / warm.SERVER_LOG).read_text()
    ready = re.search(r"warm server: ready in [\d.]+s: (\d+) of (\d+) modules imported; threads: (.*)", server_log)
    assert ready and ready[1] == ready[2], server_log[-3000:]
    graph = stage_graph(load_run(run).spec, str(runs["warm"]))
    fresh = subprocess.run([sys.executable, "-c", _COUNT_THREADS, *local.warm_modules(graph)], capture_output=True,
                           text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert len(ready[3].split(", ")) <= int(fresh.stdout.split()[-1]), (ready[3], fresh.stdout)


TRAIN_LOG = "train_log.jsonl"


def _without_times(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in path.read_text().splitlines()]


_COUNT_THREADS = """
import importlib, os, sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for name in sys.argv[1:]:
    importlib.import_module(name)
print(len(os.listdir("/proc/self/task")))
"""


@pytest.mark.slow
def test_a_crashing_stage_fails_the_run_with_its_exit_code_and_log(tmp_path, tiny):
    """A stage that dies with a traceback in the forked process: `spa run` exits 1 naming the stage, its exit code
    and its log, which holds the traceback; nothing after it runs."""
    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # config and tokenizer load (validate passes), weights do not
    run = write_run(tmp_path, tiny, count=0)
    doc = run.read_text().replace(tiny["model"], str(model))
    run.write_text(doc)
    proc = spa("run", str(run))
    assert proc.returncode == 1, proc.stderr[-3000:]
    logs = tmp_path / "store" / "ns" / "cli" / "logs"
    failed = [ln for ln in proc.stdout.splitlines() if "iter-00/seed-train: failed (exit 1)" in ln]
    assert len(failed) == 1 and failed[0].endswith(f"log: {logs / 'iter-00-seed-train-a1.log'}"), proc.stdout
    log = (logs / "iter-00-seed-train-a1.log").read_text()
    assert WARM_LINE in log and "Traceback (most recent call last)" in log
    assert error_lines(proc.stderr)[0].startswith("spa run: run cli failed: iter-00/seed-train")
    assert sorted(p.name for p in logs.iterdir()) == sorted(
        ["iter-00-validate-a1.log", "iter-00-seed-train-a1.log", warm.SERVER_LOG])


def _cpu_and_start(pid: int) -> tuple[float, float]:
    """(CPU seconds, Unix start time) of process `pid`, from /proc (proc(5): utime, stime, starttime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    boot = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, boot + int(fields[19]) / tick


def test_a_forked_stage_ledger_counts_its_own_cpu_and_wall_time(tmp_path, tiny):
    """A stage forked from the warm server: fork(2) resets the child's resource usage and CPU time counters (its
    getrusage is its own from the fork, not the server's imports), and its wall time - the GPUs x wall of its
    ledger - counts from the fork (its /proc start time), not from the server's start."""
    argv = ["validate", "--model", tiny["model"], "--seed-pairs", tiny["seed"], "--prompts", tiny["prompts"],
            "--output", str(tmp_path / "validate")]
    assert workerproc._forkable(tuple(argv)) and not warm.cold_requested()  # run_worker forks it from the server
    server = workerproc._warm_server()
    server.wait_ready()
    time.sleep(3.0)  # the server is older than the stage by more than this
    server_cpu, server_started = _cpu_and_start(server._pid())
    t0 = time.time()
    proc = workerproc.run_worker(*argv, env={contract.REQUESTED_GPUS_ENV: "1"})
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = contract.read_manifest(str(tmp_path / "validate")).ledger
    assert server_cpu > 1.0  # importing torch, transformers, TRL, vLLM
    assert 0 < ledger[contract.Ledger.CPU_SECONDS] < server_cpu
    assert 0 < ledger[contract.Ledger.ACCELERATOR_SECONDS] <= elapsed + 0.1  # 1 GPU x the stage's wall time
    assert t0 - server_started >= 3.0  # counted from the server's start, it would exceed `elapsed` by that


def test_cold_start_is_chosen_by_flag_or_environment(monkeypatch):
    monkeypatch.delenv(warm.COLD_ENV, raising=False)
    assert not warm.cold_requested() and warm.cold_requested(True)
    monkeypatch.setenv(warm.COLD_ENV, "1")
    assert warm.cold_requested()


@pytest.mark.slow
def test_ctrl_c_stops_a_forked_stage_and_a_rerun_resumes(tmp_path, tiny):
    """Ctrl-C while a stage forked from the warm server works: the stage stops too (it is in the same process group,
    and `spa run` waits for it), `spa run` says so in one line and exits 130, and the same command then resumes."""
    run = write_run(tmp_path, tiny, count=0)
    logs = tmp_path / "store" / "ns" / "cli" / "logs"
    seed_log = logs / "iter-00-seed-train-a1.log"
    with open(tmp_path / "spa.log", "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "spa_operator.cli", "run", str(run)], stdout=fh,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV},
                                start_new_session=True, preexec_fn=_sigint_default)
    deadline = time.time() + 600
    while not (seed_log.exists() and WARM_LINE in seed_log.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    assert WARM_LINE in seed_log.read_text()  # the stage runs, forked from the server
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert error_lines(stderr) == ["spa run: interrupted; rerun the same command to resume"]
    assert "KeyboardInterrupt" in seed_log.read_text()  # the stage saw the Ctrl-C and stopped
    seed = tmp_path / "store" / "ns" / "cli" / "iter-00" / "seed-train"
    assert not (seed / contract.MANIFEST).exists()
    again = spa("run", str(run))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (seed / contract.MANIFEST).exists()


@pytest.mark.slow
def test_a_lost_warm_server_leaves_the_run_to_finish_cold(tmp_path, tiny):
    """The server killed while a stage it forked works: that stage runs on and counts by its manifest (its exit code
    died with the server), the stages after it start cold and say why in their logs; the run succeeds."""
    run = write_run(tmp_path, tiny, count=0, heldout=True)  # validate, seed-train, evaluate
    logs = tmp_path / "store" / "ns" / "cli" / "logs"
    seed_log = logs / "iter-00-seed-train-a1.log"
    proc = subprocess.Popen([sys.executable, "-m", "spa_operator.cli", "run", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    deadline = time.time() + 600
    while not (seed_log.exists() and WARM_LINE in seed_log.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    server, stage = map(int, re.search(r"from the server \(pid (\d+);.* as pid (\d+)", seed_log.read_text()).groups())
    os.kill(server, signal.SIGKILL)
    assert warm._alive(stage)  # the stage was working when its server died
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err
    evaluate_log = (logs / "iter-00-evaluate-a1.log").read_text()
    assert evaluate_log.startswith("warm start unavailable: the warm server has exited")
    assert WARM_LINE not in evaluate_log
    assert (tmp_path / "store" / "ns" / "cli" / "iter-00" / "seed-train" / contract.MANIFEST).exists()
    assert not (logs / "iter-00-seed-train-a2.log").exists()  # the first attempt counted: nothing ran twice
