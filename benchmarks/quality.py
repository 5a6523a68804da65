"""Does SPA align? A synthetic gold-preference benchmark run through the real pipeline (`spa run`).

    python benchmarks/quality.py --full    # 3 seeds, every condition: results/quality.md, docs/quality.png
    python benchmarks/quality.py --quick   # seed 0: DPO on the seed vs SPA after 2 iterations (tests/test_quality.py)

Task. "Sort: 7 3 0 2 1" -> the five digits sorted, space-separated. Gold score of an answer = LCS(answer tokens,
sorted digits) / max(5, #answer tokens): graded, and the SFT model's answers all have five tokens, so length does
not reveal quality. The SFT model is a tiny random Llama (hidden 128, 2 layers) fine-tuned on CPU on noisy targets
(the sorted list with k ~ min(int(Exp(0.7)), 6) random adjacent swaps): at temperature 1 about half its samples are
exactly right. It is trained here (not by the pipeline) and cached per seed under benchmarks/.cache/.

Data per seed. A pool of unlabelled prompts; the SFT model answers each twice (`spa-worker generate`), and a pair is
labelled by the gold score (ties dropped): these are the 100%-label pairs. The seed is the pairs of the first
`seed_prompts` pool prompts (about 4.4% of all pairs, at most 5%: the exact ratio is in the report). SPA's
iterations take the rest of the pool, in order, as unlabelled prompts (`data.prompts`), sampled at temperature 0.7
(the paper's). Held-out gold pairs (judge agreement, the evaluate stage) and evaluation prompts are separate.

Conditions: every one is an AlignmentRun manifest run by `spa run` (iterations.count 0 = DPO only). The seed-train
stage is identical in every SPA run of a seed, so it runs once (in `dpo-seed`) and its directory is copied into the
other runs' roots before they start; iteration 1's generate and judge stages are identical in the SPA ablations, so
they are copied from `spa` the same way (`spa run` skips a stage whose _SUCCESS.json exists).

SPA with the gate: the planner's own gate (`spa_operator.planner.gate_verdict`, spec.gate = CONFIG["gate"]) applied
to each seed's `spa` run. A gated run's stages are the `spa` run's stages up to where the gate stops it (the gate
adds no stage and changes no stage's arguments), so its published model is the `spa` run's model of the iteration
the gate names, already scored: the row costs no extra run (quality_report.gated_iteration).

Metric: for each model, `spa-worker generate` samples 4 answers per evaluation prompt (2,000 prompts, temperature 1);
answer j is compared by gold score with the SFT model's answer j (a separate sample, fixed seed): win-rate (ties
count 1/2, standard error ~0.004 with prompts as the units) and mean gold score.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchlib
import yaml
from benchlib import Runs, Scheduler, log, prompt_text, read_jsonl, sh, write_jsonl

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
N_DIGITS = 5

# The benchmark's settings (both modes). See the module docstring, the README's "Does it align?" and
# benchmarks/results/quality-notes.md (every setting tried). `temperature` is the evaluation's; the iterations sample
# at the paper's 0.7 and train with its batch size 32.
CONFIG = {
    "sft_steps": 1500, "sft_batch": 32, "sft_lr": 1e-3, "sft_corrupt": 0.0,
    "pool_prompts": 8000, "seed_prompts": 350, "heldout_prompts": 300, "eval_prompts": 2000,
    "eval_samples": 4, "temperature": 1.0, "max_new_tokens": 16,
    "prompts_per_iteration": [800, 1600, 2400], "ablation_iterations": 2,
    "responses_per_prompt": 2, "iteration_temperature": 0.7,
    "learning_rate": 3e-5, "beta": 0.1, "batch_size": 32, "seed_epochs": 3, "all_epochs": 1,
    # "SPA with the gate": the README's recommended setting (spec.gate), applied to each seed's `spa` run
    "gate": {"metric": "heldoutAgreement", "maxDrop": 0.05},
}
FULL_SEEDS = [0, 1, 2]
QUICK_SEED = 0


# ---------------------------------------------------------------- the task


def fmt(xs: list[int]) -> str:
    return " ".join(map(str, xs))


def make_prompt(rng: random.Random) -> str:
    return f"Sort: {fmt([rng.randint(0, 9) for _ in range(N_DIGITS)])}"


def lcs(a: list[str], b: list[str]) -> int:
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def gold(prompt: str, answer: str) -> float:
    """Gold score in [0, 1]: LCS with the sorted digits, over max(5, answer length in tokens)."""
    digits = sorted(prompt.split(":", 1)[1].split())
    toks = answer.split()
    return lcs(toks, digits) / max(N_DIGITS, len(toks))


def is_permutation(prompt: str, answer: str) -> bool:
    """Whether the answer uses exactly the prompt's digits (in any order)."""
    return sorted(answer.split()) == sorted(prompt.split(":", 1)[1].split())


def noisy_target(prompt: str, rng: random.Random) -> str:
    ys = sorted(int(x) for x in prompt.split(":", 1)[1].split())
    k = min(int(rng.expovariate(0.7)), 6)
    for _ in range(k):
        i = rng.randrange(N_DIGITS - 1)
        ys[i], ys[i + 1] = ys[i + 1], ys[i]
    if rng.random() < CONFIG["sft_corrupt"]:  # a digit error: one digit copied over its neighbour
        i = rng.randrange(N_DIGITS - 1)
        if rng.random() < 0.5:
            ys[i + 1] = ys[i]
        else:
            ys[i] = ys[i + 1]
    return fmt(ys)


def build_sft(seed: int, out: Path) -> None:
    """The SFT model of one seed (in a subprocess: single-threaded, ~100 s)."""
    import torch
    from spa_workers.modeling import build_tiny_model, encode_prompt_answer, load_tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = random.Random(1000 + seed)
    base = out.with_name(out.name + "-base")
    build_tiny_model(str(base), [make_prompt(rng) for _ in range(200)], vocab_size=300, seed=seed)
    tok = load_tokenizer(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base))
    opt = torch.optim.AdamW(model.parameters(), lr=CONFIG["sft_lr"])
    bs = CONFIG["sft_batch"]
    for step in range(CONFIG["sft_steps"]):
        batch = []
        for _ in range(bs):
            p = make_prompt(rng)
            batch.append(encode_prompt_answer(tok, [{"role": "user", "content": p}], noisy_target(p, rng)))
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((bs, width), tok.pad_token_id)
        labels = torch.full((bs, width), -100)
        att = torch.zeros(bs, width, dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            s = p + a
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            labels[i, len(p): len(s)] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 500 == 0:
            log(f"sft seed {seed}: step {step} loss {loss.item():.3f}")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(base)
    tmp.rename(out)


# ---------------------------------------------------------------- pipeline helpers


def generate(policy: Path, prompts: Path, out: Path, n: int, seed: int) -> list[dict]:
    return benchlib.generate(policy, prompts, out, n, seed, CONFIG["temperature"], CONFIG["max_new_tokens"])


def gold_pairs(rows: list[dict]) -> list[dict]:
    """One pair per prompt from its first two answers, labelled by gold score; ties dropped, and pairs with an empty
    answer (the validate stage refuses them: one of seed 0's 4,167 pairs for DPO on 100%)."""
    pairs = []
    for r in rows:
        p = prompt_text(r)
        a, b = r["responses"][:2]
        ga, gb = gold(p, a), gold(p, b)
        if ga != gb and a.strip() and b.strip():
            pairs.append({"prompt": p, "chosen": a if ga > gb else b, "rejected": b if ga > gb else a})
    return pairs


class Seed(Runs):
    """Everything of one seed: the SFT model, its data, its runs."""

    def __init__(self, seed: int, mode: str) -> None:
        self.seed = seed
        corrupt = CONFIG["sft_corrupt"]
        self.sft = CACHE / (f"sft-s{seed}" + (f"-c{corrupt}" if corrupt else ""))
        self.work = CACHE / f"work-{mode}" / f"s{seed}"
        self.data = self.work / "data"
        self.storage = self.work / "runs"
        self.info: dict = {}

    def ensure_sft(self) -> None:
        if not self.sft.exists():
            t = time.time()
            sh([sys.executable, str(Path(__file__).resolve()), "--build-sft", str(self.seed),
                "--set", f"sft_corrupt={CONFIG['sft_corrupt']}"], self.sft.with_suffix(".log"))
            log(f"seed {self.seed}: SFT model trained in {time.time() - t:.0f}s")

    def prepare(self, full: bool) -> None:
        """Prompts, gold seed pairs (and in full mode: all gold pairs, held-out pairs)."""
        c = CONFIG
        d = self.data
        rng = random.Random(self.seed)
        pool = [make_prompt(rng) for _ in range(c["pool_prompts"])]
        heldout = [make_prompt(rng) for _ in range(c["heldout_prompts"])]
        evalp = [make_prompt(rng) for _ in range(c["eval_prompts"])]
        ns = c["seed_prompts"]
        write_jsonl(d / "seed_prompts.jsonl", [{"prompt": p} for p in pool[:ns]])
        write_jsonl(d / "pool_prompts.jsonl", [{"prompt": p} for p in pool])
        write_jsonl(d / "iteration_prompts.jsonl", [{"prompt": p} for p in pool[ns:]])
        write_jsonl(d / "heldout_prompts.jsonl", [{"prompt": p} for p in heldout])
        write_jsonl(d / "eval_prompts.jsonl", [{"prompt": p} for p in evalp])
        seed_rows = generate(self.sft, d / "seed_prompts.jsonl", d / "gen-seed", 2, 11 + self.seed)
        write_jsonl(d / "seed_pairs.jsonl", gold_pairs(seed_rows))
        self.info["seed_pairs"] = len(read_jsonl(d / "seed_pairs.jsonl"))
        if full:
            # the pool's first `seed_prompts` prompts are answered with the same sampling seed as the seed set
            rest = generate(self.sft, d / "iteration_prompts.jsonl", d / "gen-rest", 2, 12 + self.seed)
            all_pairs = read_jsonl(d / "seed_pairs.jsonl") + gold_pairs(rest)
            write_jsonl(d / "all_pairs.jsonl", all_pairs)
            held = generate(self.sft, d / "heldout_prompts.jsonl", d / "gen-heldout", 2, 13 + self.seed)
            write_jsonl(d / "heldout_pairs.jsonl", gold_pairs(held))
            self.info["all_pairs"] = len(all_pairs)
            self.info["heldout_pairs"] = len(read_jsonl(d / "heldout_pairs.jsonl"))

    def answer_opponent(self) -> None:
        """The opponent: the SFT model's answers to the evaluation prompts (fixed sampling seed). Only scoring needs
        them, so this runs beside the first conditions, not before them."""
        self.opponent = generate(self.sft, self.data / "eval_prompts.jsonl", self.data / "eval-sft-opponent",
                                 CONFIG["eval_samples"], 99)

    # -- manifests

    def manifest(self, name: str, iterations: int, seed_file: str, **over) -> Path:
        c = CONFIG
        spec = {
            "model": {"sft": str(self.sft)},
            "data": {"seed": str(self.data / seed_file), "prompts": str(self.data / "iteration_prompts.jsonl")},
            "iterations": {"count": iterations},
            "generation": {"responsesPerPrompt": c["responses_per_prompt"], "temperature": c["iteration_temperature"],
                           "maxNewTokens": c["max_new_tokens"], "backend": "transformers"},
            "training": {"learningRate": c["learning_rate"], "beta": c["beta"], "batchSize": c["batch_size"],
                         "maxLength": 64, "maxPromptLength": 32, "seedEpochs": c["seed_epochs"]},
        }
        if iterations:
            spec["iterations"]["promptsPerIteration"] = c["prompts_per_iteration"][:iterations]
        if (self.data / "heldout_pairs.jsonl").exists():
            spec["data"]["heldout"] = str(self.data / "heldout_pairs.jsonl")
        for key, value in over.items():
            section, field = key.split("__")
            node = spec.setdefault(section, {})
            for part in field.split(".")[:-1]:
                node = node.setdefault(part, {})
            if value is None:
                node.pop(field.split(".")[-1], None)
            else:
                node[field.split(".")[-1]] = value
        doc = {"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun",
               "metadata": {"name": name, "namespace": "quality"}, "spec": spec}
        path = self.work / "manifests" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def score(self, label: str, model: Path) -> dict:
        rows = generate(model, self.data / "eval_prompts.jsonl", self.work / "eval" / label,
                        CONFIG["eval_samples"], 7)
        wins, golds, bad, per_prompt = [], [], [], []
        for mine, theirs in zip(rows, self.opponent, strict=True):
            p = prompt_text(mine)
            for a, b in zip(mine["responses"], theirs["responses"], strict=True):
                ga, gb = gold(p, a), gold(p, b)
                golds.append(ga)
                wins.append(1.0 if ga > gb else 0.5 if ga == gb else 0.0)
                bad.append(not is_permutation(p, a))
            per_prompt.append(statistics.fmean(wins[-len(mine["responses"]):]))
        # the evaluation's own sampling error: prompts are the independent units (a prompt's samples correlate)
        se = statistics.stdev(per_prompt) / len(per_prompt) ** 0.5
        return {"win_rate": statistics.fmean(wins), "win_rate_se": se, "gold": statistics.fmean(golds),
                "exact": statistics.fmean(g == 1.0 for g in golds), "wrong_digits": statistics.fmean(bad)}

    def judge_vs_gold(self, name: str, iteration: int) -> dict | None:
        """How the judge's (chosen, rejected) of an iteration compare under the gold score."""
        files = sorted((self.root(name) / f"iter-{iteration:02d}" / "judge").glob("shard-*/pairs.jsonl"))
        rows = [r for f in files for r in read_jsonl(f)]
        if not rows:
            return None
        g = [(gold(prompt_text(r), r["chosen"]), gold(prompt_text(r), r["rejected"])) for r in rows]
        return {"right": statistics.fmean(a > b for a, b in g), "tie": statistics.fmean(a == b for a, b in g),
                "wrong": statistics.fmean(a < b for a, b in g),
                "chosen_wrong_digits": statistics.fmean(not is_permutation(prompt_text(r), r["chosen"])
                                                        for r in rows)}


# ---------------------------------------------------------------- conditions

# name -> (iterations, seed file, manifest overrides)
SPA_ITERS = 3
CONDITIONS: dict[str, tuple[int, str, dict]] = {
    "dpo-seed": (0, "seed_pairs.jsonl", {}),
    "dpo-all": (0, "all_pairs.jsonl", {}),  # seedEpochs = CONFIG["all_epochs"]
    "spa": (SPA_ITERS, "seed_pairs.jsonl", {}),
    "spa-no-refinement": (SPA_ITERS, "seed_pairs.jsonl", {"training__refinement.enabled": False}),
    "spa-lambda-0": (SPA_ITERS, "seed_pairs.jsonl", {"training__refinement.extrapolation": 0.0}),
    "spa-ref-previous": (SPA_ITERS, "seed_pairs.jsonl", {"judge__reference": "previous"}),
}
ABLATIONS = ("spa-no-refinement", "spa-lambda-0", "spa-ref-previous")


def condition_iterations(name: str, iters: int) -> list[int]:
    """The iterations of a condition (run with at most `iters` SPA iterations) whose models are scored."""
    return list(range(1 if name.startswith("spa") else 0, min(CONDITIONS[name][0], iters) + 1))


def run_seed_jobs(s: Seed) -> dict:
    """A seed's conditions, run ("run") and scored per iteration ("score"): separate jobs, so a scoring (sampling
    the evaluation answers) runs beside the next condition instead of before it. Every process is seeded and
    single-threaded: the order changes no figure. {condition: {iteration: metrics}} in "results"."""
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def run_condition(name: str, iters: int, copy: dict[str, str]) -> None:
        n_iter, seed_file, over = CONDITIONS[name]
        if name == "dpo-all":
            over = {"training__seedEpochs": CONFIG["all_epochs"]}
        if name in ABLATIONS:  # held-out agreement is measured on the main runs only (saves 3 stages a run)
            over = {**over, "data__heldout": None}
        n_iter = min(n_iter, iters)
        timings[name] = s.spa_run(name, s.manifest(name, n_iter, seed_file, **over), copy)
        log(f"seed {s.seed}: {name} ran in {timings[name]:.0f}s")

    def score_condition(name: str, i: int) -> None:
        row = {**s.score(f"{name}-{i}", s.model_of(name, i)), **s.manifests_of(name, i), "cost": s.cost_of(name, i)}
        if i:
            row["judge_vs_gold"] = s.judge_vs_gold(name, i)
        if name == "dpo-seed" and (s.root(name) / "iter-00/evaluate/_SUCCESS.json").exists():
            row["evaluate"] = s.manifests_of(name, 0).get("evaluate")
        results.setdefault(name, {})[i] = row

    return {"results": results, "timings": timings, "run": run_condition, "score": score_condition}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--full", action="store_true")
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--build-sft", type=int, help=argparse.SUPPRESS)
    mode.add_argument("--report", action="store_true", help="re-render the report from results/quality.json")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (full mode; default 0,1,2)")
    ap.add_argument("--only", default=None, help="full mode: comma-separated conditions besides dpo-seed and spa")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a CONFIG entry (exploration; results then go to work-<mode>-<tag>)")
    ap.add_argument("--tag", default="", help="suffix of the work folder (exploration runs)")
    ap.add_argument("--fresh", action="store_true", help="delete this mode's runs first (keeps the SFT cache)")
    ap.add_argument("--out", default=None, help="quick mode: where to write its JSON result")
    args = ap.parse_args()
    if args.report:
        from quality_report import render

        data = json.loads((RESULTS / "quality.json").read_text())
        data["config"].setdefault("gate", CONFIG["gate"])  # post hoc: the gate changes none of the recorded runs
        render(data)
        return 0
    t0 = time.time()
    mode_name = "full" if args.full else "quick" if args.quick else "other"
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in CONFIG:
            raise SystemExit(f"unknown CONFIG key {key}")
        CONFIG[key] = json.loads(value)
    if args.build_sft is not None:
        build_sft(args.build_sft, Seed(args.build_sft, "build").sft)
        return 0
    work_name = mode_name + (f"-{args.tag}" if args.tag else "")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else FULL_SEEDS if args.full else [QUICK_SEED]
    if args.fresh:
        shutil.rmtree(CACHE / f"work-{work_name}", ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    states = {sd: Seed(sd, work_name) for sd in seeds}
    # 1. SFT models, two at a time
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda s: s.ensure_sft(), states.values()))
    log(f"SFT models ready ({time.time() - t0:.0f}s)")
    # 2. data
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda s: s.prepare(args.full), states.values()))
    log(f"data ready ({time.time() - t0:.0f}s)")
    # 3. conditions, two at a time; each scoring job after its run and the seed's opponent answers
    sched = Scheduler(2)
    jobs = {sd: run_seed_jobs(s) for sd, s in states.items()}
    sft_scores: dict[int, dict] = {}
    only = set(args.only.split(",")) if args.only else set(CONDITIONS)
    seed_copy = {"iter-00/seed-train": "dpo-seed", "iter-00/evaluate": "dpo-seed"}
    abl_copy = {**seed_copy, "iter-01/generate": "spa", "iter-01/judge": "spa"}
    scoring: list[tuple[int, str, int]] = []  # (seed, condition, iters): added after every run

    def condition(sd: int, name: str, iters: int, copy: dict[str, str], after: tuple[str, ...] = ()) -> None:
        sched.add(f"{sd}/{name}", lambda j=jobs[sd]: j["run"](name, iters, copy), after=after)
        scoring.append((sd, name, iters))

    for sd, s in states.items():  # DPO on the seed first: every SPA run of the seed reuses its seed-train stage
        condition(sd, "dpo-seed", 0, {})
        sched.add(f"{sd}/opponent", s.answer_opponent)
    for sd, s in states.items():
        if args.full:
            sched.add(f"{sd}/sft", lambda s=s, sd=sd: sft_scores.__setitem__(sd, s.score("sft", s.sft)),
                      after=(f"{sd}/opponent",))
        condition(sd, "spa", SPA_ITERS if args.full else 2, seed_copy, after=(f"{sd}/dpo-seed",))
    if args.full:
        for sd in states:
            if "dpo-all" in only:
                condition(sd, "dpo-all", 0, {})
        for sd in states:
            for name in ABLATIONS:
                if name in only:
                    condition(sd, name, CONFIG["ablation_iterations"], abl_copy, after=(f"{sd}/spa",))
    for sd, name, iters in scoring:
        for i in condition_iterations(name, iters):
            sched.add(f"{sd}/{name}/{i}", lambda j=jobs[sd], name=name, i=i: j["score"](name, i),
                      after=(f"{sd}/{name}", f"{sd}/opponent"))
    sched.results()
    elapsed = time.time() - t0

    def conditions(sd: int) -> dict:  # in CONDITIONS and iteration order, whatever order the scorings finished in
        done = jobs[sd]["results"]
        return {name: dict(sorted(done[name].items())) for name in CONDITIONS if name in done}

    out = {"mode": mode_name, "config": CONFIG, "seeds": seeds, "elapsed_s": elapsed,
           "per_seed": {str(sd): {"info": states[sd].info, "sft": sft_scores.get(sd), "conditions": conditions(sd),
                                  "timings": jobs[sd]["timings"]}
                        for sd in seeds}}
    log(f"{mode_name} done in {elapsed:.0f}s")
    if args.full and args.tag:
        (CACHE / f"{work_name}.json").write_text(json.dumps(out, indent=1))
    elif args.full:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "quality.json").write_text(json.dumps(out, indent=1))
        from quality_report import render

        render(json.loads(json.dumps(out)))  # the same str keys as a re-render from the JSON
    else:
        r = out["per_seed"][str(QUICK_SEED)]["conditions"]
        summary = {"elapsed_s": elapsed, "dpo_seed_win_rate": r["dpo-seed"][0]["win_rate"],
                   "spa_iter2_win_rate": r["spa"][2]["win_rate"],
                   "spa_iter1_win_rate": r["spa"][1]["win_rate"]}
        print(json.dumps(summary))
        dest = Path(args.out) if args.out else CACHE / "quick.json"
        dest.write_text(json.dumps({**out, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
