"""The win-rate path end to end against a real OpenAI-compatible server: vLLM's own (`vllm.entrypoints.openai.
api_server`) serving the tiny model as the judge, held to the two identifiers by vLLM's structured outputs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from spa_workers import contract, storage, winrate
from spa_workers.contract import ManifestKeys as K
from spa_workers.data import write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_judge(tiny, tmp_path_factory):
    """vLLM's OpenAI-compatible server on the tiny model (one start for the module); yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny["model"],
             "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             # alpaca_eval's judge template is ~1,300 tokens of the tiny tokenizer: the random-weight RoPE model is
             # served with a longer context than its config's 1024
             "--max-model-len", "2048", "--hf-overrides", json.dumps({"max_position_embeddings": 2048}),
             "--enforce-eager", "--seed", "0"],
            stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"vLLM server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine process it spawned
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_evaluate_stage_against_vllm_server(vllm_judge, tiny, tiny_policy, worker, tmp_path):
    n = 6
    write_jsonl(str(tmp_path / "prompts.jsonl"), [{"prompt": f"What is {i} plus 3?"} for i in range(n)])
    write_jsonl(str(tmp_path / "ref.jsonl"), [{"answer": f"The answer is {i + 3}."} for i in range(n)])
    out = str(tmp_path / "out")
    proc = worker("evaluate", "--policy", tiny_policy, "--reference", tiny["model"], "--output", out,
                  "--winrate-prompts", str(tmp_path / "prompts.jsonl"), "--winrate-reference-answers",
                  str(tmp_path / "ref.jsonl"), "--answer-backend", "transformers", "--answer-max-new-tokens", "12",
                  "--judge-endpoint", vllm_judge, "--judge-model", "tiny-judge", "--judge-extra-body",
                  json.dumps({"structured_outputs": {"choice": ["m", "M"]}}), "--judge-concurrency", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(storage.read_text(storage.join(out, contract.MANIFEST)))
    counts, metrics = manifest["counts"], manifest["metrics"]
    assert counts[K.WINRATE_PROMPTS] == n and counts[K.JUDGE_FAILED] == 0 and counts[K.JUDGE_REFUSED] == 0
    assert counts["judge_http_attempts"] == 2 * n
    rows = [json.loads(line) for line in Path(out, "winrate.jsonl").read_text().splitlines()]
    prefs = [r["preference"] for r in rows]
    assert all(1.0 <= p <= 2.0 for p in prefs)
    # the manifest's figures are alpaca_eval's arithmetic on the recorded judgments
    assert (metrics[K.WIN_RATE], metrics[K.WIN_RATE_SE]) == pytest.approx(winrate.win_rate(prefs), nan_ok=True)
    assert (metrics[K.LC_WIN_RATE], metrics[K.LC_WIN_RATE_SE]) == pytest.approx(winrate.length_controlled_win_rate(
        prefs, [len(r["reference"]) for r in rows], [len(r["policy"]) for r in rows]), nan_ok=True)
    assert 0.0 <= metrics[K.FIRST_POSITION_RATE] <= 1.0
