"""The validate stage checks the win rate's inputs (spec.evaluation.winRate) before any GPU work, through `spa plan`
(`--check` runs the validate checks) and `spa-worker validate`: the prompts, the reference answers that must answer
each of them, and the reference model. Fast: no stage runs, no model weights load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from spa_operator.cli import main
from test_cli import edit, write_run
from workerproc import run_worker

JUDGE = {"endpoint": "http://judge:8000/v1", "model": "judge"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompts(n: int) -> list[dict]:
    return [{"prompt": f"Name a number above {k}."} for k in range(n)]


def answers(n: int) -> list[dict]:
    return [{"answer": f"{k + 1}."} for k in range(n)]


def tokenizer_only_copy(model: str, dest: Path, chat_template: bool = True) -> Path:
    """The model's config and tokenizer without its weights (validate loads no weights), optionally with its chat
    template taken out of the tokenizer."""
    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    if not chat_template:
        (dest / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((dest / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def win_rate_run(tmp_path: Path, tiny: dict[str, str], **win: object) -> Path:
    run = write_run(tmp_path, tiny)
    edit(run, lambda s: s.update(evaluation={"winRate": {"judge": JUDGE, **win}}))  # win may name its own judge
    return run


def test_plan_names_missing_win_rate_files_and_reference_model(tmp_path, tiny, capsys):
    run = win_rate_run(tmp_path, tiny, prompts="no-prompts.jsonl", referenceModel="no-model")
    assert main(["plan", str(run)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"spa plan: error: spec.evaluation.winRate.prompts: {tmp_path / 'no-prompts.jsonl'}: file not found",
        f"spa plan: error: spec.evaluation.winRate.referenceModel: {tmp_path / 'no-model'}: "
        "no model there (no config.json)"]


@pytest.mark.parametrize(("prompt_rows", "win", "expected"), [
    ([*prompts(2), {"prompt": " "}, *prompts(2)], {}, "{prompts}: row 3: the prompt is empty"),
    (prompts(5), {"samples": 6},
     "{prompts}: has 5 prompts but the win rate needs 6 (spec.evaluation.winRate.samples)"),
    (prompts(5), {"referenceAnswers": answers(4)},
     "{answers}: 4 reference answers for 5 prompts (one row per prompt, in order)"),
    (prompts(5), {"samples": 3, "referenceAnswers": [*answers(1), {"text": "2."}, *answers(3)]},
     "{answers}: row 2: missing string column answer (or output)"),
    (prompts(5), {"referenceModel": "no-chat-template"}, "model {model}: tokenizer has no chat template"),
    (prompts(5), {"lengthControl": "alpacaEvalV1"}, "{prompts}: has 5 prompts, but lengthControl alpacaEvalV1 needs "
     "AlpacaEval's 805 instructions in their order (spec.evaluation.winRate.lengthControl)"),
])
def test_plan_check_rejects_unusable_win_rate_inputs(tmp_path, tiny, capsys, prompt_rows, win, expected):
    paths = {"prompts": write_jsonl(tmp_path / "win-prompts.jsonl", prompt_rows),
             "answers": tmp_path / "answers.jsonl", "model": tmp_path / "no-chat-template"}
    if "referenceAnswers" in win:
        win = {**win, "referenceAnswers": str(write_jsonl(paths["answers"], win["referenceAnswers"]))}
    if "referenceModel" in win:
        tokenizer_only_copy(tiny["model"], paths["model"], chat_template=False)
    run = win_rate_run(tmp_path, tiny, prompts=str(paths["prompts"]), **win)
    assert main(["plan", str(run), "--check"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["spa plan: error: " + expected.format(**paths)]


def test_plan_check_accepts_usable_win_rate_inputs(tmp_path, tiny, capsys):
    """The first `samples` prompts need answers, not the rest; a reference model next to reference answers is
    unused by evaluate, so it is not checked either."""
    broken = tmp_path / "unused-model"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    from judge_server import FakeJudge

    with FakeJudge(lambda i, f, s: 0.5) as judge:  # the judge is probed too
        run = win_rate_run(tmp_path, tiny, prompts=str(write_jsonl(tmp_path / "p.jsonl", prompts(5))), samples=4,
                           referenceAnswers=str(write_jsonl(tmp_path / "a.jsonl", answers(4))),
                           referenceModel=str(broken), judge={"endpoint": judge.url, "model": "judge"})
        assert main(["plan", str(run), "--check"]) == 0
        assert "4 winrate prompts, 4 winrate reference answers;" in capsys.readouterr().err
        edit(run, lambda s: s["evaluation"]["winRate"].update(
            referenceAnswers=None, referenceModel=str(tokenizer_only_copy(tiny["model"], tmp_path / "ref"))))
        assert main(["plan", str(run), "--check"]) == 0


def test_worker_validate_rejects_a_broken_reference_model_in_one_line(tmp_path, tiny):
    broken = tmp_path / "ref"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    proc = run_worker("validate", "--model", tiny["model"], "--seed-pairs", tiny["seed"], "--prompts",
                      tiny["prompts"], "--output", str(tmp_path / "out"), "--winrate-prompts", tiny["prompts"],
                      "--winrate-samples", "64", "--winrate-reference-model", str(broken))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].startswith(
        f"spa-worker validate: error: model {broken}: config.json does not load ("), proc.stderr[-2000:]


# ------------------------------------------------------------------------- the judge, probed before any GPU work

SECRET = "sk-probe-Zq8v1-DO-NOT-PRINT"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def judged_run(tmp_path: Path, tiny: dict[str, str], endpoint: str, **judge: object) -> Path:
    return win_rate_run(tmp_path, tiny, prompts=str(write_jsonl(tmp_path / "p.jsonl", prompts(3))),
                        referenceAnswers=str(write_jsonl(tmp_path / "a.jsonl", answers(3))),
                        judge={"endpoint": endpoint, "model": "judge", **judge})


@pytest.mark.parametrize(("server", "key", "code", "expected"), [
    ("down", SECRET, 1, "judge {url}: unreachable (APIConnectionError) after 2 retries"),
    ("keyed", "sk-wrong", 2, "judge {url}: HTTP 401 (the API key was refused: SPA_JUDGE_API_KEY, or "
                             "judge.secretRef on a cluster), not retried: Incorrect API key provided"),
    ("html", SECRET, 2, "judge {url}: HTTP 200 but the reply is not a chat completion (text/html: '<html><body>"),
    ("keyed", SECRET, 0, None),
])
def test_plan_check_probes_the_judge_with_the_key(tmp_path, tiny, capsys, monkeypatch, server, key, code, expected):
    """`spa plan --check` said "inputs OK" with the judge down; the failure came after seed training. Now one small
    request with the key: unreachable is retryable (1), a refused key or an unusable reply is bad input (2)."""
    from judge_server import FakeJudge

    monkeypatch.setenv("SPA_JUDGE_API_KEY", key)
    judge = FakeJudge(lambda i, f, s: 0.5, api_key=SECRET, fault_all="html" if server == "html" else None)
    if server == "down":
        url = f"http://127.0.0.1:{_closed_port()}/v1"
        assert main(["plan", str(judged_run(tmp_path, tiny, url)), "--check"]) == code
    else:
        with judge:
            url = judge.url
            assert main(["plan", str(judged_run(tmp_path, tiny, url)), "--check"]) == code
        assert len(judge.requests) == 1 and judge.requests[0]["auth"] == f"Bearer {key}"
    err = capsys.readouterr().err
    assert SECRET not in err
    if expected is None:
        assert err.strip().endswith("storage is writable; the judge answers)"), err
    else:
        assert err.strip().splitlines() == ["spa plan: error: " + expected.format(url=url)] or \
            err.strip().startswith("spa plan: error: " + expected.format(url=url)), err
        assert len(err.strip().splitlines()) == 1


def test_worker_validate_refuses_a_bad_key_in_one_line(tmp_path, tiny):
    from judge_server import FakeJudge

    with FakeJudge(lambda i, f, s: 0.5, api_key=SECRET) as judge:
        proc = run_worker("validate", "--model", tiny["model"], "--seed-pairs", tiny["seed"], "--prompts",
                          tiny["prompts"], "--output", str(tmp_path / "out"), "--judge-endpoint", judge.url,
                          "--judge-model", "judge", env={"SPA_JUDGE_API_KEY": "sk-wrong"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert errors == [f"spa-worker validate: error: judge {judge.url}: HTTP 401 (the API key was refused: "
                      "SPA_JUDGE_API_KEY, or judge.secretRef on a cluster), not retried: Incorrect API key provided"]
    assert len(judge.requests) == 1 and "Traceback" not in proc.stderr


def test_a_secret_ref_needs_the_key_in_the_environment_here(tmp_path, tiny, capsys, monkeypatch):
    """On one machine a secretRef names nothing that exists: without SPA_JUDGE_API_KEY every judgment would be
    refused after the GPU work. `spa run` and `spa plan --check` say so first, in one line."""
    monkeypatch.delenv("SPA_JUDGE_API_KEY", raising=False)
    run = judged_run(tmp_path, tiny, "http://127.0.0.1:9/v1", secretRef={"name": "judge-key"})
    for argv in (["plan", str(run), "--check"], ["run", str(run)]):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"spa {argv[0]}: error: spec.evaluation.winRate.judge.secretRef names a cluster Secret; here set "
            "SPA_JUDGE_API_KEY to the judge's API key"]
    assert not (tmp_path / "store").exists()  # nothing ran
