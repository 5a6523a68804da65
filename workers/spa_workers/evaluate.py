"""evaluate: held-out gold agreement of the policy's implicit reward, and/or its win rate against a reference.

Held-out agreement (with --heldout): a gold pair agrees when r(x, chosen) > r(x, rejected), r = β·(log π_policy −
log π_reference) as the judge computes it (`scoring.implicit_rewards`); a tie counts as disagreement. Pairs whose
prompt is too long to train on are left out and counted. Manifest: counts `pairs`, `skipped_long_prompt`; metrics
`heldout_agreement` and `margin_mean` (the mean of r(chosen) − r(rejected)).

Win rate (with --winrate-prompts): the policy answers each prompt; the reference is a file of answers or a model
(default: --reference) that answers the same prompts with the same sampling settings; an LLM judge compares them
in both orders (`winrate`). Output `winrate.jsonl` (per prompt: both answers, both judgments, the preference);
metrics `win_rate`, `lc_win_rate` and their standard errors (percent) and the judge's first-position rate; counts
of prompts judged, prompts left out, and every judge retry and failure.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from statistics import fmean

from spa_workers import winrate
from spa_workers.contract import JUDGE_API_KEY_ENV, EvaluateArgs, GenerateArgs, ManifestKeys, StageInputError
from spa_workers.data import load_prompts, load_reference_answers, write_jsonl
from spa_workers.modeling import Messages
from spa_workers.runner import StageWork, run_stage
from spa_workers.scoring import Limits, check_backend, implicit_rewards

WINRATE_FILE = "winrate.jsonl"


def _heldout_agreement(work: StageWork, args: EvaluateArgs) -> None:
    from spa_workers.data import load_pairs

    check_backend(args.backend)
    pairs = load_pairs(args.heldout)  # type: ignore[arg-type]
    items = [item for p in pairs for item in ((p.prompt, p.chosen), (p.prompt, p.rejected))]
    limits = Limits(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                    max_batch_tokens=args.max_batch_tokens)
    rewards = implicit_rewards(args.policy, args.reference, items, args.beta, limits, args.backend,
                               lambda done, total: work.progress(done, total, unit="answers"))
    # a prompt too long to train on leaves both of its answers unscored
    margins = [c - r for c, r in zip(rewards[0::2], rewards[1::2], strict=True)
               if c is not None and r is not None]
    if not margins:
        raise StageInputError(f"{args.heldout}: every prompt is longer than max_prompt_length "
                              f"({args.max_prompt_length} tokens) or max_length ({args.max_length})")
    work.counts[ManifestKeys.PAIRS] = len(margins)
    work.counts[ManifestKeys.SKIPPED_LONG_PROMPTS] = len(pairs) - len(margins)
    work.metrics[ManifestKeys.HELDOUT_AGREEMENT] = fmean(m > 0 for m in margins)
    work.metrics[ManifestKeys.MARGIN] = fmean(margins)


def sample_answers(model: str, prompts: Sequence[Messages], args: EvaluateArgs) -> list[str | None]:
    """One answer per prompt from `model` (None where the prompt leaves no room for the answer in its context)."""
    from spa_workers.generate import SAMPLERS, context_limit, planned_tokens
    from spa_workers.modeling import encode_prompt, load_tokenizer, resolve_model

    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    limit = context_limit(model_dir)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    fits = [i for i, ids in enumerate(encoded) if limit is None or len(ids) + args.answer_max_new_tokens <= limit]
    out: list[str | None] = [None] * len(prompts)
    if not fits:
        return out
    gen = GenerateArgs(policy=model, prompts="", output="", responses_per_prompt=1,
                       temperature=args.answer_temperature, max_new_tokens=args.answer_max_new_tokens,
                       seed=args.seed, backend=args.answer_backend)
    max_model_len = max(len(encoded[i]) for i in fits) + args.answer_max_new_tokens
    with SAMPLERS[args.answer_backend](gen, tokenizer, model_dir, max_model_len,
                                       planned_tokens(gen, len(prompts))) as sampler:
        for start in range(0, len(fits), sampler.chunk):
            chunk = fits[start: start + sampler.chunk]
            for i, answers in zip(chunk, sampler.sample([(i, encoded[i]) for i in chunk]), strict=True):
                out[i] = answers[0][0]
    return out


def instruction_text(prompt: Messages) -> str:
    """What the judge reads as the instruction: the user turn, or the whole conversation when there are several."""
    turns = [m for m in prompt if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _win_rate(work: StageWork, args: EvaluateArgs) -> None:
    if not (args.judge_endpoint and args.judge_model):
        raise StageInputError("--winrate-prompts needs --judge-endpoint and --judge-model")
    if args.answer_backend not in ("vllm", "transformers"):
        raise StageInputError(f"unknown answer backend {args.answer_backend!r} (expected vllm or transformers)")
    try:
        extra_body = json.loads(args.judge_extra_body) if args.judge_extra_body else None
    except json.JSONDecodeError as e:
        raise StageInputError(f"--judge-extra-body: not JSON: {e}") from None
    if extra_body is not None and not isinstance(extra_body, dict):
        raise StageInputError("--judge-extra-body: must be a JSON object")
    prompts = load_prompts(args.winrate_prompts)  # type: ignore[arg-type]
    if args.winrate_samples > 0:
        prompts = prompts[: args.winrate_samples]
    # Read the reference file before sampling anything: a bad file costs seconds, not a generation pass.
    reference: list[str | None] = (list(load_reference_answers(args.winrate_reference_answers, len(prompts)))
                                   if args.winrate_reference_answers else [])
    policy = sample_answers(args.policy, prompts, args)
    if not reference:
        reference = sample_answers(args.winrate_reference_model or args.reference, prompts, args)
    kept = [i for i in range(len(prompts)) if policy[i] is not None and reference[i] is not None]
    if not kept:
        raise StageInputError(f"{args.winrate_prompts}: no prompt leaves room for {args.answer_max_new_tokens} "
                              "new tokens in the model's context")
    settings = winrate.JudgeSettings(endpoint=args.judge_endpoint, model=args.judge_model, extra_body=extra_body,
                                     api_key=os.environ.get(JUDGE_API_KEY_ENV) or None,
                                     concurrency=args.judge_concurrency, max_retries=args.judge_max_retries,
                                     timeout_s=args.judge_timeout_s)
    client = winrate.JudgeClient(settings)
    try:
        comparisons = winrate.compare_all(
            client, [instruction_text(prompts[i]) for i in kept], [policy[i] for i in kept],  # type: ignore[misc]
            [reference[i] for i in kept],  # type: ignore[misc]
            lambda done, total: work.progress(done, total, unit="judgments"))
    finally:
        client.close()
    work.counts.update(client.report())
    complete = [k for k, c in enumerate(comparisons) if c.complete]
    lost = len(comparisons) - len(complete)
    work.counts[ManifestKeys.WINRATE_PROMPTS] = len(complete)
    work.counts["winrate_prompts_lost_to_judge"] = lost
    work.counts["winrate_skipped_long_prompt"] = len(prompts) - len(kept)
    if not complete or lost > args.judge_max_failed_fraction * len(comparisons):
        # A retryable failure (exit 1): the judge endpoint is down or overloaded, not the run's input.
        raise RuntimeError(f"judge {args.judge_endpoint}: {lost} of {len(comparisons)} prompts lost a judgment "
                           f"after {args.judge_max_retries} retries (last error: {client.last_error}); "
                           f"allowed: {args.judge_max_failed_fraction:.0%}")
    rows = []
    for k, c in enumerate(comparisons):
        i = kept[k]
        rows.append({"prompt_index": i, "prompt": prompts[i], "policy": policy[i], "reference": reference[i],
                     "policy_wins_when_second": c.policy_second, "policy_wins_when_first": c.policy_first,
                     "preference": c.preference if c.complete else None})
    write_jsonl(os.path.join(work.dir, WINRATE_FILE), rows)
    prefs = [comparisons[k].preference for k in complete]
    ref_len = [len(reference[kept[k]]) for k in complete]  # type: ignore[arg-type]
    pol_len = [len(policy[kept[k]]) for k in complete]  # type: ignore[arg-type]
    wr, wr_se = winrate.win_rate(prefs)
    lc, lc_se = winrate.length_controlled_win_rate(prefs, ref_len, pol_len)
    figures = {ManifestKeys.WIN_RATE: wr, ManifestKeys.WIN_RATE_SE: wr_se, ManifestKeys.LC_WIN_RATE: lc,
               ManifestKeys.LC_WIN_RATE_SE: lc_se,
               ManifestKeys.FIRST_POSITION_RATE: winrate.first_position_rate([comparisons[k] for k in complete])}
    # one judged prompt has no standard error: leave it out rather than write NaN (not JSON; the API server
    # would refuse it in the run's status)
    work.metrics.update({k: v for k, v in figures.items() if math.isfinite(v)})


def _body(work: StageWork) -> None:
    args: EvaluateArgs = work.args  # type: ignore[assignment]
    if not (args.heldout or args.winrate_prompts):
        raise StageInputError("nothing to evaluate: give --heldout and/or --winrate-prompts")
    if args.heldout:
        _heldout_agreement(work, args)
    if args.winrate_prompts:
        _win_rate(work, args)


def run(args: EvaluateArgs) -> int:
    return run_stage(args, _body)
