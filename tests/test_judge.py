"""The judge: implicit rewards against an independent forward pass, pairing rules, degenerate prompts, the
whole stage through `spa-worker judge` (shards on S3), and the vLLM scoring backend against transformers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from independent_rewards import rewards as independent_rewards
from spa_workers import contract, storage
from spa_workers.contract import ManifestKeys, StageManifest
from spa_workers.data import load_pairs, write_jsonl
from spa_workers.judge import candidates, choose_pair
from spa_workers.scoring import Encoded, Limits, implicit_rewards, pack_batches

BETA = 0.1


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _items(tiny) -> list[tuple[list[dict], str]]:
    """Answers of different lengths, a multi-turn prompt and a system prompt: batch rows differ in padding."""
    pairs = load_pairs(tiny["heldout"])[:3]
    items = [(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)]
    items.append((_user("What is 1 plus 2?"), "The answer is 3. " * 6))
    items.append(([{"role": "system", "content": "Be brief."}, *_user("What is 5 plus 5?"),
                   {"role": "assistant", "content": "10"}, *_user("And 6 plus 6?")], "12"))
    return items


def test_rewards_match_an_independent_forward_pass(tiny, tiny_policy):
    items = _items(tiny)
    expected = independent_rewards(tiny_policy, tiny["model"], items, BETA)
    assert max(abs(r) for r in expected) > 1e-3  # policy != reference, or the comparison would prove nothing
    for budget in (64, 8192):  # several small padded batches, and everything in one batch
        got = implicit_rewards(tiny_policy, tiny["model"], items, BETA, Limits(max_batch_tokens=budget))
        assert got == pytest.approx(expected, abs=1e-5, rel=0)


def test_long_prompts_are_skipped_and_answers_truncated(tiny, tiny_policy):
    short = (_user("What is 1 plus 2?"), "The answer is 3, and 3 is the answer.")
    long = (_user("What is 1 plus 2? " * 30), "3")
    limits = Limits(max_length=20, max_prompt_length=15)
    got = implicit_rewards(tiny_policy, tiny["model"], [short, long], BETA, limits)
    assert got[1] is None
    # keep_start truncation of prompt + answer at max_length, as TRL does
    truncated = independent_rewards(tiny_policy, tiny["model"], [short], BETA, max_length=20)[0]
    assert got[0] == pytest.approx(truncated, abs=1e-5, rel=0)
    full = independent_rewards(tiny_policy, tiny["model"], [short], BETA)[0]
    assert got[0] != pytest.approx(full, abs=1e-5)


def test_pack_batches_respects_the_token_budget():
    lengths = [5, 17, 3, 9, 9, 30, 1]
    seqs = [Encoded(ids=[0] * n, answer_start=0) for n in lengths]
    batches = pack_batches(seqs, max_batch_tokens=20)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 20
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    assert [[lengths[i] for i in b] for b in batches] == [[30], [17], [9, 9], [5, 3, 1]]


def test_min_max_and_max_random_pairing():
    rewards = {0: 0.1, 1: 0.5, 2: -0.3, 3: 0.2}
    assert choose_pair(rewards, "min-max", random.Random(0)) == (1, 2)
    picks = [choose_pair(rewards, "max-random", random.Random(s)) for s in range(60)]
    assert {c for c, _ in picks} == {1}
    assert {r for _, r in picks} == {0, 2, 3}  # any other answer, the lowest included
    assert choose_pair(rewards, "max-random", random.Random(5)) == choose_pair(rewards, "max-random",
                                                                               random.Random(5))
    # all rewards equal (policy == reference): still two different answers
    assert choose_pair({0: 0.0, 1: 0.0}, "min-max", random.Random(0)) == (0, 1)
    assert choose_pair({2: 0.0, 4: 0.0}, "max-random", random.Random(0)) == (2, 4)


@pytest.mark.parametrize(("responses", "keep", "reason"), [
    (["a", "b"], [0, 1], None),
    (["a", "a"], [0], "identical"),
    (["", "b"], [1], "empty"),
    (["  \n", "b"], [1], "empty"),
    (["", ""], [], "empty"),
    (["a", "a", "a"], [0], "identical"),
    (["a", "a", "b", ""], [0, 2], None),  # >2 answers: distinct non-empty ones stay candidates
    (["a", "", "a"], [0], "empty"),  # an empty answer among the causes: counted as empty
])
def test_degenerate_answers(responses, keep, reason):
    assert candidates(responses) == (keep, reason)


# --- the whole stage through `spa-worker judge` -------------------------------------------------------------

def _write_generate_output(root: Path, shards: list[list[dict]], finished: bool = True) -> str:
    """A generate stage dir as that stage leaves it: shard dirs with responses.jsonl and a manifest."""
    out = root / "generate"
    for i, rows in enumerate(shards):
        shard = Path(contract.shard_dir(str(out), i, len(shards)))
        write_jsonl(str(shard / contract.RESPONSES_FILE), rows)
        if finished or i == 0:
            (shard / contract.MANIFEST).write_text(StageManifest(stage="generate", files={}).to_json())
    return str(out)


@pytest.fixture(scope="module")
def responses(tiny, tmp_path_factory) -> dict:
    """Generate-stage output in two shards: 6 normal prompts (2 or 3 answers) and 3 degenerate ones."""
    pairs = load_pairs(tiny["heldout"])
    rows = [{"prompt_index": i, "prompt": p.prompt, "responses": [p.chosen, p.rejected]}
            for i, p in enumerate(pairs[:5])]
    rows[2]["responses"].append("The answer is 7, I think.")
    rows += [
        {"prompt_index": 5, "prompt": _user("What is 2 plus 2?"), "responses": ["4", "4"]},
        {"prompt_index": 6, "prompt": _user("What is 3 plus 3?"), "responses": ["", "6"]},
        {"prompt_index": 7, "prompt": _user("What is 4 plus 4?"), "responses": ["8", "8", "9 maybe", ""]},
        {"prompt_index": 8, "prompt": _user("What is 9 plus 9?"), "responses": ["18", "  "]},
    ]
    root = tmp_path_factory.mktemp("judge")
    return {"rows": rows, "local": _write_generate_output(root, [rows[:4], rows[4:]])}


def _pairs(stage_output: str, shard: int = 0, count: int = 1) -> tuple[list[dict], dict]:
    d = contract.shard_dir(stage_output, shard, count)
    text = storage.read_text(storage.join(d, contract.PAIRS_FILE))
    pairs = [json.loads(line) for line in text.splitlines()]
    return pairs, json.loads(storage.read_text(storage.join(d, contract.MANIFEST)))


def _assert_min_max_pairs(pairs: list[dict], manifest: dict, rows: list[dict], tiny, tiny_policy) -> None:
    """A min-max judge's pairs of the `responses` rows: the best and worst answer and their rewards by an
    independent forward pass (beta BETA), the degenerate prompts dropped."""
    assert manifest["counts"] == {"prompts": 9, "pairs": 6, "dropped_identical": 1, "dropped_empty": 2,
                                  "skipped_long_prompt": 0}
    assert [p["prompt_index"] for p in pairs] == [0, 1, 2, 3, 4, 7]
    for p in pairs:
        row = rows[p["prompt_index"]]
        answers = list(dict.fromkeys(a for a in row["responses"] if a.strip()))
        items = [(row["prompt"], a) for a in answers]
        expected = independent_rewards(tiny_policy, tiny["model"], items, BETA)
        best = max(range(len(answers)), key=expected.__getitem__)
        worst = min(range(len(answers)), key=expected.__getitem__)
        assert p["prompt"] == row["prompt"]
        assert (p["chosen"], p["rejected"]) == (answers[best], answers[worst])
        assert p["chosen_reward"] == pytest.approx(expected[best], abs=1e-5, rel=0)
        assert p["rejected_reward"] == pytest.approx(expected[worst], abs=1e-5, rel=0)
        assert p["confidence"] == pytest.approx(1 / (1 + math.exp(p["rejected_reward"] - p["chosen_reward"])))


def test_judge_stage_min_max_on_s3(tiny, tiny_policy, responses, worker, s3_env):
    rows = responses["rows"]
    src = f"s3://{s3_env['BUCKET']}/run/generate"
    storage.upload_dir(responses["local"], src)
    out = f"s3://{s3_env['BUCKET']}/run/judge"
    proc = worker("judge", "--policy", tiny_policy, "--reference", tiny["model"], "--responses", src,
                  "--output", out, "--beta", str(BETA), "--pairing", "min-max", "--max-batch-tokens", "128",
                  env=s3_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs, manifest = _pairs(out)
    _assert_min_max_pairs(pairs, manifest, rows, tiny, tiny_policy)
    m = manifest["metrics"]
    assert m[ManifestKeys.REWARD_GAP] == pytest.approx(
        sum(p["chosen_reward"] - p["rejected_reward"] for p in pairs) / len(pairs))
    assert m[ManifestKeys.CHOSEN_REWARD] == pytest.approx(sum(p["chosen_reward"] for p in pairs) / len(pairs))
    assert m[ManifestKeys.CONFIDENCE] > 0.5 and m[ManifestKeys.PAIRS_PER_S] > 0
    # the train stage reads these pairs
    reread = load_pairs(storage.join(contract.shard_dir(out, 0, 1), contract.PAIRS_FILE))
    assert [pp.chosen for pp in reread] == [p["chosen"] for p in pairs]


def test_judge_stage_max_random_second_shard(tiny, tiny_policy, responses, worker, tmp_path):
    out = str(tmp_path / "judge")
    proc = worker("judge", "--policy", tiny_policy, "--reference", tiny["model"], "--responses",
                  responses["local"], "--output", out, "--pairing", "max-random", "--seed", "3",
                  "--shard-count", "2", env={"JOB_COMPLETION_INDEX": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs, manifest = _pairs(out, 1, 2)
    # shard 1 of 2 takes prompts 4..8 of the 9 (contiguous): 4 and 7 are judged, 5, 6, 8 dropped
    assert manifest["counts"]["prompts"] == 5 and manifest["counts"]["pairs"] == 2
    assert [p["prompt_index"] for p in pairs] == [4, 7]
    seven = pairs[1]
    scores = dict(zip(["8", "9 maybe"], independent_rewards(
        tiny_policy, tiny["model"], [(seven["prompt"], a) for a in ("8", "9 maybe")], BETA), strict=True))
    assert seven["chosen"] == max(scores, key=scores.__getitem__)  # max-random: chosen is still the best


def test_judge_refuses_unfinished_generate_output(tiny, responses, worker, tmp_path):
    rows = responses["rows"]
    src = _write_generate_output(tmp_path, [rows[:4], rows[4:]], finished=False)
    proc = worker("judge", "--policy", tiny["model"], "--reference", tiny["model"], "--responses", src,
                  "--output", str(tmp_path / "judge"))
    assert proc.returncode == 2
    assert f"spa-worker judge: error: {src}: 1 of 2 shards finished" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_vllm_scoring_matches_transformers(tiny, tiny_policy, responses, worker, tmp_path):
    """One `spa-worker judge --backend vllm` run (two vLLM engines), held to the same independent forward pass (and
    tolerance) as the transformers backend in test_judge_stage_min_max_on_s3: the two backends agree to 2e-5, and no
    transformers judge process has to run here beside the engines."""
    out = str(tmp_path / "vllm")
    proc = worker("judge", "--policy", tiny_policy, "--reference", tiny["model"], "--responses",
                  responses["local"], "--output", out, "--backend", "vllm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs, manifest = _pairs(out)
    assert manifest["versions"].get("vllm")
    _assert_min_max_pairs(pairs, manifest, responses["rows"], tiny, tiny_policy)
