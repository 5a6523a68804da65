"""The SPA schedule as a pure function: (spec, what has happened so far) -> what to start next.

No I/O. Both executors (local subprocesses, Kubernetes Jobs) call `plan_next_stage` and only carry out its answer.

Graph (N = iterations.count, evaluate only when data.heldout or evaluation.winRate is set):
    i00/validate -> i00/seed-train -> i00/evaluate
    i00/seed-train -> i01/generate -> i01/judge -> i01/train -> i01/evaluate
                                                  i01/train -> i02/generate -> ...
With a quality gate, iteration i+1 also waits for iteration i's evaluate: the gate decides whether it starts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from spa_workers import contract, fingerprint
from spa_workers.contract import (
    EvaluateArgs,
    GenerateArgs,
    JudgeArgs,
    SeedTrainArgs,
    StageArgs,
    TrainArgs,
    ValidateArgs,
)
from spa_workers.contract import ManifestKeys as K
from spa_workers.evalcache import run_cache

from spa_operator.spec import AlignmentRunSpec, stage_resources


@dataclass(frozen=True)
class PlannedStage:
    key: str  # "iter-01/judge": unique in a run, also the stage's folder under the run root
    iteration: int
    stage: str
    args: StageArgs
    depends_on: tuple[str, ...]

    @property
    def output(self) -> str:
        return self.args.output  # type: ignore[attr-defined]

    @property
    def shards(self) -> int:
        return self.args.shard_count if self.args.sharded else 1  # type: ignore[attr-defined]

    def inputs(self) -> dict[str, str]:
        return fingerprint.input_uris(self.args)


class StageState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class StageResult:
    """What an executor knows about one stage."""

    state: StageState
    failures: int = 0  # failed attempts so far (preemptions are not failures)
    permanent: bool = False  # the last failure was bad input: retrying cannot help
    reason: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)  # from the stage's manifest(s), once succeeded


class Action(StrEnum):
    START = "start"  # start `stages` (others may still be running)
    WAIT = "wait"  # stages are running, nothing new can start
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class StageToStart:
    stage: PlannedStage
    attempt: int  # 1-based


@dataclass(frozen=True)
class Plan:
    action: Action
    start: tuple[StageToStart, ...] = ()
    reason: str = ""
    failed_stage: str | None = None
    final_model: str | None = field(default=None)
    best_iteration: int | None = None  # set when the gate stopped the run: the iteration whose model is published
    published_iteration: int | None = None  # DONE: the iteration whose model is published (0 = the seed model)


# spec.evaluation.winRate.lengthControl -> the evaluate stage's --lc-glm
LC_GLM = {"minimal": "minimal", "alpacaEvalV1": "alpaca_eval_v1"}


def iteration_dir(root: str, iteration: int) -> str:
    return f"{root.rstrip('/')}/iter-{iteration:02d}"


def _key(iteration: int, stage: str) -> str:
    return f"iter-{iteration:02d}/{stage}"


def model_uri(root: str, iteration: int) -> str:
    """π_i: the model trained in iteration i (0 = seed)."""
    stage = contract.SEED_TRAIN if iteration == 0 else contract.TRAIN
    return f"{root.rstrip('/')}/{_key(iteration, stage)}/{contract.MODEL_SUBDIR}"


def resolve_strategy(strategy: str, lora: bool, world_size: int) -> str:
    """`auto` made explicit for a stage of several processes: sharded for full-parameter training, ddp for LoRA (its
    trainable weights are small: copies cost less than sharding's communication). One process has nothing to share."""
    if strategy != "auto" or world_size <= 1:
        return strategy
    return "ddp" if lora else "fsdp"


def stage_graph(spec: AlignmentRunSpec, root: str) -> list[PlannedStage]:
    """Every stage of the run, in a valid execution order."""
    root = root.rstrip("/")
    t, g, r = spec.training, spec.generation, spec.training.refinement
    sft = spec.model.sft
    out = lambda i, s: f"{root}/{_key(i, s)}"  # noqa: E731
    train_common = dict(
        beta=t.beta, learning_rate=t.learning_rate, batch_size=t.batch_size,
        per_device_batch_size=t.micro_batch_size, max_length=t.max_length, max_prompt_length=t.max_prompt_length,
        lora_r=t.lora.r if t.lora else 0, lora_alpha=t.lora.alpha if t.lora else 16,
        lora_dropout=t.lora.dropout if t.lora else 0.0, seed=t.seed,
    )
    lengths = dict(max_length=t.max_length, max_prompt_length=t.max_prompt_length)

    def launch(stage: str) -> dict:
        """How a train stage runs: one process per GPU of each of its pods, with the spec's sharding strategy."""
        res = stage_resources(spec, stage)
        processes = max(res.gpus, 1)
        return dict(processes=processes, nodes=res.nodes,
                    strategy=resolve_strategy(t.strategy, t.lora is not None, processes * res.nodes),
                    checkpoint_every_steps=t.checkpoint.every_steps,
                    checkpoint_every_minutes=t.checkpoint.every_minutes)

    def tensor_parallel(stage: str, backend: str) -> int:
        """vLLM splits one engine over the pod's GPUs; transformers runs on one device."""
        return max(stage_resources(spec, stage).gpus, 1) if backend == "vllm" else 1

    win = spec.evaluation.win_rate if spec.evaluation else None
    evaluates = bool(spec.data.heldout or win)
    # the win rate's inputs: what validate checks and evaluate reads (a reference model is unused once reference
    # answers are given, so it is left out: neither checked nor in a fingerprint)
    win_inputs = {} if win is None else dict(
        winrate_prompts=win.prompts, winrate_samples=win.samples, winrate_reference_answers=win.reference_answers,
        winrate_reference_model=None if win.reference_answers else win.reference_model)
    win_args = {} if win is None else dict(
        **win_inputs, answer_backend=win.backend,
        answer_max_new_tokens=win.max_new_tokens, answer_temperature=win.temperature, seed=g.seed,
        judge_endpoint=win.judge.endpoint, judge_model=win.judge.model,
        judge_extra_body=json.dumps(win.judge.extra_body, sort_keys=True) if win.judge.extra_body else None,
        judge_max_failed_fraction=win.judge.max_failed_fraction, judge_concurrency=win.judge.concurrency,
        judge_max_retries=win.judge.max_retries, judge_timeout_s=win.judge.timeout_seconds,
        lc_glm=LC_GLM[win.length_control],
        # the length gate compares with the SFT model's answers: the reference's when they are its own
        length_baseline=sft if spec.gate and spec.gate.max_length_change is not None and (
            win.reference_answers or (win.reference_model or sft) != sft) else None)
    judge_probe = {} if win is None else dict(
        judge_endpoint=win.judge.endpoint, judge_model=win.judge.model, judge_extra_body=win_args["judge_extra_body"],
        judge_timeout_s=win.judge.timeout_seconds, lc_glm=LC_GLM[win.length_control])

    def evaluate(i: int, after: str) -> PlannedStage:
        args = EvaluateArgs(policy=model_uri(root, i), reference=sft, heldout=spec.data.heldout,
                            output=out(i, contract.EVALUATE), beta=t.beta, cache=run_cache(root), **lengths,
                            **win_args)
        return PlannedStage(_key(i, contract.EVALUATE), i, contract.EVALUATE, args, (after,))

    # Cheap input checks first, so a typo costs no GPU time.
    validate = PlannedStage(_key(0, contract.VALIDATE), 0, contract.VALIDATE, ValidateArgs(
        model=sft, seed_pairs=spec.data.seed, prompts=spec.data.prompts, heldout=spec.data.heldout,
        output=out(0, contract.VALIDATE), prompts_needed=sum(spec.iterations.per_iteration()), **win_inputs,
        **judge_probe), ())
    seed_key = _key(0, contract.SEED_TRAIN)
    stages = [validate, PlannedStage(seed_key, 0, contract.SEED_TRAIN, SeedTrainArgs(
        model=sft, pairs=spec.data.seed, output=out(0, contract.SEED_TRAIN), reference=sft,
        epochs=t.seed_epochs, refinement=False, **train_common, **launch(contract.SEED_TRAIN)), (validate.key,))]
    if evaluates:
        stages.append(evaluate(0, seed_key))

    # with a gate the next iteration waits for this one's evaluate (the gate may stop the run there)
    gated = spec.gate is not None
    prev_done = _key(0, contract.EVALUATE) if gated else seed_key
    start = 0
    lambdas = r.per_iteration(spec.iterations.count)
    for i, n_prompts in enumerate(spec.iterations.per_iteration(), start=1):
        policy = model_uri(root, i - 1)
        gen = PlannedStage(_key(i, contract.GENERATE), i, contract.GENERATE, GenerateArgs(
            policy=policy, prompts=spec.data.prompts, output=out(i, contract.GENERATE),
            slice_start=start, slice_end=start + n_prompts, responses_per_prompt=g.responses_per_prompt,
            temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, seed=g.seed + i,
            backend=g.backend, batch_size=g.batch_size, shard_count=g.shards,
            tensor_parallel_size=tensor_parallel(contract.GENERATE, g.backend)), (prev_done,))
        judge_ref = sft if spec.judge.reference == "initial" or i == 1 else model_uri(root, i - 2)
        judge = PlannedStage(_key(i, contract.JUDGE), i, contract.JUDGE, JudgeArgs(
            policy=policy, reference=judge_ref, responses=gen.output, output=out(i, contract.JUDGE),
            beta=t.beta, pairing=spec.judge.pairing, seed=g.seed + i, backend=spec.judge.backend,
            shard_count=spec.judge.shards, tensor_parallel_size=tensor_parallel(contract.JUDGE, spec.judge.backend),
            **lengths), (gen.key,))
        train = PlannedStage(_key(i, contract.TRAIN), i, contract.TRAIN, TrainArgs(
            model=policy, pairs=judge.output, output=out(i, contract.TRAIN), reference=None,
            epochs=t.epochs_per_iteration, refinement=r.enabled,
            low_confidence_fraction=r.low_confidence_fraction, smoothing=r.smoothing,
            warmup_fraction=r.warmup_fraction, window=r.window, extrapolation=lambdas[i - 1],
            **train_common, **launch(contract.TRAIN)), (judge.key,))
        stages += [gen, judge, train]
        if evaluates:
            stages.append(evaluate(i, train.key))
        prev_done = _key(i, contract.EVALUATE) if gated else train.key
        start += n_prompts
    return stages


def final_model(spec: AlignmentRunSpec, root: str) -> str:
    return model_uri(root, spec.iterations.count)


@dataclass(frozen=True)
class GateVerdict:
    stop: bool
    best_iteration: int | None  # None: no figure of the gate's metric yet
    reason: str
    stopped_at: int | None = None  # the iteration whose figure stopped the run


# the standard error each gated figure's evaluate manifest carries beside it
GATE_STDERR = {K.HELDOUT_AGREEMENT: K.HELDOUT_AGREEMENT_SE, K.WIN_RATE: K.WIN_RATE_SE,
               K.LC_WIN_RATE: K.LC_WIN_RATE_SE}


def gate_verdict(spec: AlignmentRunSpec, results: Mapping[str, StageResult]) -> GateVerdict | None:
    """The quality gate over the finished evaluations, in iteration order; None when the spec has no gate.

    The gate watches the SPA iterations 1..N: it stops at the first iteration i whose figure is below `floor`, or
    whose drop below the best figure of iterations 1..i-1 is larger than `maxDrop` *and* than `dropStderrs`
    standard errors of the difference (sqrt(se_i² + se_best²), from the figures' own standard errors; a figure
    without one counts as exact), or whose answers' mean length differs from the SFT model's by more than
    `maxLengthChange`; it names the best of iterations 1..i-1 (the seed model when i = 1) as the run's model. The
    seed model's own figure is not compared: it is trained on gold pairs, the held-out set's own distribution, so
    its agreement is not comparable with that of self-trained iterations.
    """
    gate = spec.gate
    if gate is None:
        return None
    name, key = gate.metric, gate.manifest_key
    best: tuple[int, float, float] | None = None  # (iteration, figure, its standard error)
    for i in range(1, spec.iterations.count + 1):
        res = results.get(_key(i, contract.EVALUATE))
        if res is None or res.state is not StageState.SUCCEEDED or key not in res.metrics:
            break  # iterations are gated in order: a later figure waits for this one
        value, se = float(res.metrics[key]), float(res.metrics.get(GATE_STDERR[key], 0.0))
        fallback = best[0] if best else 0
        if gate.floor is not None and value < gate.floor:
            return GateVerdict(True, fallback, f"gate: {name} {value:.4g} at iteration {i} is below the floor "
                                               f"{gate.floor:g}; best iteration {_best_text(best)}", i)
        if best is not None and gate.max_drop is not None:
            drop, se_diff = best[1] - value, math.hypot(se, best[2])
            if value < best[1] - gate.max_drop and drop > gate.drop_stderrs * se_diff:
                return GateVerdict(True, fallback, (
                    f"gate: {name} {value:.4g} at iteration {i} dropped {drop:.4g} below best iteration "
                    f"{_best_text(best)}: more than maxDrop {gate.max_drop:g} and {gate.drop_stderrs:g} standard "
                    f"errors of the difference ({gate.drop_stderrs * se_diff:.3g})"), i)
        drift = length_change(res.metrics)
        if gate.max_length_change is not None and drift is not None and abs(drift) > gate.max_length_change:
            tokens, sft = res.metrics[K.EVAL_ANSWER_TOKENS], res.metrics[K.SFT_ANSWER_TOKENS]
            return GateVerdict(True, fallback, (
                f"gate: answers at iteration {i} average {tokens:.4g} tokens, {abs(drift):.0%} "
                f"{'longer' if drift > 0 else 'shorter'} than the SFT model's {sft:.4g} (maxLengthChange "
                f"{gate.max_length_change:g}); best iteration {_best_text(best)}"), i)
        if best is None or value > best[1]:
            best = (i, value, se)
    if best is None:
        return GateVerdict(False, None, f"gate: no {name} figure found")
    return GateVerdict(False, best[0], f"gate: {name} held; best iteration {_best_text(best)}")


def length_change(metrics: Mapping[str, float]) -> float | None:
    """How much longer (> 0) or shorter (< 0) an evaluated model's answers are than the SFT model's on the same
    prompts with the same sampling settings, as a fraction; None without both figures."""
    tokens, sft = metrics.get(K.EVAL_ANSWER_TOKENS), metrics.get(K.SFT_ANSWER_TOKENS)
    if tokens is None or not sft:
        return None
    return float(tokens) / float(sft) - 1.0


def _best_text(best: tuple[int, float, float] | None) -> str:
    return f"{best[0]} ({best[1]:.4g})" if best else "0 (the seed model)"


# The marker a finished run leaves in its root: which model it publishes and why (read by scripts; the console,
# report.md/json and the operator's status.outputs say the same, all from the planner's Plan).
PUBLISHED_FILE = "PUBLISHED.json"
NO_GATE_REASON = "no quality gate: the last iteration's model is published"


def publication(plan: Plan) -> dict[str, Any]:
    """What a finished run publishes: the model, its iteration (0 = the seed model) and why."""
    return {"model": plan.final_model, "iteration": plan.published_iteration, "reason": plan.reason,
            "stoppedByGate": plan.best_iteration is not None}


def plan_next_stage(spec: AlignmentRunSpec, root: str, results: Mapping[str, StageResult],
                    graph: Sequence[PlannedStage] | None = None) -> Plan:
    """Decide what happens next, given the known state of each stage (absent = never started).

    graph: `stage_graph(spec, root)` where the caller keeps it (the operator parses a spec once per generation;
    building the graph was a tenth of its decision's CPU)."""
    if graph is None:
        graph = stage_graph(spec, root)
    known = {s.key for s in graph}
    unknown = sorted(set(results) - known)
    if unknown:
        return Plan(Action.FAILED, reason=f"state refers to stages not in this run's plan: {', '.join(unknown)}")
    state = {k: results[k].state for k in results}
    for s in graph:
        res = results.get(s.key)
        if res is None or res.state is not StageState.FAILED:
            continue
        if res.permanent:
            return Plan(Action.FAILED, reason=f"{s.key} failed: {res.reason or 'bad input'}", failed_stage=s.key)
        if res.failures > spec.max_retries_per_stage:
            return Plan(Action.FAILED, failed_stage=s.key,
                        reason=f"{s.key} failed {res.failures} times (maxRetriesPerStage={spec.max_retries_per_stage})"
                        + (f": {res.reason}" if res.reason else ""))
    verdict = gate_verdict(spec, results)
    if verdict is not None and verdict.stop:
        # the best iteration, not the one that tripped the gate: its model is what the run publishes
        best = verdict.best_iteration or 0
        return Plan(Action.DONE, reason=verdict.reason, final_model=model_uri(root, best), best_iteration=best,
                    published_iteration=best)
    if all(state.get(s.key) is StageState.SUCCEEDED for s in graph):
        # a gate that held (or had nothing to judge: said, never silent) leaves the last model as the run's
        reason = f"{verdict.reason}; the last iteration's model is published" if verdict else NO_GATE_REASON
        return Plan(Action.DONE, reason=reason, final_model=final_model(spec, root),
                    published_iteration=spec.iterations.count)
    if spec.suspend:
        return Plan(Action.WAIT, reason="suspended")
    ready = []
    for s in graph:
        st = state.get(s.key)
        if st in (StageState.SUCCEEDED, StageState.RUNNING):
            continue
        if all(state.get(d) is StageState.SUCCEEDED for d in s.depends_on):
            failures = results[s.key].failures if s.key in results else 0
            ready.append(StageToStart(s, attempt=failures + 1))
    if ready:
        return Plan(Action.START, start=tuple(ready))
    return Plan(Action.WAIT, reason="waiting for running stages")
