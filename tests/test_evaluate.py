"""The evaluate stage through `spa-worker evaluate`: held-out agreement equals an independent computation."""

from __future__ import annotations

import json

import pytest
from independent_rewards import rewards as independent_rewards
from spa_workers import contract, storage
from spa_workers.contract import ManifestKeys
from spa_workers.data import load_pairs, write_jsonl

BETA = 0.2


def test_agreement_matches_an_independent_computation(tiny, tiny_policy, worker, tmp_path, s3_env):
    gold = load_pairs(tiny["heldout"])[:8]
    rows = [{"prompt": p.prompt[0]["content"], "chosen": p.chosen, "rejected": p.rejected} for p in gold]
    # a prompt too long to train on, which is left out (identical chosen/rejected rows are refused as bad input)
    rows.append({"prompt": "What is 1 plus 1? " * 20, "chosen": "2", "rejected": "3"})
    heldout = str(tmp_path / "heldout.jsonl")
    write_jsonl(heldout, rows)
    out = f"s3://{s3_env['BUCKET']}/eval"
    proc = worker("evaluate", "--policy", tiny_policy, "--reference", tiny["model"], "--heldout", heldout,
                  "--output", out, "--beta", str(BETA), "--max-prompt-length", "48", env=s3_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(storage.read_text(storage.join(out, contract.MANIFEST)))

    scored = load_pairs(heldout)[:-1]
    items = [item for p in scored for item in ((p.prompt, p.chosen), (p.prompt, p.rejected))]
    r = independent_rewards(tiny_policy, tiny["model"], items, BETA)
    margins = [c - rj for c, rj in zip(r[0::2], r[1::2], strict=True)]
    agree = [m > 0 for m in margins]
    assert 0 < sum(agree) < len(agree)  # neither all nor none, or the comparison would prove little
    assert manifest["counts"] == {"pairs": 8, "skipped_long_prompt": 1}
    assert manifest["metrics"][ManifestKeys.HELDOUT_AGREEMENT] == pytest.approx(sum(agree) / len(agree))
    assert manifest["metrics"][ManifestKeys.MARGIN] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
