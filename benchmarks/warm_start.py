"""Start-up paid once (issue 21): `spa demo` cold vs warm, per-stage time from scheduled to first work, the vLLM
engine's start and shutdown, the hash a published model no longer pays.

    python benchmarks/warm_start.py [--pairs 2] [--only demo,vllm,hash]

- demo: whole `spa demo` processes, `SPA_COLD_START=1` (every stage a fresh process) and the warm start alternating
  (A B B A ...) so both see the same load; per stage the manifests' `startup_s` (scheduled -> libraries imported)
  and whether the stage outputs (file checksums in the manifests) are identical cold vs warm (train_log.jsonl
  without its wall-clock step times).
- vllm: a vLLM engine on the tiny model as generate built it before (float32, eager, engine core and worker in
  processes of their own, vLLM's 5 s shutdown wait) and now for small stages (float32, eager, in this process, 1 s
  wait); alternating; engine start, sampling time, shutdown, and whether the answers are identical.
- hash: sha256 speed here, to put a figure on the model hash no longer taken when S3's ETag identifies the file.
- realmodel: `benchmarks/real_model.py --quick` (every stage and condition on SmolLM2-135M-Instruct, small sizes)
  cold vs warm, whole process (not in the default set: ~10+ min a pair).

The machine is shared: the load average is printed with every measurement; read ratios within one run.
Results: benchmarks/results/warm_start.md (+ .json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TRAIN_LOG = "train_log.jsonl"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------ demo


def run_demo(out: Path, cold: bool) -> dict:
    env = {**os.environ, "COLUMNS": "200", "SPA_COLD_START": "1" if cold else "0"}
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "spa_operator.cli", "demo", "--out", str(out)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"spa demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    root = out / "runs" / "default" / "tiny-demo"
    stages = {}
    for manifest in sorted(root.rglob("_SUCCESS.json")):
        m = json.loads(manifest.read_text())
        key = str(manifest.parent.relative_to(root)).split("/shard-")[0]
        files = dict(m["files"])
        if TRAIN_LOG in files:  # its wall-clock step times (time_s) differ from run to run: compare the rest
            rows = [json.loads(line) for line in (manifest.parent / TRAIN_LOG).read_text().splitlines()]
            files[TRAIN_LOG] = [{k: v for k, v in r.items() if k != "time_s"} for r in rows]
        stages[key] = {"startup_s": m["timings"].get("startup_s"), "wall_s": m["timings"].get("wall_s"),
                       "files": files}
    return {"mode": "cold" if cold else "warm", "wall_s": wall, "load_before": before, "load_after": load(),
            "stages": stages}


def bench_demo(pairs: int, work: Path) -> dict:
    runs = []
    for i in range(pairs):
        for cold in (True, False) if i % 2 == 0 else (False, True):  # A B B A: neither always goes first
            out = work / f"demo-{i}-{'cold' if cold else 'warm'}"
            shutil.rmtree(out, ignore_errors=True)
            r = run_demo(out, cold)
            log(f"demo {r['mode']}: {r['wall_s']:.1f} s (load {r['load_before']} -> {r['load_after']})")
            runs.append(r)
    cold = [r for r in runs if r["mode"] == "cold"]
    warm = [r for r in runs if r["mode"] == "warm"]
    identical = all(w["stages"][k]["files"] == c["stages"][k]["files"]
                    for c in cold for w in warm for k in c["stages"])
    per_stage = {}
    for key in cold[0]["stages"]:
        per_stage[key] = {mode: statistics.median(r["stages"][key]["startup_s"] for r in rs)
                          for mode, rs in (("cold", cold), ("warm", warm))}
    return {"runs": [{k: v for k, v in r.items() if k != "stages"} for r in runs], "identical_outputs": identical,
            "startup_s": per_stage,
            "wall_s": {"cold": [r["wall_s"] for r in cold], "warm": [r["wall_s"] for r in warm]}}


def bench_real_model(pairs: int, work: Path) -> dict:
    runs = []
    for i in range(pairs):
        for cold in (True, False) if i % 2 == 0 else (False, True):
            env = {**os.environ, "SPA_COLD_START": "1" if cold else "0"}
            before, t0 = load(), time.perf_counter()
            proc = subprocess.run([sys.executable, "benchmarks/real_model.py", "--quick", "--fresh",
                                   "--out", str(work / f"real-model-{i}-{cold}.json")],
                                  env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise RuntimeError(f"real_model.py --quick failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            r = {"mode": "cold" if cold else "warm", "wall_s": time.perf_counter() - t0, "load_before": before,
                 "load_after": load()}
            log(f"real_model --quick {r['mode']}: {r['wall_s']:.1f} s (load {before} -> {r['load_after']})")
            runs.append(r)
    return {"runs": runs}


# ------------------------------------------------------------------------------------------------------ vLLM

ENGINE_PROBE = r"""
import hashlib, json, os, sys, time
if __name__ == "__main__":
    mode, model = sys.argv[1], sys.argv[2]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if mode == "new" else "1"
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t1 = time.perf_counter()
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              enable_chunked_prefill=False, max_num_batched_tokens=2048)
    t2 = time.perf_counter()
    params = [SamplingParams(n=2, temperature=0.7, top_k=0, max_tokens=24, seed=i, detokenize=False)
              for i in range(32)]
    res = llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7, 8, 9 + i]) for i in range(32)], params,
                       use_tqdm=False)
    t3 = time.perf_counter()
    answers = [[list(o.token_ids) for o in r.outputs] for r in res]
    llm.llm_engine.engine_core.shutdown(**({"timeout": 1.0} if mode == "new" else {}))
    t4 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "engine_s": t2 - t1, "sample_s": t3 - t2, "shutdown_s": t4 - t3,
                      "tokens": sum(len(a) for r in answers for a in r),
                      "answers": hashlib.sha256(json.dumps(answers).encode()).hexdigest()}))
"""


def bench_vllm(pairs: int, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "workers"))
    from spa_workers.tiny import make_tiny_example

    model = make_tiny_example(str(work / "tiny"))["model"]
    probe = work / "engine_probe.py"
    probe.write_text(ENGINE_PROBE)
    runs = []
    for i in range(pairs):
        for mode in ("old", "new") if i % 2 == 0 else ("new", "old"):
            before = load()
            proc = subprocess.run([sys.executable, str(probe), mode, model], capture_output=True, text=True,
                                  env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
            if proc.returncode:
                raise RuntimeError(f"engine probe {mode} failed:\n{proc.stderr[-3000:]}")
            r = {"mode": mode, "load_before": before, "load_after": load(),
                 **json.loads(proc.stdout.strip().splitlines()[-1])}
            log(f"vllm {mode}: engine {r['engine_s']:.1f} s, sample {r['sample_s']:.2f} s, "
                f"shutdown {r['shutdown_s']:.2f} s (load {before} -> {r['load_after']})")
            runs.append(r)
    return {"runs": runs, "identical_answers": len({r["answers"] for r in runs}) == 1}


# ------------------------------------------------------------------------------------------------------ hash


def bench_hash(work: Path, mib: int = 256) -> dict:
    path = work / "blob"
    path.write_bytes(os.urandom(1 << 20) * mib)
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    seconds = time.perf_counter() - t0
    path.unlink()
    rate = mib / seconds
    return {"mib": mib, "seconds": seconds, "mib_per_s": rate, "est_538mb_s": 538 / rate,
            "est_14_5gb_s": 14.5e3 / rate, "load": load()}


# ------------------------------------------------------------------------------------------------------ report


def render(res: dict) -> str:
    lines = [f"# Warm start (issue 21): {res['date']}", "", f"{res['machine']}. Reproduce: `{res['command']}`.",
             "The machine was shared with other jobs: read the ratios, and the load average beside each run.", ""]
    if "demo" in res:
        d = res["demo"]
        lines += ["## `spa demo`, whole process, cold (`SPA_COLD_START=1`) vs warm, alternating", "",
                  "| run | mode | wall s | load before -> after |", "| --- | --- | --- | --- |"]
        lines += [f"| {i + 1} | {r['mode']} | {r['wall_s']:.1f} | {r['load_before']} -> {r['load_after']} |"
                  for i, r in enumerate(d["runs"])]
        cold, warm = statistics.median(d["wall_s"]["cold"]), statistics.median(d["wall_s"]["warm"])
        lines += ["", f"Median: cold {cold:.1f} s, warm {warm:.1f} s: warm/cold = {warm / cold:.2f}. Stage outputs "
                      f"(file checksums in every manifest; the training logs without their wall-clock step times) "
                      f"identical cold vs warm: {d['identical_outputs']}.", "",
                  "Per stage, scheduled -> first work (`startup_s` in the manifest: until the stage's libraries are "
                  "imported), median over the runs:", "", "| stage | cold s | warm s |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['cold']:.2f} | {v['warm']:.2f} |" for k, v in d["startup_s"].items()]
        lines += ["", "The first stage (validate) waits for the warm server to finish its imports (in `spa demo` "
                      "they overlap building the example); every later stage is forked from it.", ""]
    if "vllm" in res:
        v = res["vllm"]
        lines += ["## vLLM engine on CPU (tiny model, 32 prompts x 2 answers x 24 tokens), alternating", "",
                  "old: float32, eager, engine core and worker in processes of their own, vLLM's 5 s shutdown wait "
                  "(what generate built before); new: float32, eager, engine in the stage's process, 1 s wait "
                  "(the quick start generate now takes up to 14k planned tokens).", "",
                  "| run | engine | import s | engine start s | sampling s | shutdown s | load before -> after |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {i + 1} | {r['mode']} | {r['import_s']:.1f} | {r['engine_s']:.1f} | {r['sample_s']:.2f} | "
                  f"{r['shutdown_s']:.2f} | {r['load_before']} -> {r['load_after']} |" for i, r in enumerate(v["runs"])]
        lines += ["", f"Answers identical old vs new: {v['identical_answers']}.", ""]
    if "realmodel" in res:
        runs = res["realmodel"]["runs"]
        lines += ["## `benchmarks/real_model.py --quick`, whole process, cold vs warm, alternating", "",
                  "| run | mode | wall s | load before -> after |", "| --- | --- | --- | --- |"]
        lines += [f"| {i + 1} | {r['mode']} | {r['wall_s']:.1f} | {r['load_before']} -> {r['load_after']} |"
                  for i, r in enumerate(runs)]
        cold = statistics.median(r["wall_s"] for r in runs if r["mode"] == "cold")
        warm = statistics.median(r["wall_s"] for r in runs if r["mode"] == "warm")
        lines += ["", f"Median: cold {cold:.1f} s, warm {warm:.1f} s: warm/cold = {warm / cold:.2f}.", ""]
    if "hash" in res:
        h = res["hash"]
        lines += ["## sha256 here (what publishing a model to S3 no longer spends)", "",
                  f"{h['mib']} MiB in {h['seconds']:.2f} s = {h['mib_per_s']:.0f} MiB/s (load {h['load']}): "
                  f"~{h['est_538mb_s']:.1f} s for SmolLM2-135M's 538 MB, ~{h['est_14_5gb_s']:.0f} s for a 7B model's "
                  f"14.5 GB, read once more after writing it.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2, help="cold/warm (old/new) pairs, alternating")
    ap.add_argument("--only", default="demo,vllm,hash", help="any of demo,vllm,hash,realmodel")
    args = ap.parse_args()
    only = set(args.only.split(","))
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                 "command": "python benchmarks/warm_start.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="warm-bench-") as tmp:
        work = Path(tmp)
        if "hash" in only:
            res["hash"] = bench_hash(work)
        if "demo" in only:
            res["demo"] = bench_demo(args.pairs, work)
        if "vllm" in only:
            res["vllm"] = bench_vllm(args.pairs, work)
        if "realmodel" in only:
            res["realmodel"] = bench_real_model(args.pairs, work)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "warm_start" if only == {"demo", "vllm", "hash"} else "warm_start-" + "-".join(sorted(only))
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2))
    text = render(res)
    (RESULTS / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
