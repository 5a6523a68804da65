"""GPU check: the real train stage on a random-initialised ~1B Llama in bf16; tokens/s and MFU; sharded when the
machine has more than one GPU. Offline, at most ~8 minutes on one GPU.

It runs `python -m spa_workers.cli train ...` (the command a Job runs) with SPA self-refinement and λ = 0.5 on
synthetic preference pairs, first with one process, then (more than one GPU) with one process per GPU under each
sharding strategy the machine can run (fsdp; deepspeed when installed). tokens/s counts the prompt+answer tokens of
both answers of every pair; MFU is 12·N·tokens/s over the GPUs' peak bf16 FLOP/s (N = matmul parameters, the LM
head included: per token 6N for the policy's forward and backward, 2N for the reference's forward, 4N for the
no-grad policy and reference forwards of the λ extrapolation, as workers/spa_workers/train.py computes it; gradient
checkpointing's recomputation is not counted, as usual for MFU).

A bare GPU machine with torch, transformers, peft and accelerate lacks TRL and `datasets`. Fetch their wheels on a
networked machine into benchmarks/wheels/ (git-ignored; carry it to the GPU machine with the repository). About 2.3 MB;
no dependencies are resolved, and the binary ones (xxhash, multiprocess) must match the GPU machine's Python, hence
`--python-version`:

    pip download --no-deps --only-binary=:all: --python-version 3.11 -d benchmarks/wheels \
        trl==1.16.0 datasets==5.2.0 dill multiprocess xxhash

and run with `--wheels benchmarks/wheels` (installs every wheel there with `pip --no-index --no-deps`). `datasets`
also needs pyarrow and pandas (about 55 MB of wheels: add them only where the machine lacks them); the script names
any import still missing before it starts.

    python benchmarks/gpu_train.py --wheels benchmarks/wheels          # on the GPU machine; writes benchmarks/results/
    python benchmarks/gpu_train.py --size tiny --steps 2 --out /tmp/g  # CPU smoke test (a minute)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "workers")]


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    vocab: int
    max_length: int
    max_prompt_length: int
    batch_size: int
    micro_batch_size: int


SIZES = {
    # ≈ 1.0 B parameters (24 × 42 M per layer + embeddings), head_dim 128; 512-token answers to 256-token prompts.
    "1b": Size(hidden=2048, layers=24, heads=16, vocab=8192, max_length=768, max_prompt_length=256, batch_size=32,
               micro_batch_size=8),
    "tiny": Size(hidden=64, layers=2, heads=1, vocab=512, max_length=96, max_prompt_length=48, batch_size=4,
                 micro_batch_size=2),
}
FLOPS_PER_TOKEN_PER_PARAM = 12  # see the module docstring
# Dense bf16 peak FLOP/s by device name (no sparsity); --peak-tflops for others.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
WORKER_TIMEOUT_S = 420  # one variant; keeps the whole check within ~8 minutes on one GPU


def install_wheels(folder: str) -> None:
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        sys.exit(f"gpu_train: no wheels in {folder} (see this script's docstring for `pip download`)")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", *wheels],
                   check=True)


def check_imports() -> None:
    missing = []
    for module in ("torch", "transformers", "accelerate", "peft", "pyarrow", "pandas", "datasets", "trl"):
        try:
            __import__(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        sys.exit("gpu_train: missing " + "; ".join(missing) + ": bring them as wheels (--wheels, see the docstring)")


def _words(rng: random.Random, vocabulary: list[str], n: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def make_inputs(work: str, size: Size, pairs: int) -> tuple[str, str]:
    """A random-initialised Llama (bf16) with a BPE tokenizer, and `pairs` synthetic preference pairs whose prompts
    fill about 80% of max_prompt_length and answers 90% of the rest of max_length."""
    import torch
    from spa_workers.data import write_jsonl
    from spa_workers.modeling import build_tiny_model, load_tokenizer
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                  for _ in range(4000)]
    model_dir = os.path.join(work, "model")
    corpus = [_words(rng, vocabulary, 200) for _ in range(300)] + vocabulary
    build_tiny_model(model_dir, corpus, vocab_size=size.vocab, hidden_size=size.hidden, layers=size.layers,
                     heads=size.heads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)  # stored in bf16, as 7B SFTs are
    model.save_pretrained(model_dir, safe_serialization=True)
    sample = _words(rng, vocabulary, 1000)
    tokens_per_word = len(load_tokenizer(model_dir)(sample)["input_ids"]) / 1000
    prompt_words = max(int(0.8 * size.max_prompt_length / tokens_per_word), 1)
    answer_words = max(int(0.9 * (size.max_length - size.max_prompt_length) / tokens_per_word), 1)
    rows = [{"prompt": _words(rng, vocabulary, prompt_words), "chosen": _words(rng, vocabulary, answer_words),
             "rejected": _words(rng, vocabulary, answer_words)} for _ in range(pairs)]
    data = os.path.join(work, "pairs.jsonl")
    write_jsonl(data, rows)
    return model_dir, data


def tokens_per_pair(model_dir: str, data: str, size: Size) -> float:
    """Mean prompt+answer tokens of both answers of a pair, truncated as training truncates them."""
    from spa_workers.data import read_records
    from spa_workers.modeling import encode_prompt_answer, load_tokenizer

    tok = load_tokenizer(model_dir)
    per_pair = []
    for row in read_records(data):
        prompt = [{"role": "user", "content": row["prompt"]}]
        lengths = [sum(map(len, encode_prompt_answer(tok, prompt, answer))) for answer in (row["chosen"],
                                                                                         row["rejected"])]
        if len(encode_prompt_answer(tok, prompt, row["chosen"])[0]) <= size.max_prompt_length:  # else not trained
            per_pair.append(sum(min(n, size.max_length) for n in lengths))
    if not per_pair:
        sys.exit("gpu_train: every synthetic prompt is longer than max_prompt_length")
    return sum(per_pair) / len(per_pair)


def matmul_params(model_dir: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.hidden_size * head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_hidden_layers * (attn + mlp) + cfg.hidden_size * cfg.vocab_size  # + the LM head


def run_variant(name: str, model_dir: str, data: str, size: Size, processes: int, strategy: str, work: str,
                out: Path) -> dict:
    from spa_workers.contract import MANIFEST, TrainArgs

    output = os.path.join(work, f"out-{name}")
    args = TrainArgs(model=model_dir, pairs=data, output=output, epochs=1.0, batch_size=size.batch_size,
                     per_device_batch_size=size.micro_batch_size, max_length=size.max_length,
                     max_prompt_length=size.max_prompt_length, learning_rate=1e-6, refinement=True,
                     extrapolation=0.5, checkpoint_every_steps=0, checkpoint_every_minutes=0, processes=processes,
                     strategy=strategy)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "workers"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SPA_CACHE_DIR": os.path.join(work, "cache"), "SPA_SCRATCH_DIR": os.path.join(work, f"scratch-{name}")}
    log = out / f"gpu_train-{name}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "spa_workers.cli", *args.to_argv()], stdout=fh,
                              stderr=subprocess.STDOUT, env=env, timeout=WORKER_TIMEOUT_S, check=False)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        return {"variant": name, "error": f"exit {proc.returncode}", "log_tail": tail, "wall_s": wall}
    manifest = json.loads(Path(output, MANIFEST).read_text())
    return {"variant": name, "processes": manifest["counts"].get("processes", processes), "strategy": strategy,
            "samples_per_s": manifest["metrics"]["samples_per_s"], "steps": manifest["metrics"].get("steps"),
            "effective_batch": manifest["counts"].get("effective_batch_size"),
            "train_s": manifest["timings"].get("train_s"), "wall_s": wall, "versions": manifest["versions"]}


def peak_flops(override_tflops: float | None) -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    if override_tflops:
        return name, override_tflops * 1e12
    tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return name, tflops * 1e12 if tflops else None


def report(results: list[dict], device: str, gpus: int, size_name: str, params: int, tokens: float,
           peak: float | None) -> str:
    lines = [f"# GPU train check ({size_name}: {params / 1e9:.2f} B matmul parameters, bf16)", "",
             f"Device: {device} × {gpus}; {tokens:.0f} tokens per pair (prompt + answer, both answers); "
             f"peak {peak / 1e12:.0f} TFLOP/s per GPU" if peak else f"Device: {device} × {gpus}; {tokens:.0f} "
             f"tokens per pair; peak FLOP/s unknown (no MFU)", "",
             "| variant | processes | strategy | pairs/s | tokens/s | MFU | optimiser batch | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | | | failed: {r['error']} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['variant']} | {r['processes']} | {r['strategy']} | {r['samples_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {mfu} | {r['effective_batch']} | {r['train_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--steps", type=int, default=24, help="optimiser steps per variant")
    p.add_argument("--wheels", help="folder of wheels to install first (TRL, datasets, ...)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s per GPU, if the device is not known")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for gpu_train.{md,json}")
    a = p.parse_args(argv)
    if a.wheels:
        install_wheels(a.wheels)
    check_imports()
    import torch

    size = SIZES[a.size]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    device, peak = peak_flops(a.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as work:
        t0 = time.time()
        model_dir, data = make_inputs(work, size, size.batch_size * a.steps)
        print(f"gpu_train: model and {size.batch_size * a.steps} pairs ready in {time.time() - t0:.0f}s", flush=True)
        tokens, params = tokens_per_pair(model_dir, data, size), matmul_params(model_dir)
        variants = [("1-process", 1, "auto")]
        if gpus > 1:
            variants.append((f"fsdp-{gpus}", gpus, "fsdp"))
            try:
                import deepspeed  # noqa: F401

                variants.append((f"deepspeed-{gpus}", gpus, "deepspeed"))
            except ImportError:
                print("gpu_train: deepspeed not installed: ZeRO-3 not measured", flush=True)
        results = []
        for name, processes, strategy in variants:
            r = run_variant(name, model_dir, data, size, processes, strategy, work, out)
            if "error" not in r:
                r["tokens_per_s"] = r["samples_per_s"] * tokens
                used = processes if gpus else 0
                r["mfu"] = (FLOPS_PER_TOKEN_PER_PARAM * params * r["tokens_per_s"] / (peak * used)
                            if peak and used else None)
            results.append(r)
            print(f"gpu_train: {name}: {json.dumps({k: v for k, v in r.items() if k != 'log_tail'})}", flush=True)
    text = report(results, device, max(gpus, 1), a.size, params, tokens, peak)
    (out / "gpu_train.md").write_text(text)
    (out / "gpu_train.json").write_text(json.dumps({"device": device, "gpus": gpus, "size": a.size,
                                                    "matmul_params": params, "tokens_per_pair": tokens,
                                                    "results": results}, indent=2))
    print(text)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
