"""The names of the counts, metrics and ledger entries stages put in their manifests. The CLI's summary table, the
operator's status, the reports and Prometheus read these names, so they are defined once here."""

from __future__ import annotations

from typing import ClassVar


# Names of the counts / metrics each stage puts in its manifest. The CLI's summary table, the operator's status and
# Prometheus read these names, so they are defined once here.
class ManifestKeys:
    # generate: counts
    PROMPTS = "prompts"
    RESPONSES = "responses"
    GENERATED_TOKENS = "generated_tokens"
    # generate: metrics
    TOKENS_PER_S = "tokens_per_s"
    ANSWER_TOKENS = "answer_tokens_mean"  # mean tokens per sampled answer (π_{i-1} on iteration i's prompts)
    # judge: counts
    PAIRS = "pairs"
    DROPPED_IDENTICAL = "dropped_identical"
    DROPPED_EMPTY = "dropped_empty"
    # judge: metrics
    REWARD_GAP = "reward_gap_mean"
    CHOSEN_REWARD = "chosen_reward_mean"
    REJECTED_REWARD = "rejected_reward_mean"
    CONFIDENCE = "confidence_mean"
    PAIRS_PER_S = "pairs_per_s"
    # train / seed-train: metrics
    LOSS = "loss"
    REWARD_ACCURACY = "reward_accuracy"
    REFINED_FRACTION = "refined_fraction"
    THRESHOLD = "threshold"
    MARGIN = "margin_mean"
    SAMPLES_PER_S = "samples_per_s"
    STEPS = "steps"
    # evaluate: metrics
    HELDOUT_AGREEMENT = "heldout_agreement"
    HELDOUT_AGREEMENT_SE = "heldout_agreement_se"  # binomial standard error sqrt(p(1-p)/n)
    WIN_RATE = "win_rate"  # percent, alpaca_eval's definition
    WIN_RATE_SE = "win_rate_se"
    LC_WIN_RATE = "lc_win_rate"  # length-controlled, percent
    LC_WIN_RATE_SE = "lc_win_rate_se"
    FIRST_POSITION_RATE = "judge_first_position_rate"  # how often the judge prefers the output shown first
    # evaluate: mean answer length in tokens (the policy's tokenizer) on the win-rate prompts, same sampling settings
    EVAL_ANSWER_TOKENS = "eval_answer_tokens_mean"  # π_i's answers
    SFT_ANSWER_TOKENS = "sft_answer_tokens_mean"  # π_init's (the SFT model's) answers: the length gate's baseline
    REFERENCE_ANSWER_TOKENS = "reference_answer_tokens_mean"  # the reference answers the judge compares against
    # evaluate: counts (win rate)
    WINRATE_PROMPTS = "winrate_prompts"  # prompts judged in both orders
    JUDGE_FAILED = "judge_failed"  # judgments given up after retries (their prompts are left out and counted)
    JUDGE_REFUSED = "judge_refused"  # replies that parsed but named neither output (not asked again: temperature 0)
    JUDGE_CACHED = "judge_cached"  # judgments found in the run's judgment cache (not asked, not paid)
    JUDGE_CALLS = "judge_calls"  # judge requests that got a reply (paid), with the tokens their `usage` reports
    JUDGE_PROMPT_TOKENS = "judge_prompt_tokens"
    JUDGE_COMPLETION_TOKENS = "judge_completion_tokens"
    JUDGE_RETRY_COUNTS = ("judge_http_attempts", "judge_rate_limited", "judge_server_errors", "judge_client_errors",
                          "judge_no_response", "judge_refused")
    # generate / judge / evaluate / train: prompts too long for max_prompt_length, left out
    SKIPPED_LONG_PROMPTS = "skipped_long_prompt"
    # train / seed-train: counts
    EFFECTIVE_BATCH = "effective_batch_size"
    PROCESSES = "processes"
    RESUMED_FROM_STEP = "resumed_from_step"


class Ledger:
    """What a stage spent, counted by the stage into its manifest's `ledger` and summed per iteration and per run by
    the planner's readers. Only these keys are allowed (the manifest and the status that copies it stay bounded)."""

    GOLD_LABELS = "gold_labels"  # gold (human-labelled) pairs read: seed and held-out sets
    PROMPTS = "prompts"  # prompts answered
    ANSWERS_GENERATED = "answers_generated"
    TOKENS_GENERATED = "tokens_generated"
    PAIRS_JUDGED = "pairs_judged"  # pairs the judge produced
    TOKENS_SCORED = "tokens_scored"  # prompt+answer tokens through the judge's (or evaluation's) forward passes
    PAIRS_TRAINED = "pairs_trained"  # pair-epochs: pairs seen by training, each epoch counted
    TOKENS_TRAINED = "tokens_trained"  # prompt+answer tokens of the pairs trained on, each epoch counted
    ACCELERATOR_SECONDS = "accelerator_seconds"  # requested GPUs x wall time of the stage's pods
    CPU_SECONDS = "cpu_seconds"  # CPU time the stage's processes used (measured: resource usage of every rank)
    CPU_SECONDS_REQUESTED = "cpu_seconds_requested"  # requested CPUs x wall time (where the pod requests CPUs)
    BYTES_READ = "bytes_read"  # from storage (models and data downloaded, inputs read)
    BYTES_WRITTEN = "bytes_written"  # to storage (the published outputs)
    JUDGE_CALLS = "judge_calls"  # requests to the win-rate judge endpoint
    JUDGE_PROMPT_TOKENS = "judge_prompt_tokens"
    JUDGE_COMPLETION_TOKENS = "judge_completion_tokens"

    KEYS: ClassVar[tuple[str, ...]] = (
        GOLD_LABELS, PROMPTS, ANSWERS_GENERATED, TOKENS_GENERATED, PAIRS_JUDGED, TOKENS_SCORED, PAIRS_TRAINED,
        TOKENS_TRAINED, ACCELERATOR_SECONDS, CPU_SECONDS, CPU_SECONDS_REQUESTED, BYTES_READ, BYTES_WRITTEN,
        JUDGE_CALLS, JUDGE_PROMPT_TOKENS, JUDGE_COMPLETION_TOKENS)


# What a stage's pods requested, set by the executors (jobs.worker_env, the local executor) so that a stage can count
# accelerator-seconds as requested GPUs x wall time: GPUs per pod (a whole number), CPUs per pod (a decimal).
REQUESTED_GPUS_ENV = "SPA_REQUESTED_GPUS"
REQUESTED_CPUS_ENV = "SPA_REQUESTED_CPUS"
# The seconds of a stage's wall time spent on the items it counts (answers sampled, answers scored, pairs trained),
# without loading models: with the ledger's counts, the rates the operator's ETA scales by (timings key).
WORK_SECONDS = "work_s"


def check_ledger(ledger: dict[str, float], what: str) -> None:
    """A ledger holds known keys only, each a finite number >= 0 (a bug otherwise: the stage's own counting)."""
    unknown = sorted(set(ledger) - set(Ledger.KEYS))
    negative = sorted(k for k, v in ledger.items() if isinstance(v, int | float) and v < 0)
    if unknown or negative:
        raise ValueError(f"{what}: ledger entries {unknown or negative} are {'unknown' if unknown else 'negative'}")
