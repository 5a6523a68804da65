"""vLLM on CPU: the quick start (float32, eager, in-process) against vLLM's defaults (bfloat16, compiled, engine
processes), through the pipeline's own generate stage, on the real model (SmolLM2-135M-Instruct, real_model.py's).

    python benchmarks/vllm_cpu_modes.py                      # 100 prompts x 2 answers x 40 tokens, one pair
    python benchmarks/vllm_cpu_modes.py --prompts 50 --pairs 2

Each run is `python -m spa_workers.cli generate --backend vllm` with `SPA_VLLM_CPU_MODE` fixing the mode (the
stage's own choice is by size and by whether the CPU has native bfloat16); the modes alternate. Per run: the
stage's wall time, its load time (engine start), generation time and tokens/s (its manifest's timings), and the
load average. Writes results/vllm_cpu_modes.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import OMP, ROOT, log, write_jsonl  # noqa: E402
from ifeval_prompts import ARGS, make_prompts  # noqa: E402

RESULTS = HERE / "results"
WORK = HERE / ".cache" / "vllm-cpu-modes"
MODES = ("quick", "defaults")


def run_stage(mode: str, model: Path, prompts: Path, out: Path, answers: int, max_new_tokens: int,
              timeout_s: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, **OMP, "SPA_VLLM_CPU_MODE": mode}
    load_before = os.getloadavg()
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "spa_workers.cli", "generate", "--policy", str(model),
                             "--prompts", str(prompts), "--output", str(out), "--responses-per-prompt", str(answers),
                             "--temperature", "0.7", "--max-new-tokens", str(max_new_tokens), "--backend", "vllm",
                             "--seed", "11"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # the stage and vLLM's engine processes, all in its session
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"mode": mode, "engine": "?", "wall_s": f"> {timeout_s:.0f} (stopped)", "load_s": "–",
                "generate_s": "–", "tokens": "–", "tokens_per_s": "–",
                "load_before": [round(x, 1) for x in load_before], "load_after": [round(x, 1) for x in os.getloadavg()]}
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"generate ({mode}) failed, rc {proc.returncode}:\n{err[-3000:]}")
    manifest = json.loads(next(out.glob("**/_SUCCESS.json")).read_text())
    engine = manifest["versions"].get("vllm_engine", "?")
    timings, counts = manifest["timings"], manifest["counts"]
    return {"mode": mode, "engine": engine, "wall_s": round(wall, 1), "load_s": round(timings.get("load_s", 0.0), 1),
            "generate_s": round(timings.get("work_s", timings.get("generate_s", 0.0)), 1),
            "tokens": counts.get("generated_tokens"), "tokens_per_s": round(manifest["metrics"]["tokens_per_s"], 1),
            "load_before": [round(x, 1) for x in load_before], "load_after": [round(x, 1) for x in os.getloadavg()]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--answers", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=1800, help="a run still going then is stopped and says so")
    args = ap.parse_args()
    from real_model import ensure_model

    model = ensure_model()
    rng = random.Random(3)
    prompts = WORK / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": p.text} for p in make_prompts(rng, args.prompts, sorted(ARGS), set())])
    rows = []
    for pair in range(args.pairs):
        for mode in MODES if pair % 2 == 0 else MODES[::-1]:
            row = run_stage(mode, model, prompts, WORK / f"out-{mode}", args.answers, args.max_new_tokens,
                            args.timeout_s)
            log(f"pair {pair + 1} {mode}: {row}")
            rows.append({"pair": pair + 1, **row})
    from spa_workers.vllm_engine import native_bf16

    head = ["pair", "mode", "engine", "wall_s", "load_s", "generate_s", "tokens", "tokens_per_s", "load_before",
            "load_after"]
    lines = [f"# vLLM on CPU: quick start vs vLLM's defaults ({time.strftime('%Y-%m-%d %H:%M')} UTC)", "",
             f"{os.uname().machine}, {os.cpu_count()} cores, native bfloat16: {native_bf16()}. "
             f"{args.prompts} prompts x {args.answers} answers x at most {args.max_new_tokens} new tokens "
             f"({args.prompts * args.answers * args.max_new_tokens} planned tokens), OMP_NUM_THREADS=1. Reproduce: "
             f"`python benchmarks/vllm_cpu_modes.py --prompts {args.prompts} --pairs {args.pairs}`.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        done = [r for r in mine if isinstance(r["tokens_per_s"], float)]
        if done:
            lines.append(f"\n{mode}: {len(done)} of {len(mine)} runs finished; median wall "
                         f"{sorted(r['wall_s'] for r in done)[len(done) // 2]} s, median tokens/s "
                         f"{sorted(r['tokens_per_s'] for r in done)[len(done) // 2]}")
        else:
            lines.append(f"\n{mode}: no run finished within {args.timeout_s:.0f} s")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm_cpu_modes.md").write_text(text)
    (RESULTS / "vllm_cpu_modes.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
