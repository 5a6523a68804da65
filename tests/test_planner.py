"""The planner: stage order, resuming from any set of finished stages, retries, failures, stage arguments."""

from __future__ import annotations

import copy
import itertools

import pytest
from spa_operator.planner import (
    Action,
    StageResult,
    StageState,
    final_model,
    model_uri,
    plan_next_stage,
    stage_graph,
)
from spa_operator.spec import parse_run
from spa_workers import contract

ROOT = "s3://b/runs/ns/r"


def make_spec(count: int = 2, heldout: bool = True, **spec_overrides):
    doc = {
        "apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r"},
        "spec": {"model": {"sft": "s3://m/sft"},
                 "data": {"seed": "s3://d/seed.jsonl", "prompts": "s3://d/prompts.jsonl"},
                 "iterations": {"count": count, "promptsPerIteration": [10 * (i + 1) for i in range(count)]}},
    }
    if heldout:
        doc["spec"]["data"]["heldout"] = "s3://d/heldout.jsonl"
    for k, v in spec_overrides.items():
        doc["spec"][k] = copy.deepcopy(v)
    return parse_run(doc).spec


def expected_order(count: int, heldout: bool) -> list[str]:
    keys = ["iter-00/validate", "iter-00/seed-train"] + (["iter-00/evaluate"] if heldout else [])
    for i in range(1, count + 1):
        keys += [f"iter-{i:02d}/{s}" for s in ("generate", "judge", "train")]
        keys += [f"iter-{i:02d}/evaluate"] if heldout else []
    return keys


def drive(spec, results=None, fail_once=(), max_steps=200):
    """Play an executor that finishes every started stage (failing the ones in fail_once the first time)."""
    results = dict(results or {})
    started: list[str] = []
    failed: set[str] = set()
    for _ in range(max_steps):
        plan = plan_next_stage(spec, ROOT, results)
        if plan.action is not Action.START:
            return plan, started
        for item in plan.start:
            key = item.stage.key
            # every dependency is finished when a stage starts
            assert all(results[d].state is StageState.SUCCEEDED for d in item.stage.depends_on)
            started.append(key)
            if key in fail_once and key not in failed:
                failed.add(key)
                results[key] = StageResult(StageState.FAILED, failures=item.attempt)
            else:
                results[key] = StageResult(StageState.SUCCEEDED)
    raise AssertionError("planner did not converge")


@pytest.mark.parametrize("count", [0, 1, 2, 3])
@pytest.mark.parametrize("heldout", [True, False])
def test_stage_order(count, heldout):
    spec = make_spec(count, heldout)
    assert [s.key for s in stage_graph(spec, ROOT)] == expected_order(count, heldout)
    plan, started = drive(spec)
    assert plan.action is Action.DONE
    assert sorted(started) == sorted(expected_order(count, heldout))  # each stage exactly once
    assert plan.final_model == model_uri(ROOT, count) == final_model(spec, ROOT)


def test_resume_from_any_set_of_finished_stages():
    spec = make_spec(2, heldout=True)
    graph = stage_graph(spec, ROOT)
    keys = [s.key for s in graph]
    deps = {s.key: s.depends_on for s in graph}
    for n in range(len(keys) + 1):
        for done in itertools.combinations(keys, n):
            results = {k: StageResult(StageState.SUCCEEDED) for k in done}
            plan = plan_next_stage(spec, ROOT, results)
            ready = {k for k in keys if k not in done and all(d in done for d in deps[k])}
            if len(done) == len(keys):
                assert plan.action is Action.DONE
                continue
            assert plan.action is Action.START
            assert {t.stage.key for t in plan.start} == ready
            final, started = drive(spec, results)
            assert final.action is Action.DONE
            assert not set(started) & set(done), "a finished stage was run again"
            assert set(started) | set(done) == set(keys)


def test_running_stages_are_not_started_again():
    spec = make_spec(1, heldout=True)
    results = {"iter-00/validate": StageResult(StageState.SUCCEEDED),
               "iter-00/seed-train": StageResult(StageState.SUCCEEDED),
               "iter-00/evaluate": StageResult(StageState.RUNNING),
               "iter-01/generate": StageResult(StageState.RUNNING)}
    plan = plan_next_stage(spec, ROOT, results)
    assert plan.action is Action.WAIT


def test_retry_then_succeed_and_attempt_numbers():
    spec = make_spec(1, heldout=False, maxRetriesPerStage=1)
    plan, started = drive(spec, fail_once={"iter-01/judge"})
    assert plan.action is Action.DONE
    assert started.count("iter-01/judge") == 2
    results = {"iter-00/validate": StageResult(StageState.SUCCEEDED),
               "iter-00/seed-train": StageResult(StageState.SUCCEEDED),
               "iter-01/generate": StageResult(StageState.FAILED, failures=1)}
    (item,) = plan_next_stage(spec, ROOT, results).start
    assert (item.stage.key, item.attempt) == ("iter-01/generate", 2)


def test_fails_after_max_retries_with_reason():
    spec = make_spec(1, heldout=False, maxRetriesPerStage=2)
    results = {"iter-00/seed-train": StageResult(StageState.FAILED, failures=3, reason="OOM")}
    plan = plan_next_stage(spec, ROOT, results)
    assert plan.action is Action.FAILED
    assert plan.failed_stage == "iter-00/seed-train"
    assert "3 times" in plan.reason and "OOM" in plan.reason
    results = {"iter-00/seed-train": StageResult(StageState.FAILED, failures=2)}
    assert plan_next_stage(spec, ROOT, results).action is Action.START


def test_bad_input_fails_at_once():
    spec = make_spec(1, heldout=False, maxRetriesPerStage=5)
    results = {"iter-00/seed-train": StageResult(StageState.FAILED, failures=1, permanent=True,
                                                 reason="seed.jsonl: row 3: not valid JSON")}
    plan = plan_next_stage(spec, ROOT, results)
    assert plan.action is Action.FAILED and "row 3" in plan.reason


def test_suspend_waits_and_unknown_stage_fails():
    spec = make_spec(1, heldout=False, suspend=True)
    assert plan_next_stage(spec, ROOT, {}).action is Action.WAIT
    spec = make_spec(1, heldout=False)
    plan = plan_next_stage(spec, ROOT, {"iter-09/train": StageResult(StageState.SUCCEEDED)})
    assert plan.action is Action.FAILED and "iter-09/train" in plan.reason


def test_stage_arguments_wire_models_and_data():
    spec = make_spec(3, heldout=True, training={"refinement": {"extrapolation": [0.5, 0.25, 0.125]}})
    by_key = {s.key: s.args for s in stage_graph(spec, ROOT)}
    validate, seed = by_key["iter-00/validate"], by_key["iter-00/seed-train"]
    # the cheap input checks come first and know how many prompts the iterations take
    assert (validate.model, validate.seed_pairs, validate.prompts) == ("s3://m/sft", "s3://d/seed.jsonl",
                                                                 "s3://d/prompts.jsonl")
    assert validate.heldout == "s3://d/heldout.jsonl" and validate.prompts_needed == 60
    assert seed.model == seed.reference == "s3://m/sft"
    assert seed.refinement is False and seed.epochs == 3
    starts = []
    for i in (1, 2, 3):
        gen, judge, train, ev = (by_key[f"iter-{i:02d}/{s}"] for s in ("generate", "judge", "train", "evaluate"))
        assert gen.policy == judge.policy == train.model == model_uri(ROOT, i - 1)
        assert judge.responses == gen.output and train.pairs == judge.output
        assert judge.reference == "s3://m/sft"  # the fixed reference π_init
        assert train.reference is None  # DPO's reference is π_{i-1} itself
        assert train.refinement is True and train.extrapolation == [0.5, 0.25, 0.125][i - 1]
        assert ev.policy == model_uri(ROOT, i) and ev.reference == "s3://m/sft"
        assert train.output + "/model" == model_uri(ROOT, i)
        starts.append((gen.slice_start, gen.slice_end))
    assert starts == [(0, 10), (10, 30), (30, 60)]  # disjoint slices, in order


def test_judge_reference_previous_ablation():
    spec = make_spec(3, heldout=False, judge={"reference": "previous"})
    by_key = {s.key: s.args for s in stage_graph(spec, ROOT)}
    assert by_key["iter-01/judge"].reference == "s3://m/sft"
    assert by_key["iter-02/judge"].reference == model_uri(ROOT, 0)
    assert by_key["iter-03/judge"].reference == model_uri(ROOT, 1)


def test_refinement_disabled_and_shards():
    spec = make_spec(1, heldout=False, training={"refinement": {"enabled": False}},
                     generation={"shards": 4}, judge={"shards": 2})
    graph = {s.key: s for s in stage_graph(spec, ROOT)}
    assert graph["iter-01/train"].args.refinement is False
    assert graph["iter-01/generate"].shards == 4 and graph["iter-01/judge"].shards == 2
    dirs = contract.stage_manifest_dirs(graph["iter-01/generate"].args)
    assert dirs[-1].endswith("generate/shard-00003-of-00004")


@pytest.mark.parametrize("stage", sorted(contract.ARGS_BY_STAGE))
def test_argv_round_trip(stage):
    spec = make_spec(2, heldout=True, training={"lora": {"r": 8}})
    for s in stage_graph(spec, ROOT):
        if s.stage == stage:
            cls = contract.ARGS_BY_STAGE[stage]
            argv = s.args.to_argv()
            assert argv[0] == stage
            assert cls.from_argv(argv[1:]) == s.args


def test_launch_and_tensor_parallel_come_from_the_stage_resources():
    spec = make_spec(1, resources={"seedTrain": {"gpus": 4}, "train": {"gpus": 8, "nodes": 2},
                                   "generate": {"gpus": 4}, "judge": {"gpus": 2}},
                     training={"checkpoint": {"everySteps": 100, "everyMinutes": 0}},
                     generation={"backend": "vllm"}, judge={"backend": "transformers"})
    by = {s.key: s.args for s in stage_graph(spec, ROOT)}
    seed, train = by["iter-00/seed-train"], by["iter-01/train"]
    assert (seed.processes, seed.nodes, seed.strategy) == (4, 1, "fsdp")  # auto: full-parameter → sharded
    assert (train.processes, train.nodes, train.strategy) == (8, 2, "fsdp")
    assert (train.checkpoint_every_steps, train.checkpoint_every_minutes) == (100, 0)
    assert by["iter-01/generate"].tensor_parallel_size == 4
    assert by["iter-01/judge"].tensor_parallel_size == 1  # transformers: one device
    lora = {s.key: s.args for s in stage_graph(make_spec(1, training={"lora": {"r": 8}},
                                                         resources={"train": {"gpus": 2}}), ROOT)}
    assert lora["iter-01/train"].strategy == "ddp" and lora["iter-00/seed-train"].processes == 1
    assert lora["iter-00/seed-train"].strategy == "auto"  # one process: nothing to share
