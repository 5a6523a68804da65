"""evaluate: held-out gold agreement of the policy's implicit reward, and/or its win rate against a reference.

Held-out agreement (with --heldout): a gold pair agrees when r(x, chosen) > r(x, rejected), r = β·(log π_policy −
log π_reference) as the judge computes it (`scoring.implicit_rewards`); a tie counts as disagreement. Pairs whose
prompt is too long to train on are left out and counted. Manifest: counts `pairs`, `skipped_long_prompt`; metrics
`heldout_agreement`, its binomial standard error and `margin_mean` (the mean of r(chosen) − r(rejected)). It is
computed first and kept in the run's cache (`evalcache`): a judge that fails afterwards does not lose it (the failure
line names it and where it is kept) and the next attempt does not score the pairs again.

Win rate (with --winrate-prompts): the policy answers each prompt; the reference is a file of answers or a model
(default: --reference) that answers the same prompts with the same sampling settings; an LLM judge compares them
in both orders (`winrate`). Sampled answers and judgments are kept in the run's cache: the reference model's answers
are sampled once per run, and a retry pays neither for answers nor for judgments again. Output `winrate.jsonl` (per
prompt: both answers, both judgments, the preference); metrics `win_rate`, `lc_win_rate` and their standard errors
(percent), the judge's first-position rate and the mean answer lengths in tokens (the policy's, the reference's and,
for the length gate, the SFT model's); counts of prompts judged, prompts left out, every judge retry, refusal and
failure, and the judge's calls and tokens (also in the manifest's ledger).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from statistics import fmean

from spa_workers import evalcache, winrate
from spa_workers.contract import (
    EvaluateArgs,
    GenerateArgs,
    Ledger,
    ManifestKeys,
    StageInputError,
    require_finite,
)
from spa_workers.data import load_prompts, load_reference_answers, write_jsonl
from spa_workers.modeling import Messages
from spa_workers.runner import StageWork, run_stage
from spa_workers.scoring import Limits, check_backend, implicit_rewards

WINRATE_FILE = "winrate.jsonl"
K = ManifestKeys


def _heldout_agreement(work: StageWork, args: EvaluateArgs) -> str | None:
    """The held-out figures into the manifest; returns where they are kept in the run's cache (None: no cache)."""
    from spa_workers.data import load_pairs

    check_backend(args.backend)
    settings = {"beta": args.beta, "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
                "backend": args.backend}
    key = evalcache.heldout_key(args.policy, args.reference, args.heldout, settings) if args.cache else ""
    kept = evalcache.read_heldout(args.cache, key) if args.cache else None
    if kept is not None:
        print(f"evaluate: held-out agreement from the run's cache: {evalcache.heldout_uri(args.cache, key)}")
        work.counts.update({k: int(v) for k, v in kept["counts"].items()})
        work.metrics.update(kept["metrics"])
        return evalcache.heldout_uri(args.cache, key)
    pairs = load_pairs(args.heldout)  # type: ignore[arg-type]
    items = [item for p in pairs for item in ((p.prompt, p.chosen), (p.prompt, p.rejected))]
    limits = Limits(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                    max_batch_tokens=args.max_batch_tokens)
    rewards = implicit_rewards(args.policy, args.reference, items, args.beta, limits, args.backend,
                               lambda done, total: work.progress(done, total, unit="answers"), work)
    # a prompt too long to train on leaves both of its answers unscored
    margins = [c - r for c, r in zip(rewards[0::2], rewards[1::2], strict=True)
               if c is not None and r is not None]
    if not margins:
        raise StageInputError(f"{args.heldout}: every prompt is longer than max_prompt_length "
                              f"({args.max_prompt_length} tokens) or max_length ({args.max_length})")
    agreement = fmean(m > 0 for m in margins)
    counts = {K.PAIRS: len(margins), K.SKIPPED_LONG_PROMPTS: len(pairs) - len(margins)}
    metrics = {K.HELDOUT_AGREEMENT: agreement, K.HELDOUT_AGREEMENT_SE: math.sqrt(agreement * (1 - agreement)
                                                                                  / len(margins)),
               K.MARGIN: fmean(margins)}
    require_finite(metrics, f"evaluate: {args.heldout}")
    work.counts.update(counts)
    work.metrics.update(metrics)
    if not args.cache:
        return None
    return evalcache.write_heldout(args.cache, key, {"counts": counts, "metrics": metrics})


Answer = tuple[str, int]  # (text, generated tokens), as generate's samplers return it


def sample_answers(model: str, prompts: Sequence[Messages], args: EvaluateArgs,
                   work: StageWork | None = None) -> list[Answer | None]:
    """One answer per prompt from `model` (None where the prompt leaves no room for the answer in its context),
    from the run's cache when these prompts were answered by this model with these settings before; the prompts
    answered here, the answers and their tokens go to `work`'s ledger (answers from the cache cost nothing)."""
    settings = {"max_new_tokens": args.answer_max_new_tokens, "temperature": args.answer_temperature,
                "seed": args.seed, "backend": args.answer_backend}
    key = evalcache.answers_key(model, list(prompts), settings) if args.cache else ""
    if args.cache:
        cached = evalcache.read_answers(args.cache, key)
        if cached is not None and len(cached) == len(prompts):
            print(f"evaluate: {model}'s answers from the run's cache")
            return cached
    out = _sample(model, prompts, args, work)
    if args.cache:
        evalcache.write_answers(args.cache, key, out)
    return out


def _sample(model: str, prompts: Sequence[Messages], args: EvaluateArgs,
            work: StageWork | None = None) -> list[Answer | None]:
    from spa_workers.generate import SAMPLERS, context_limit, planned_tokens
    from spa_workers.modeling import encode_prompt, load_tokenizer, resolve_model

    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    limit = context_limit(model_dir)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    fits = [i for i, ids in enumerate(encoded) if limit is None or len(ids) + args.answer_max_new_tokens <= limit]
    out: list[Answer | None] = [None] * len(prompts)
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
                out[i] = answers[0]
    if work is not None:
        work.spend(Ledger.PROMPTS, len(fits))
        work.spend(Ledger.ANSWERS_GENERATED, len(fits))
        work.spend(Ledger.TOKENS_GENERATED, sum(out[i][1] for i in fits))  # type: ignore[index]
    return out


def _token_counts(model: str, texts: Sequence[str]) -> list[int]:
    """Tokens of answers that were not sampled here (a reference answers file), by `model`'s tokenizer."""
    from spa_workers.modeling import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


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
    if args.lc_glm not in ("minimal", "alpaca_eval_v1"):
        raise StageInputError(f"--lc-glm: {args.lc_glm!r} is not minimal or alpaca_eval_v1")
    settings = winrate.judge_settings(args.judge_endpoint, args.judge_model, args.judge_extra_body,
                              concurrency=args.judge_concurrency, max_retries=args.judge_max_retries,
                              timeout_s=args.judge_timeout_s)
    prompts = load_prompts(args.winrate_prompts)  # type: ignore[arg-type]
    if args.winrate_samples > 0:
        prompts = prompts[: args.winrate_samples]
    # Read the reference file before sampling anything: a bad file costs seconds, not a generation pass.
    reference_file = (load_reference_answers(args.winrate_reference_answers, len(prompts))
                      if args.winrate_reference_answers else None)
    policy = sample_answers(args.policy, prompts, args, work)
    reference_model = args.winrate_reference_model or args.reference
    reference: list[Answer | None]
    if reference_file is not None:
        reference = list(zip(reference_file, _token_counts(args.policy, reference_file), strict=True))
    else:
        reference = sample_answers(reference_model, prompts, args, work)
    kept = [i for i in range(len(prompts)) if policy[i] is not None and reference[i] is not None]
    if not kept:
        raise StageInputError(f"{args.winrate_prompts}: no prompt leaves room for {args.answer_max_new_tokens} "
                              "new tokens in the model's context")
    _answer_lengths(work, args, [prompts[i] for i in kept], [policy[i] for i in kept], [reference[i] for i in kept],
                    reference_is_sft=reference_file is None and reference_model == args.reference)
    cache = evalcache.JudgmentCache(args.cache, settings.cache_name()) if args.cache else None
    client = winrate.JudgeClient(settings, cache)
    allowed = int(args.judge_max_failed_fraction * len(kept))
    try:
        comparisons = winrate.compare_all(
            client, [instruction_text(prompts[i]) for i in kept], [policy[i][0] for i in kept],  # type: ignore[index]
            [reference[i][0] for i in kept],  # type: ignore[index]
            lambda done, total: work.progress(done, total, unit="judgments"), max_lost=allowed)
    finally:
        client.close()
        _spend(work, client.report())
    complete = [k for k, c in enumerate(comparisons) if c.complete]
    lost = len(comparisons) - len(complete)
    work.counts[K.WINRATE_PROMPTS] = len(complete)
    work.counts["winrate_prompts_lost_to_judge"] = lost
    work.counts["winrate_skipped_long_prompt"] = len(prompts) - len(kept)
    if not complete:
        raise winrate.JudgeUnavailable(f"judge {args.judge_endpoint}: no prompt was judged in both orders "
                                       f"({client.last_error})")
    rows = []
    for k, c in enumerate(comparisons):
        i = kept[k]
        rows.append({"prompt_index": i, "prompt": prompts[i], "policy": policy[i][0],  # type: ignore[index]
                     "reference": reference[i][0],  # type: ignore[index]
                     "policy_wins_when_second": c.policy_second, "policy_wins_when_first": c.policy_first,
                     "preference": c.preference if c.complete else None})
    write_jsonl(os.path.join(work.dir, WINRATE_FILE), rows)
    prefs = [comparisons[k].preference for k in complete]
    ref_text = [reference[kept[k]][0] for k in complete]  # type: ignore[index]
    pol_text = [policy[kept[k]][0] for k in complete]  # type: ignore[index]
    wr, wr_se = winrate.win_rate(prefs)
    if args.lc_glm == "alpaca_eval_v1":
        lc, lc_se = winrate.leaderboard_lc_win_rate(prefs, ref_text, pol_text, [kept[k] for k in complete])
    else:
        lc, lc_se = winrate.length_controlled_win_rate(prefs, [len(t) for t in ref_text], [len(t) for t in pol_text])
    figures = {K.WIN_RATE: wr, K.WIN_RATE_SE: wr_se, K.LC_WIN_RATE: lc, K.LC_WIN_RATE_SE: lc_se,
               K.FIRST_POSITION_RATE: winrate.first_position_rate([comparisons[k] for k in complete])}
    # one judged prompt has no standard error: leave it out rather than write NaN (not JSON; the API server
    # would refuse it in the run's status)
    work.metrics.update({k: v for k, v in figures.items() if math.isfinite(v)})


def _answer_lengths(work: StageWork, args: EvaluateArgs, prompts: Sequence[Messages], policy: list[Answer | None],
                    reference: list[Answer | None], reference_is_sft: bool) -> None:
    """Mean answer lengths in tokens: the policy's, the reference's and the SFT model's (the length gate's
    baseline: the reference's own when the reference model is the SFT model, else sampled once per run)."""
    def mean_tokens(answers: list[Answer | None]) -> float | None:
        counts = [a[1] for a in answers if a is not None]
        return fmean(counts) if counts else None

    figures = {K.EVAL_ANSWER_TOKENS: mean_tokens(policy), K.REFERENCE_ANSWER_TOKENS: mean_tokens(reference)}
    if reference_is_sft:
        figures[K.SFT_ANSWER_TOKENS] = figures[K.REFERENCE_ANSWER_TOKENS]
    elif args.length_baseline:
        figures[K.SFT_ANSWER_TOKENS] = mean_tokens(sample_answers(args.length_baseline, prompts, args, work))
    work.metrics.update({k: v for k, v in figures.items() if v is not None})


def _spend(work: StageWork, report: dict[str, int]) -> None:
    """The judge's counts into the manifest, its calls and tokens into the ledger."""
    work.counts.update(report)
    work.spend(Ledger.JUDGE_CALLS, report["judge_http_attempts"])
    work.spend(Ledger.JUDGE_PROMPT_TOKENS, report["judge_prompt_tokens"])
    work.spend(Ledger.JUDGE_COMPLETION_TOKENS, report["judge_completion_tokens"])
    print(f"evaluate: judge {work.args.judge_endpoint}: {report['judge_http_attempts']} requests, "  # type: ignore[attr-defined]
          f"{report['judge_prompt_tokens']} prompt + {report['judge_completion_tokens']} completion tokens, "
          f"{report['judge_cached']} judgments from the run's cache")


def _body(work: StageWork) -> None:
    args: EvaluateArgs = work.args  # type: ignore[assignment]
    if not (args.heldout or args.winrate_prompts):
        raise StageInputError("nothing to evaluate: give --heldout and/or --winrate-prompts")
    kept = _heldout_agreement(work, args) if args.heldout else None
    if not args.winrate_prompts:
        return
    try:
        _win_rate(work, args)
    except (winrate.JudgeError, winrate.JudgeUnavailable) as e:
        if K.HELDOUT_AGREEMENT not in work.metrics:
            raise
        # the judge failed after the held-out agreement was computed: say it, and where it is kept
        note = (f"; held-out agreement {work.metrics[K.HELDOUT_AGREEMENT]:.4f} over {work.counts[K.PAIRS]} pairs "
                + (f"is kept in {kept} (the next attempt reuses it)" if kept else "was computed"))
        raise type(e)(f"{e}{note}") from None


def run(args: EvaluateArgs) -> int:
    return run_stage(args, _body)
