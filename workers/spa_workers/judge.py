"""judge: score every generated answer with the policy's implicit DPO reward and pick one pair per prompt.

r(x, y) = β·(log π_policy(y|x) − log π_reference(y|x)) over the answer's tokens (see `scoring`).
Pairing: `min-max` takes the highest- and the lowest-reward answer; `max-random` the highest and a
uniformly random other one (seeded per prompt, so independent of sharding). Output `pairs.jsonl`, one
row per kept prompt: {"prompt_index", "prompt", "chosen", "rejected", "chosen_reward",
"rejected_reward", "confidence": σ(r_w − r_l)}.

Degenerate prompts. Only distinct, non-empty answers are candidates: empty (or whitespace-only) answers
are generation failures, not preference signal, and an identical copy would only pair an answer with
itself. A prompt with fewer than two candidates is dropped, counted as `dropped_empty` when any of its
answers was empty and as `dropped_identical` otherwise. With more than two answers a prompt keeps its
remaining distinct ones: ["a", "a", "b", ""] is judged between "a" and "b".
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from statistics import fmean
from typing import Any

from spa_workers import contract, storage
from spa_workers.contract import JudgeArgs, Ledger, ManifestKeys, StageInputError
from spa_workers.data import read_records, write_jsonl
from spa_workers.generate import prompt_seed, shard_part
from spa_workers.runner import StageWork, run_stage
from spa_workers.scoring import Limits, check_backend, implicit_rewards

PAIRINGS = ("min-max", "max-random")
DROPPED_EMPTY = "empty"
DROPPED_IDENTICAL = "identical"


def candidates(responses: Sequence[str]) -> tuple[list[int], str | None]:
    """Indices of the distinct non-empty answers (first occurrences), and why the prompt is dropped, if so."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(responses):
        if text.strip() and text not in seen:
            seen.add(text)
            keep.append(i)
    if len(keep) >= 2:
        return keep, None
    return keep, DROPPED_EMPTY if any(not t.strip() for t in responses) else DROPPED_IDENTICAL


def choose_pair(rewards: dict[int, float], pairing: str, rng: random.Random) -> tuple[int, int]:
    """(chosen, rejected) answer indices among the scored candidates `rewards` (index -> reward; two or more).

    Ties go to the earlier answer; rejected is never the chosen answer, even when all rewards are equal.
    """
    order = sorted(rewards)
    chosen = max(order, key=lambda i: rewards[i])
    others = [i for i in order if i != chosen]
    if pairing == "min-max":
        return chosen, min(others, key=lambda i: rewards[i])
    return chosen, rng.choice(others)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def read_responses(stage_output: str) -> list[dict[str, Any]]:
    """Rows of every generate shard, validated, in prompt order."""
    rows = []
    for shard in contract.finished_shard_dirs(stage_output):
        uri = storage.join(shard, contract.RESPONSES_FILE)
        for n, row in enumerate(read_records(uri), start=1):
            responses = row.get("responses")
            if (not isinstance(row.get("prompt_index"), int) or not isinstance(row.get("prompt"), list)
                    or not isinstance(responses, list) or not all(isinstance(r, str) for r in responses)):
                raise StageInputError(f"{uri}: row {n}: expected prompt_index (int), prompt (messages) and "
                                      f"responses (list of strings)")
            rows.append(row)
    return sorted(rows, key=lambda r: r["prompt_index"])


def _body(work: StageWork) -> None:
    args: JudgeArgs = work.args  # type: ignore[assignment]  # shard index resolved by the runner
    if args.pairing not in PAIRINGS:
        raise StageInputError(f"unknown pairing {args.pairing!r} (expected {' or '.join(PAIRINGS)})")
    check_backend(args.backend)
    t0 = time.time()
    rows = read_responses(args.responses)
    rows = [rows[i] for i in shard_part(len(rows), args.shard_index, args.shard_count)]
    dropped = {DROPPED_EMPTY: 0, DROPPED_IDENTICAL: 0}
    judged: list[tuple[dict[str, Any], list[int]]] = []
    for row in rows:
        keep, reason = candidates(row["responses"])
        if reason is None:
            judged.append((row, keep))
        else:
            dropped[reason] += 1
    items = [(row["prompt"], row["responses"][i]) for row, keep in judged for i in keep]
    limits = Limits(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                    max_batch_tokens=args.max_batch_tokens, tensor_parallel_size=args.tensor_parallel_size)
    rewards = iter(implicit_rewards(args.policy, args.reference, items, args.beta, limits, args.backend,
                                    lambda done, total: work.progress(done, total, unit="answers"), work))
    pairs = []
    skipped_long = 0
    for row, keep in judged:
        values = [next(rewards) for _ in keep]
        if None in values:  # the prompt is too long to train on: none of its answers was scored
            skipped_long += 1
            continue
        scored: dict[int, float] = dict(zip(keep, values, strict=True))  # type: ignore[arg-type]
        rng = random.Random(prompt_seed(args.seed, row["prompt_index"]))
        chosen, rejected = choose_pair(scored, args.pairing, rng)
        r_w, r_l = scored[chosen], scored[rejected]
        pairs.append({"prompt_index": row["prompt_index"], "prompt": row["prompt"],
                      "chosen": row["responses"][chosen], "rejected": row["responses"][rejected],
                      "chosen_reward": r_w, "rejected_reward": r_l, "confidence": sigmoid(r_w - r_l)})
    write_jsonl(os.path.join(work.dir, contract.PAIRS_FILE), pairs)
    work.spend(Ledger.PAIRS_JUDGED, len(pairs))
    elapsed = time.time() - t0
    work.timings["judge_s"] = elapsed
    work.counts.update({ManifestKeys.PROMPTS: len(rows), ManifestKeys.PAIRS: len(pairs),
                        ManifestKeys.DROPPED_EMPTY: dropped[DROPPED_EMPTY],
                        ManifestKeys.DROPPED_IDENTICAL: dropped[DROPPED_IDENTICAL],
                        ManifestKeys.SKIPPED_LONG_PROMPTS: skipped_long})
    if pairs:  # means of nothing are left out rather than written as NaN
        work.metrics.update({
            ManifestKeys.CHOSEN_REWARD: fmean(p["chosen_reward"] for p in pairs),
            ManifestKeys.REJECTED_REWARD: fmean(p["rejected_reward"] for p in pairs),
            ManifestKeys.REWARD_GAP: fmean(p["chosen_reward"] - p["rejected_reward"] for p in pairs),
            ManifestKeys.CONFIDENCE: fmean(p["confidence"] for p in pairs),
            ManifestKeys.PAIRS_PER_S: len(pairs) / elapsed,
        })


def run(args: JudgeArgs) -> int:
    return run_stage(args, _body)
