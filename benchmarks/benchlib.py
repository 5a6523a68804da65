"""What the pipeline benchmarks (quality.py, real_model.py) share: running stages and `spa run` as subprocesses,
JSONL files, a small dependency scheduler, and reading a run's stage directories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every stage single-threaded: the benchmarks run two conditions at a time on two cores.
OMP = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(args: list[str], log_file: Path) -> None:
    # COLUMNS: rich would wrap `spa run`'s lines (e.g. "final model: <path>") at 80 columns in a log file
    env = {**os.environ, **OMP, "COLUMNS": "4000"}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as f:
        r = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if r.returncode:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(args[:3])} failed (rc {r.returncode}); log {log_file}:\n{tail}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def prompt_text(row: dict) -> str:
    p = row["prompt"]
    return p if isinstance(p, str) else p[-1]["content"]


def generate(policy: Path, prompts: Path, out: Path, n: int, seed: int, temperature: float,
             max_new_tokens: int, batch_size: int = 256, backend: str = "transformers") -> list[dict]:
    """Sample with the pipeline's own generate stage; rows in prompt order."""
    shard = out / "shard-00000-of-00001"
    if not (shard / "_SUCCESS.json").exists():
        sh([sys.executable, "-m", "spa_workers.cli", "generate", "--policy", str(policy), "--prompts", str(prompts),
            "--output", str(out), "--responses-per-prompt", str(n), "--temperature", str(temperature),
            "--max-new-tokens", str(max_new_tokens), "--backend", backend, "--seed", str(seed),
            "--batch-size", str(batch_size)], out.with_suffix(".log"))
    return sorted(read_jsonl(shard / "responses.jsonl"), key=lambda r: r["prompt_index"])


def ledger_columns(rows: list[dict]) -> tuple[str, str, str]:
    """The README tables' cost columns for one condition, from its rows' `cost` (Runs.cost_of; one row per seed, mean
    over them): (gold labels used, hours, which hours). Accelerator-hours where a stage held a GPU, else CPU-hours;
    "0" for a row without a ledger (the SFT model: given, not trained here)."""
    ledgers = [r.get("cost", {}).get("ledger", {}) for r in rows]
    if not ledgers or not any(ledgers):
        return "0", "0", "CPU-hours"
    gpu = any(lg.get("accelerator_seconds") for lg in ledgers)
    key, unit = ("accelerator_seconds", "GPU-hours") if gpu else ("cpu_seconds", "CPU-hours")
    labels = sum(lg.get("gold_labels", 0) for lg in ledgers) / len(ledgers)
    hours = sum(lg.get(key, 0) for lg in ledgers) / len(ledgers) / 3600
    mark = "~" if any(key in r.get("cost", {}).get("estimated", []) for r in rows) else ""
    return f"{labels:,.0f}", f"{mark}{hours:.3g}", unit


class Scheduler:
    """Jobs with dependencies, at most `workers` at a time. A job is handed to a worker only once its dependencies
    have finished, so a waiting job never holds a worker (and a core) that a ready one could use; ready jobs start
    in the order they became ready, and a job whose dependency failed fails with that error."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(workers)
        self.futures: dict[str, Future] = {}
        self.lock = threading.Lock()

    def add(self, key: str, fn: Callable[[], object], after: tuple[str, ...] = ()) -> None:
        deps = [self.futures[a] for a in after]
        done: Future = Future()
        self.futures[key] = done
        waiting = [len(deps)]

        def job() -> None:
            try:
                for d in deps:
                    d.result()
                done.set_result(fn())
            except Exception as e:
                done.set_exception(e)

        def dep_finished(_: Future) -> None:
            with self.lock:
                waiting[0] -= 1
                ready = waiting[0] == 0
            if ready:
                self.pool.submit(job)

        if not deps:
            self.pool.submit(job)
        for d in deps:
            d.add_done_callback(dep_finished)

    def results(self) -> dict[str, object]:
        return {k: f.result() for k, f in self.futures.items()}


class Runs:
    """The AlignmentRuns of one benchmark work folder: `spa run` them and read their stage directories."""

    namespace = "quality"

    storage: Path
    work: Path

    def root(self, name: str) -> Path:
        return self.storage / self.namespace / name

    def spa_run(self, name: str, manifest: Path, copy: dict[str, str] | None = None) -> float:
        """`spa run` the manifest; `copy` maps stage dirs (iter-XX/stage) to the run they are copied from."""
        t = time.time()
        self.copy_stages(name, copy or {})
        sh([sys.executable, "-m", "spa_operator.cli", "run", str(manifest), "--storage", str(self.storage)],
           self.log_of(name))
        return time.time() - t

    def copy_stages(self, name: str, copy: dict[str, str]) -> list[str]:
        """Copy finished stage dirs (iter-XX/stage -> the run they come from) into run `name`; the ones copied."""
        copied = []
        for stage, source in copy.items():
            src, dst = self.root(source) / stage, self.root(name) / stage
            # a sharded stage (generate, judge) has its manifests in shard-*/ only
            done = (src / "_SUCCESS.json").exists() or any(src.glob("shard-*/_SUCCESS.json"))
            if done and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(src, dst)
                copied.append(stage)
        return copied

    def log_of(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    def model_of(self, name: str, iteration: int) -> Path:
        stage = "iter-00/seed-train" if iteration == 0 else f"iter-{iteration:02d}/train"
        return self.root(name) / stage / "model"

    def cost_of(self, name: str, through: int | None = None) -> dict:
        """What run `name` spent, from its stage manifests' ledgers: every stage of iterations 0..`through` (all of
        them with None) — the cost of that iteration's model, stages copied from another run included (the model
        needed them). {"ledger": {key: amount}, "estimated": [keys]}."""
        from spa_operator import ledger
        from spa_workers import contract

        parts = []
        for stage in sorted(self.root(name).glob("iter-*/*")):
            if not stage.is_dir() or (through is not None and int(stage.parent.name.split("-")[1]) > through):
                continue
            found = sorted(stage.glob("shard-*/_SUCCESS.json")) or sorted(stage.glob("_SUCCESS.json"))
            parts.append(ledger.of_manifests([contract.StageManifest.from_json(f.read_text()) for f in found]))
        total = ledger.sum_ledgers(parts)
        return {"ledger": dict(total.amounts), "estimated": sorted(total.estimated)}

    def manifests_of(self, name: str, iteration: int) -> dict:
        out = {}
        for stage in ("judge", "train", "evaluate"):
            f = self.root(name) / f"iter-{iteration:02d}" / stage / "_SUCCESS.json"
            if stage == "train" and iteration == 0:
                f = self.root(name) / "iter-00/seed-train/_SUCCESS.json"
            if not f.exists():  # a sharded stage: the first shard's manifest (these runs use one shard)
                f = next(iter(sorted(f.parent.glob("shard-*/_SUCCESS.json"))), f)
            if f.exists():
                m = json.loads(f.read_text())
                out[stage] = {"counts": m.get("counts", {}), "metrics": m.get("metrics", {})}
        return out
