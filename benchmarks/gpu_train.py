"""GPU check: the 7B configuration's training path — FSDP2, bf16 mixed precision with fp32 master shards, gradient
checkpointing, SPA self-refinement with λ-extrapolation, sharded checkpoints, resume — run through `spa-worker
train` (the command a Job runs) on a random ~1B model of Mistral's shape, on the machine's GPUs. One command, no
network; expected to take 4–5 minutes on one H100 (not yet run on a GPU); a run still going at 7.5 minutes is
stopped and the check fails with its log.

    python benchmarks/gpu_train.py --wheels benchmarks/wheels     # on the GPU machine; writes benchmarks/results/
    python benchmarks/gpu_train.py --size tiny --out /tmp/g       # the same at tiny size on CPU (2 gloo processes)

What it does: builds the model (Mistral architecture: grouped-query attention 16 query / 4 key-value heads,
head_dim 128, vocabulary 32,000, 16 layers of hidden 2048 and MLP 7168: 1.00 B parameters) and synthetic preference
pairs; run A trains from scratch with `--strategy fsdp --processes <GPUs>` and a checkpoint every K steps and is
stopped right after the first checkpoint (the stage's own SPA_TRAIN_STOP_AFTER_STEPS hook: a killed pod); run B
resumes from that checkpoint and finishes, saving and publishing the final model. It reports:
- steady step time: the median of the step-to-step times of both runs without each run's first step, and from it
  tokens/s (prompt + answer tokens of both answers of every pair) and MFU at 10·N FLOPs per token: the policy's
  forward and backward (6N), the no-grad policy forward of the λ-extrapolation (2N) and the reference's forward
  (2N); N = matmul parameters, the LM head included; gradient checkpointing's recomputation and attention's
  sequence-length terms are not counted, as usual for MFU;
- peak GPU memory (allocated and reserved, the largest over ranks) and each rank's peak host memory;
- checkpoint save time (local sharded write + storage + marker, as the training waited for it) and resume (fetching
  the checkpoint, and run B's start to its first step against run A's);
- the final model's save and publish time.
It writes benchmarks/results/gpu_train.md and .json (or --out).

A GPU machine without network has torch, transformers, accelerate and peft but not TRL and `datasets`: fetch their
wheels on a networked machine into benchmarks/wheels/ (git-ignored; carried with the repository, well under 64 MiB)
for the GPU machine's Python (3.12 on the lent H100s):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d benchmarks/wheels \
        trl==1.16.0 datasets==5.2.0 'dill<0.4.2' 'multiprocess<0.70.20'

`--wheels DIR` installs every wheel there (`pip --no-index --no-deps`). Before anything runs, the installed versions
are checked against REQUIRED (what this code was tested with); a mismatch is refused with one line naming the
package, the version found and the one needed (exit 2) — bring that package's wheel too (pyarrow, for example, is
about 45 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "workers")]

# package -> versions this check needs (importlib.metadata names)
REQUIRED = {
    "torch": ">=2.6",  # FSDP2 (`fully_shard`) and DTensor as public APIs
    "transformers": ">=5.0",
    "accelerate": ">=1.15",  # FSDP2 preparation with CPU-RAM-efficient loading as spa_trainer uses it
    "trl": "==1.16.*",  # the DPOTrainer hooks spa_trainer overrides
    "datasets": ">=4.7",
    "peft": ">=0.15",
    "safetensors": ">=0.4",
    "pyarrow": ">=21",
}


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # the model's (LM head) vocabulary; the tokenizer uses its first tokens
    tokenizer_vocab: int
    max_length: int
    max_prompt_length: int
    batch_size: int
    micro_batch_size: int
    steps: int
    checkpoint_every: int
    processes_without_gpu: int


SIZES = {
    # Mistral-7B (hidden 4096, 32 layers, MLP 14336, 32/8 heads, head_dim 128, vocabulary 32000) at half width and
    # half depth: 16 × 54.5 M + 2 × 65.5 M (embeddings, LM head) = 1.00 B parameters.
    "1b": Size(hidden=2048, intermediate=7168, layers=16, heads=16, kv_heads=4, vocab=32000, tokenizer_vocab=4096,
               max_length=1024, max_prompt_length=256, batch_size=32, micro_batch_size=8, steps=16,
               checkpoint_every=8, processes_without_gpu=2),
    "tiny": Size(hidden=64, intermediate=224, layers=2, heads=2, kv_heads=1, vocab=512, tokenizer_vocab=512,
                 max_length=96, max_prompt_length=48, batch_size=4, micro_batch_size=1, steps=4, checkpoint_every=2,
                 processes_without_gpu=2),
}
FLOPS_PER_TOKEN_PER_PARAM = 10  # see the module docstring
# Dense bf16 peak FLOP/s by device name (no sparsity); --peak-tflops for others.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
DEADLINE_S = 7.5 * 60  # the whole check, model building included
STOPPED_EXIT = 75  # train.py's STOP_EXIT_CODE


def install_wheels(folder: str) -> None:
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        sys.exit(f"gpu_train: no wheels in {folder} (see this script's docstring for `pip download`)")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", *wheels],
                   check=True)


def version_problems(required: dict[str, str]) -> list[str]:
    """One line per package that is missing or outside its required versions: the packages in `required`, and
    what those of them that are installed declare they need themselves (e.g. datasets' pyarrow and fsspec)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    wanted = [Requirement(f"{package}{spec}") for package, spec in required.items()]
    for package in required:
        with contextlib.suppress(PackageNotFoundError):
            wanted += [r for r in map(Requirement, requires(package) or []) if r.marker is None]
    problems, seen = [], set()
    for req in wanted:
        name = canonicalize_name(req.name)
        if (name, str(req.specifier)) in seen:
            continue
        seen.add((name, str(req.specifier)))
        try:
            found = version(req.name)
        except PackageNotFoundError:
            problems.append(f"{req.name} is not installed; needs {req}")
            continue
        if req.specifier and not req.specifier.contains(Version(found.split("+")[0]), prereleases=True):
            problems.append(f"{req.name} {found} is installed; needs {req}")
    return problems


def _words(rng: random.Random, vocabulary: list[str], n: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def build_model(model_dir: str, size: Size, corpus: list[str]) -> None:
    """A random Mistral-architecture model stored in bf16 (as 7B SFT models are), with a BPE tokenizer."""
    import torch
    from spa_workers.modeling import build_tiny_model, load_tokenizer
    from transformers import MistralConfig, MistralForCausalLM

    build_tiny_model(model_dir, corpus, vocab_size=size.tokenizer_vocab)  # for its tokenizer; the model is replaced
    tok = load_tokenizer(model_dir)
    cfg = MistralConfig(vocab_size=max(size.vocab, len(tok)), hidden_size=size.hidden,
                        intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                        head_dim=size.hidden // size.heads, max_position_embeddings=4096, sliding_window=None,
                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MistralForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    for stale in glob.glob(os.path.join(model_dir, "*.safetensors*")):
        os.remove(stale)
    model.save_pretrained(model_dir, safe_serialization=True)


def make_inputs(work: str, size: Size) -> tuple[str, str, float]:
    """(model dir, pairs file, mean tokens per pair): prompts fill ~80% of max_prompt_length, answers ~90% of the
    rest of max_length."""
    from spa_workers.data import write_jsonl
    from spa_workers.modeling import encode_prompt_answer, load_tokenizer

    rng = random.Random(0)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                  for _ in range(4000)]
    model_dir = os.path.join(work, "model")
    build_model(model_dir, size, [_words(rng, vocabulary, 200) for _ in range(300)] + vocabulary)
    tok = load_tokenizer(model_dir)
    tokens_per_word = len(tok(_words(rng, vocabulary, 1000))["input_ids"]) / 1000
    prompt_words = max(int(0.8 * size.max_prompt_length / tokens_per_word), 1)
    answer_words = max(int(0.9 * (size.max_length - size.max_prompt_length) / tokens_per_word), 1)
    rows = [{"prompt": _words(rng, vocabulary, prompt_words), "chosen": _words(rng, vocabulary, answer_words),
             "rejected": _words(rng, vocabulary, answer_words)} for _ in range(size.batch_size * size.steps)]
    data = os.path.join(work, "pairs.jsonl")
    write_jsonl(data, rows)
    per_pair = []
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}]
        ids = [encode_prompt_answer(tok, prompt, row[k]) for k in ("chosen", "rejected")]
        if len(ids[0][0]) > size.max_prompt_length:
            sys.exit("gpu_train: a synthetic prompt is longer than max_prompt_length")
        per_pair.append(sum(min(len(p) + len(a), size.max_length) for p, a in ids))
    return model_dir, data, sum(per_pair) / len(per_pair)


def matmul_params(model_dir: str) -> int:
    """N: parameters of the matrix multiplies per token (attention projections, MLP, LM head)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.hidden_size * head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_hidden_layers * (attn + mlp) + cfg.hidden_size * cfg.vocab_size


def train_command(model_dir: str, data: str, output: str, size: Size, processes: int) -> list[str]:
    from spa_workers.contract import TrainArgs

    args = TrainArgs(model=model_dir, pairs=data, output=output, epochs=1.0, batch_size=size.batch_size,
                     per_device_batch_size=size.micro_batch_size, max_length=size.max_length,
                     max_prompt_length=size.max_prompt_length, learning_rate=1e-6, refinement=True,
                     extrapolation=0.5, window=64, checkpoint_every_steps=size.checkpoint_every,
                     checkpoint_every_minutes=0, processes=processes, strategy="fsdp")
    return [sys.executable, "-m", "spa_workers.cli", *args.to_argv()]


def run_stage(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, str, float]:
    t0 = time.time()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, log.read_text(errors="replace"), time.time() - t0


def step_times(log: list[dict], resumed_from: int) -> list[float]:
    """Step-to-step times within each run (a record's `time_s` counts from its run's start), each run's first step
    left out (it includes start-up, loading and compilation)."""
    times, previous = [], None
    for rec in log:
        if rec["step"] in (1, resumed_from + 1):  # the first step of run A, of run B
            previous = rec["time_s"]
            continue
        times.append(rec["time_s"] - previous)
        previous = rec["time_s"]
    return times


def first_step_s(log: list[dict], after_step: int) -> float | None:
    return next((r["time_s"] for r in log if r["step"] == after_step + 1), None)


def peak_flops(override_tflops: float | None) -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    if override_tflops:
        return name, override_tflops * 1e12
    tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return name, tflops * 1e12 if tflops else None


def check(size: Size, work: str, out: Path, peak_override: float | None) -> dict:
    """Both runs and the figures; raises SystemExit with the failing run's log tail."""
    import torch

    t_start = time.time()
    gpus = torch.cuda.device_count()
    processes = gpus or size.processes_without_gpu
    device, peak = peak_flops(peak_override)
    model_dir, data, tokens_per_pair = make_inputs(work, size)
    params = matmul_params(model_dir)
    print(f"gpu_train: model ({params / 1e6:,.1f} M matmul parameters) and pairs ready in "
          f"{time.time() - t_start:.0f}s", flush=True)
    output = os.path.join(work, "train")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "workers"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SPA_CACHE_DIR": os.path.join(work, "cache"), "SPA_SCRATCH_DIR": os.path.join(work, "scratch")}
    argv = train_command(model_dir, data, output, size, processes)
    left = DEADLINE_S - (time.time() - t_start)
    rc_a, log_a, wall_a = run_stage(argv, {**env, "SPA_TRAIN_STOP_AFTER_STEPS": str(size.checkpoint_every)},
                                    out / "gpu_train-a.log", left * 0.45)
    stopped = f"exiting after checkpoint {size.checkpoint_every}"  # each rank exits 75; the launcher then 1
    if rc_a not in (STOPPED_EXIT, 1) or stopped not in log_a:
        raise SystemExit(f"gpu_train: run A (fresh, to stop after checkpoint {size.checkpoint_every}) ended with "
                         f"exit {rc_a}:\n{log_a[-4000:]}")
    left = DEADLINE_S - (time.time() - t_start)
    rc_b, log_b, wall_b = run_stage(argv, env, out / "gpu_train-b.log", left)
    if rc_b != 0:
        raise SystemExit(f"gpu_train: run B (resume) ended with exit {rc_b}:\n{log_b[-4000:]}")
    manifest = json.loads(Path(output, "_SUCCESS.json").read_text())
    log = [json.loads(x) for x in Path(output, "train_log.jsonl").read_text().splitlines()]
    steps = step_times(log, manifest["counts"]["resumed_from_step"])
    step_s = statistics.median(steps) if steps else None
    tokens_per_step = tokens_per_pair * size.batch_size
    tokens_per_s = tokens_per_step / step_s if step_s else None
    mfu = (FLOPS_PER_TOKEN_PER_PARAM * params * tokens_per_s / (peak * gpus)
           if tokens_per_s and peak and gpus else None)
    memory = [tuple(map(float, m)) for m in re.findall(
        r"peak memory: GPU ([\d.]+) GiB allocated, ([\d.]+) GiB reserved; host ([\d.]+) GiB", log_b)]
    host = [float(m) for m in re.findall(r"peak memory: (?:GPU .*?; )?host ([\d.]+) GiB", log_b)]
    saved = re.search(r"checkpoint \d+ stored in [\d.]+s \(written and stored in ([\d.]+)s\)", log_a)
    timings = manifest["timings"]
    return {
        "device": device, "gpus": gpus, "processes": processes, "strategy": "fsdp",
        "model": {"hidden": size.hidden, "layers": size.layers, "heads": size.heads, "kv_heads": size.kv_heads,
                  "vocab": size.vocab, "matmul_params": params},
        "batch_size": size.batch_size, "micro_batch_size": size.micro_batch_size, "max_length": size.max_length,
        "steps": int(manifest["metrics"]["steps"]), "resumed_from_step": manifest["counts"]["resumed_from_step"],
        "tokens_per_pair": tokens_per_pair, "tokens_per_step": tokens_per_step,
        "steady_step_s": step_s, "step_times_s": steps, "tokens_per_s": tokens_per_s,
        "flops_per_token": FLOPS_PER_TOKEN_PER_PARAM * params, "peak_flops_per_gpu": peak, "mfu": mfu,
        "gpu_peak_allocated_gib": max((m[0] for m in memory), default=None),
        "gpu_peak_reserved_gib": max((m[1] for m in memory), default=None),
        "host_peak_gib_per_rank": host,
        "checkpoint_save_s": float(saved.group(1)) if saved else None,
        "resume_fetch_s": timings.get("resume_fetch_s"),
        "first_step_fresh_s": first_step_s(log, 0), "first_step_resumed_s": first_step_s(log, size.checkpoint_every),
        "final_save_s": timings.get("save_model_s"), "stage_wall_s": {"a": wall_a, "b": wall_b},
        "loss_first_last": [log[0]["loss"], log[-1]["loss"]], "versions": manifest.get("versions"),
        "total_s": time.time() - t_start,
    }


def _fmt(value, spec: str, unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def report(r: dict, size_name: str) -> str:
    m = r["model"]
    mfu = "– (no peak FLOP/s known for this device: --peak-tflops)" if r["mfu"] is None else f"{r['mfu']:.1%}"
    return "\n".join([
        f"# GPU train check ({size_name})", "",
        f"`python benchmarks/gpu_train.py{'' if size_name == '1b' else ' --size ' + size_name}` — "
        + (f"{r['device']} × {r['gpus']}, one process per GPU, " if r["gpus"] else
           f"no GPU: {r['processes']} CPU processes (gloo, fp32, no gradient checkpointing), ")
        + "`spa-worker train --strategy fsdp` (FSDP2; on GPU bf16 mixed precision with fp32 master shards and "
        "gradient checkpointing), SPA refinement with λ = 0.5. Run A trained from scratch and was stopped after its "
        "checkpoint; run B resumed and finished.",
        "",
        f"Model: Mistral architecture, hidden {m['hidden']}, {m['layers']} layers, {m['heads']} query / "
        f"{m['kv_heads']} key-value heads, vocabulary {m['vocab']}: {m['matmul_params'] / 1e6:,.1f} M matmul "
        f"parameters (N). Batch {r['batch_size']} pairs (micro-batch {r['micro_batch_size']}), max length "
        f"{r['max_length']}, {r['tokens_per_pair']:.0f} tokens per pair (both answers), "
        f"{r['steps']} optimiser steps, resumed from step {r['resumed_from_step']}.", "",
        "| figure | value |", "| --- | --- |",
        f"| steady step time (median, each run's first step left out) | {_fmt(r['steady_step_s'], '.3f', ' s')} |",
        f"| tokens/s | {_fmt(r['tokens_per_s'], ',.0f')} |",
        f"| MFU at 10·N FLOPs/token | {mfu} |",
        f"| peak GPU memory, allocated / reserved (largest rank) | {_fmt(r['gpu_peak_allocated_gib'], '.2f')} / "
        f"{_fmt(r['gpu_peak_reserved_gib'], '.2f', ' GiB')} |",
        f"| peak host memory per rank | {', '.join(f'{h:.2f}' for h in r['host_peak_gib_per_rank'])} GiB |",
        f"| checkpoint save (sharded write + store + marker) | {_fmt(r['checkpoint_save_s'], '.1f', ' s')} |",
        "| resume: fetching the checkpoint | " + ("read in place (local storage, one process)"
                                                  if r["processes"] == 1 else _fmt(r["resume_fetch_s"], ".1f", " s"))
        + " |",
        f"| start to first step: fresh / resumed | {_fmt(r['first_step_fresh_s'], '.1f', ' s')} / "
        f"{_fmt(r['first_step_resumed_s'], '.1f', ' s')} |",
        f"| final model save (gathered, written) | {_fmt(r['final_save_s'], '.1f', ' s')} |",
        f"| loss, first / last step | {r['loss_first_last'][0]:.4f} / {r['loss_first_last'][1]:.4f} |",
        f"| whole check | {r['total_s']:.0f} s |", "",
        f"Step times (s): {', '.join(f'{t:.3f}' for t in r['step_times_s'])}", "",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--wheels", help="folder of wheels to install first (TRL, datasets, ...)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s per GPU, if the device is not known")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for gpu_train.{md,json}")
    a = p.parse_args(argv)
    if a.wheels:
        install_wheels(a.wheels)
    problems = version_problems(REQUIRED)
    if problems:
        print("gpu_train: refusing to run: " + "; ".join(problems) + " (bring the wheels: see --help's module "
              "docstring)", file=sys.stderr)
        return 2
    size = SIZES[a.size]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as work:
        result = check(size, work, out, a.peak_tflops)
    text = report(result, a.size)
    (out / "gpu_train.md").write_text(text)
    (out / "gpu_train.json").write_text(json.dumps({"size": a.size, **result}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
