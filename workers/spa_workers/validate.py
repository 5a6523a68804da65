"""validate: the cheap checks of a run's inputs, before any GPU time is spent.

Every input exists and parses; preference rows have a non-empty prompt, chosen and rejected, and chosen differs
from rejected; the prompt file holds enough prompts for every iteration; the model's config and tokenizer load
and the tokenizer has a chat template; storage is writable. With a win rate: its prompt file holds `samples`
usable prompts, the reference answers file answers each of them, the reference model loads as the model does, and
the judge answers one small request made with the key.
The first failure is a StageInputError naming the
file, row or field (exit 2). Needs no torch: only the config and the tokenizer are loaded.
"""

from __future__ import annotations

import json
import os
import sys

from spa_workers import storage
from spa_workers.contract import Ledger, StageInputError, ValidateArgs
from spa_workers.data import load_pairs, load_prompts, load_reference_answers
from spa_workers.modeling import load_tokenizer, resolve_model
from spa_workers.runner import StageWork, run_stage

REPORT_FILE = "validation.json"
ALPACA_EVAL_INSTRUCTIONS = 805


def _check_model(uri: str) -> None:
    from transformers import AutoConfig

    path = resolve_model(uri)
    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises several types for unreadable configs
        raise StageInputError(f"model {uri}: config.json does not load ({type(e).__name__}: {e})") from None
    try:
        load_tokenizer(uri)
    except StageInputError:
        raise
    except Exception as e:
        raise StageInputError(f"model {uri}: tokenizer does not load ({type(e).__name__}: {e})") from None


def check_storage_writable(uri: str) -> None:
    """Write and delete a probe object under `uri`; a refusal is the user's to fix (exit 2)."""
    probe = storage.join(uri, ".spa-write-probe")
    try:
        storage.write_text(probe, "ok")
        storage.delete_tree(probe)
    except OSError as e:
        raise StageInputError(f"storage {uri}: not writable ({e.strerror or e})") from None


def check(args: ValidateArgs) -> dict[str, int]:
    """Run every check; returns the counts found (rows per file)."""
    counts = {"seed_pairs": len(load_pairs(args.seed_pairs))}
    prompts = len(load_prompts(args.prompts))
    if prompts < args.prompts_needed:
        raise StageInputError(f"{args.prompts}: has {prompts} prompts but the iterations need "
                              f"{args.prompts_needed} (spec.iterations.promptsPerIteration)")
    counts["prompts"] = prompts
    if args.heldout:
        counts["heldout_pairs"] = len(load_pairs(args.heldout))
    if args.winrate_prompts:
        counts.update(_check_win_rate_files(args))
    # files first: they cost less to read than a tokenizer
    for model in dict.fromkeys(m for m in (args.model, args.winrate_reference_model) if m):
        _check_model(model)
    if args.judge_endpoint and args.judge_model:
        check_judge(args)
    return counts


def check_judge(args: ValidateArgs) -> str:
    """One small request to the judge with the key, before any GPU work: a refused key or request, or a reply that
    is not a chat completion, is bad input (exit 2); an endpoint that cannot be reached is retryable (exit 1)."""
    from spa_workers import winrate

    answered = winrate.probe(winrate.judge_settings(args.judge_endpoint, args.judge_model,  # type: ignore[arg-type]
                                                    args.judge_extra_body, max_retries=2,
                                                    timeout_s=args.judge_timeout_s))
    print(f"validate: {answered}", file=sys.stderr)
    return answered


def _check_win_rate_files(args: ValidateArgs) -> dict[str, int]:
    """The win rate's prompts and reference answers, read as evaluate reads them."""
    uri = args.winrate_prompts
    available = len(load_prompts(uri))  # type: ignore[arg-type]
    if available < args.winrate_samples:
        # evaluate would quietly judge fewer prompts than asked for
        raise StageInputError(f"{uri}: has {available} prompts but the win rate needs {args.winrate_samples} "
                              "(spec.evaluation.winRate.samples)")
    used = args.winrate_samples or available
    if args.lc_glm == "alpaca_eval_v1" and used != ALPACA_EVAL_INSTRUCTIONS:
        raise StageInputError(f"{uri}: has {used} prompts, but lengthControl alpacaEvalV1 needs AlpacaEval's "
                              f"{ALPACA_EVAL_INSTRUCTIONS} instructions in their order "
                              "(spec.evaluation.winRate.lengthControl)")
    counts = {"winrate_prompts": used}
    if args.winrate_reference_answers:
        counts["winrate_reference_answers"] = len(load_reference_answers(args.winrate_reference_answers, used))
    return counts


def _body(work: StageWork) -> None:
    args: ValidateArgs = work.args  # type: ignore[assignment]
    check_storage_writable(work.output)
    work.counts.update(check(args))
    # The run's gold labels, counted once here: the seed and held-out pairs every later stage reads again.
    work.spend(Ledger.GOLD_LABELS, work.counts["seed_pairs"] + work.counts.get("heldout_pairs", 0))
    with open(os.path.join(work.dir, REPORT_FILE), "w", encoding="utf-8") as fh:
        json.dump(work.counts, fh)


def run(args: ValidateArgs) -> int:
    return run_stage(args, _body)
