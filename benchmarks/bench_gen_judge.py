"""Generation and judge throughput on the tiny model (CPU).

- generate: tokens/s of `spa-worker generate` with the vLLM backend vs the transformers backend, same 64
  prompts, 2 answers each, 64 new tokens. Each run is its own process (vLLM spawns processes, and a fresh
  process per backend keeps their thread settings apart); tokens/s is the stage's own manifest metric
  (sampling time only), and the start-up time (imports, model load, engine start) is reported beside it.
- judge: pairs/s of the judge's scoring (`scoring.model_logprobs` under policy and reference, 2 answers per
  prompt) batched and length-sorted vs a naive loop that scores one answer per forward pass; same code and
  loaded models, only the batching differs. Model loading and tokenization are outside the timing. Short and
  longer answers are measured separately.

Variants run interleaved, REPEATS times, and the best run counts: on a shared machine other processes only
ever slow a run down, and torch's thread pools suffer from that far more in many small steps (the transformers
generate loop, the per-answer loop) than in few large ones, which skews single runs by up to 20x.

    python benchmarks/bench_gen_judge.py
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time

GEN_PROMPTS = 64
GEN_NEW_TOKENS = 64
JUDGE_PROMPTS = 128
JUDGE_BUDGET = 8192
REPEATS = 2


def _tiny(tmp: str) -> dict[str, str]:
    from spa_workers.tiny import make_tiny_example

    return make_tiny_example(os.path.join(tmp, "tiny"), n_prompts=GEN_PROMPTS)


def _generate_once(paths: dict[str, str], backend: str, out: str) -> dict:
    """The manifest of one `spa-worker generate` run."""
    from spa_workers import contract

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [sys.executable, "-m", "spa_workers.cli", "generate", "--policy", paths["model"],
           "--prompts", paths["prompts"], "--output", out, "--backend", backend,
           "--responses-per-prompt", "2", "--max-new-tokens", str(GEN_NEW_TOKENS), "--batch-size", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"generate --backend {backend} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(contract.shard_dir(out, 0, 1), contract.MANIFEST), encoding="utf-8") as fh:
        return json.load(fh)


def bench_generate() -> list[dict]:
    """tokens/s and start-up seconds per generation backend (best run); ratio = vLLM over transformers."""
    backends = ("transformers", "vllm")
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        paths = _tiny(tmp)
        for k in range(REPEATS):
            for backend in backends:
                runs[backend].append(_generate_once(paths, backend, os.path.join(tmp, f"{backend}-{k}")))
    best = {b: max(m["metrics"]["tokens_per_s"] for m in ms) for b, ms in runs.items()}
    rows = [{"benchmark": "generate", "variant": f"{b} backend, n=2", "value": best[b], "unit": "tokens/s",
             "ratio": best[b] / best["transformers"]} for b in backends]
    rows += [{"benchmark": "generate start-up", "variant": f"{b} (imports, load, engine)",
              "value": min(m["timings"]["load_s"] for m in ms), "unit": "s", "ratio": None}
             for b, ms in runs.items()]
    return rows


def _judge_items(paths: dict[str, str], max_filler: int) -> list[tuple[list[dict], str]]:
    """Two answers per prompt: the gold answers, each lengthened by 0..max_filler filler sentences."""
    from spa_workers.data import load_pairs

    rng = random.Random(0)
    pairs = load_pairs(paths["seed"]) + load_pairs(paths["heldout"])
    items = []
    for k in range(JUDGE_PROMPTS):
        p = pairs[k % len(pairs)]
        for answer in (p.chosen, p.rejected):
            items.append((p.prompt, answer + " Let me check: it is right." * rng.randint(0, max_filler)))
    return items


def bench_judge() -> list[dict]:
    """pairs/s of judge scoring (policy + reference), batched vs one answer per forward; ratio to the loop.

    Two regimes: short answers, where the per-forward overhead dominates the loop, and longer answers, where
    compute dominates on a CPU and batching can only save that overhead.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from spa_workers.modeling import load_model, load_tokenizer
    from spa_workers.scoring import Limits, encode_items, model_logprobs

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-judge-") as tmp:
        paths = _tiny(tmp)
        tokenizer = load_tokenizer(paths["model"])
        models = [load_model(paths["model"]).eval() for _ in range(2)]  # stand-ins for policy and reference
        for max_filler in (0, 8):
            encoded = encode_items(tokenizer, _judge_items(paths, max_filler), Limits())
            seqs = [e for e in encoded if e is not None]
            mean_answer = sum(len(e.ids) - e.answer_start for e in seqs) / len(seqs)
            model_logprobs(models[0], seqs[:8], JUDGE_BUDGET)  # warm-up
            # budget 0: every sequence is a batch of its own
            variants = {"per-answer loop": 0, f"batched, length-sorted, {JUDGE_BUDGET} tokens": JUDGE_BUDGET}
            best = dict.fromkeys(variants, float("inf"))
            for _ in range(REPEATS):
                for name, budget in variants.items():
                    t0 = time.perf_counter()
                    for model in models:
                        model_logprobs(model, seqs, budget)
                    best[name] = min(best[name], time.perf_counter() - t0)
            loop_s = best["per-answer loop"]
            rows += [{"benchmark": "judge scoring", "variant": f"{name} (answers ~{mean_answer:.0f} tokens)",
                      "value": JUDGE_PROMPTS / seconds, "unit": "pairs/s", "ratio": loop_s / seconds}
                     for name, seconds in best.items()]
    return rows


if __name__ == "__main__":
    for row in bench_generate() + bench_judge():
        print(row)
