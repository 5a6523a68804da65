"""Win rate against a local OpenAI-compatible judge: arithmetic (against alpaca_eval's own on the same annotations),
both answer orders, retries and failures counted, and the evaluate stage through `spa-worker evaluate`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from judge_server import FakeJudge
from spa_workers import contract, storage, winrate
from spa_workers.contract import ManifestKeys as K
from spa_workers.data import write_jsonl

N = 40


def _answers(seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Instructions, policy answers and reference answers of varied lengths; quality is hidden in a digit."""
    rng = random.Random(seed)
    instr = [f"Question {i}: what is {i} plus {i}?" for i in range(N)]
    policy = [f"q{rng.randint(0, 9)} " + "x" * rng.randint(5, 400) for _ in range(N)]
    reference = [f"q{rng.randint(0, 9)} " + "y" * rng.randint(5, 250) for _ in range(N)]
    return instr, policy, reference


def quality(answer: str) -> int:
    return int(answer[1])


def length_loving_judge(instruction: str, first: str, second: str) -> float:
    """A soft judge: prefers the better answer, and longer answers, and what it reads first."""
    z = 0.4 * (quality(first) - quality(second)) + 0.01 * (len(first) - len(second)) + 0.3
    return 1 / (1 + math.exp(-z))


def _client(judge: FakeJudge, **kw) -> winrate.JudgeClient:
    return winrate.JudgeClient(winrate.JudgeSettings(endpoint=judge.url, model="judge", **kw))


def test_arithmetic_matches_alpaca_eval_with_retries_counted():
    instr, policy, reference = _answers()
    faults = {instr[0]: ["429", "429"], instr[1]: ["500"], instr[3]: ["slow"]}
    with FakeJudge(length_loving_judge, faults=faults) as judge:
        client = _client(judge, concurrency=4, max_retries=3, timeout_s=0.5)
        comparisons = winrate.compare_all(client, instr, policy, reference)
        client.close()
    # Both orders, each the judge's own probability: preference = 1 + mean P(policy wins).
    expected = [1 + ((1 - length_loving_judge("", r, p)) + length_loving_judge("", p, r)) / 2
                for p, r in zip(policy, reference, strict=True)]
    assert [c.preference for c in comparisons] == pytest.approx(expected, abs=1e-9)
    seen = {(q["first"], q["second"]) for q in judge.requests if q["fault"] == "ok"}
    assert seen == {(r, p) for p, r in zip(policy, reference, strict=True)} | set(zip(policy, reference, strict=True))
    # Every fault was retried and counted: 2N judgments + 4 retries; the calls answered and their tokens (`usage`).
    report = client.report()
    prompt_tokens = report.pop("judge_prompt_tokens")
    assert report == {"judge_http_attempts": 2 * N + 4, "judge_rate_limited": 2, "judge_server_errors": 1,
                      "judge_client_errors": 0, "judge_no_response": 1, "judge_refused": 0, "judge_failed": 0,
                      "judge_cached": 0, "judge_calls": 2 * N, "judge_completion_tokens": 2 * N}
    assert prompt_tokens > 2 * N * 100  # alpaca_eval's template alone is ~190 words

    wr, se = winrate.win_rate(expected)
    y = np.array(expected) - 1
    assert (wr, se) == pytest.approx((y.mean() * 100, y.std(ddof=1) / math.sqrt(N) * 100))
    lc, lc_se = winrate.length_controlled_win_rate(expected, [len(r) for r in reference], [len(p) for p in policy])
    # The judge loves length and the policy's answers are longer: controlling for length lowers its win rate.
    assert lc < wr - 3 and 0 < lc_se < 20

    pd = pytest.importorskip("pandas")
    glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    from alpaca_eval.metrics import get_winrate

    ours = get_winrate([{"preference": p} for p in expected])
    assert (ours["win_rate"], ours["standard_error"]) == pytest.approx((wr, se))
    delta = np.array([len(r) - len(p) for p, r in zip(policy, reference, strict=True)], dtype=float)
    df = pd.DataFrame({"preference": y, "std_delta_len": delta / delta.std(ddof=1), "not_gamed_baseline": True})
    test = df[["not_gamed_baseline"]].assign(std_delta_len=0.0)
    train, x_test = glm.make_dmatrix_for_model(df, test, formula=glm.GLM_INFO["length_controlled_minimal"]["formula"])
    # alpaca_eval's fit, practically unregularised (C large, no CV): the same maximum-likelihood estimate
    model = glm.fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, n_splits=0, C=1e8)
    assert lc == pytest.approx(model.predict_proba(x_test)[:, 1].mean() * 100, abs=2e-3)
    # alpaca_eval's default (L1, C chosen by 5-fold cross-validation) regularises a little
    model = glm.fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, **glm.GLM_INFO[
        "length_controlled_minimal"]["kwargs"])
    assert lc == pytest.approx(model.predict_proba(x_test)[:, 1].mean() * 100, abs=1.0)


def test_both_orders_cancel_position_bias():
    instr, policy, reference = _answers(1)

    def sign(x: int) -> int:
        return (x > 0) - (x < 0)

    def biased(instruction: str, first: str, second: str) -> float:  # 0.15 in favour of whatever it reads first
        return 0.65 + 0.3 * sign(quality(first) - quality(second))

    with FakeJudge(biased) as judge:
        client = _client(judge)
        comparisons = winrate.compare_all(client, instr, policy, reference)
        client.close()
    d = [sign(quality(p) - quality(r)) for p, r in zip(policy, reference, strict=True)]
    assert 0 < d.count(1) < N and d.count(-1) > 0
    # policy second: 1 - (0.65 - 0.3 d) = 0.35 + 0.3 d; policy first: 0.65 + 0.3 d; the bias cancels in the mean
    assert [c.policy_second for c in comparisons] == pytest.approx([0.35 + 0.3 * x for x in d])
    assert [c.preference for c in comparisons] == pytest.approx([1.5 + 0.3 * x for x in d])
    assert winrate.first_position_rate(comparisons) == pytest.approx(0.65)

    with FakeJudge(lambda i, f, s: 1.0, logprobs=False) as judge:  # text only, always "m"
        client = _client(judge)
        comparisons = winrate.compare_all(client, instr, policy, reference)
        client.close()
    assert [c.preference for c in comparisons] == [1.5] * N
    assert winrate.win_rate([c.preference for c in comparisons]) == (50.0, 0.0)
    assert winrate.first_position_rate(comparisons) == 1.0


def test_refusals_are_counted_and_not_asked_again():
    """A reply that parses but names neither output, at temperature 0, would be the same again: it is counted and
    its prompt left out, never re-asked (it used to be asked max_retries + 1 times per order)."""
    instr, policy, reference = _answers(2)
    with FakeJudge(length_loving_judge, faults={instr[5]: ["garbage"] * 10}) as judge:
        client = _client(judge, max_retries=2)
        comparisons = winrate.compare_all(client, instr, policy, reference)
        client.close()
    assert [i for i, c in enumerate(comparisons) if not c.complete] == [5]
    assert comparisons[5].policy_second is None and comparisons[5].policy_first is None  # both orders refused
    report = client.report()
    assert report["judge_refused"] == 2 and report["judge_failed"] == 0 and report["judge_http_attempts"] == 2 * N
    assert judge.served["garbage"] == 2


@pytest.mark.parametrize(("fault", "status"), [
    ("401", "HTTP 401 (the API key was refused"), ("403", "HTTP 403"), ("400", "HTTP 400 (the request was refused"),
    ("html", "HTTP 200 but the reply is not a chat completion (text/html: '<html><body>Sign in"),
    ("truncated", "HTTP 200 but the reply is not JSON (application/json"),
    ("nochoices", "HTTP 200 but the reply is not a chat completion (application/json: a JSON object without"),
])
def test_a_refused_request_or_unusable_reply_is_bad_input_and_stops_at_once(fault, status):
    """A bad key, a bad request, a proxy's HTML page, truncated JSON or a reply without choices: bad input (exit 2
    through the stage), one line naming the endpoint and the HTTP status, never retried, and nothing more is asked."""
    instr, policy, reference = _answers(3)
    with FakeJudge(length_loving_judge, fault_all=fault) as judge:
        client = _client(judge, concurrency=1, max_retries=5)
        with pytest.raises(winrate.JudgeError) as exc:
            winrate.compare_all(client, instr, policy, reference)
        client.close()
    message = str(exc.value)
    assert message.startswith(f"judge {judge.url}: {status}"), message
    assert "\n" not in message and "retries" not in message
    assert len(judge.requests) == 1 and client.report()["judge_http_attempts"] == 1


def test_rate_limits_wait_as_retry_after_says_then_give_up_counted():
    """429 and 5xx are retried with the client's backoff, honouring Retry-After; a judgment still failing after the
    retries is lost and counted, and once more prompts are lost than allowed nothing more is asked."""
    instr, policy, reference = _answers(4)
    with FakeJudge(length_loving_judge, faults={instr[0]: ["429"]}, retry_after={"retry-after": "1"}) as judge:
        client = _client(judge, concurrency=1, max_retries=3)
        winrate.compare_all(client, instr[:1], policy[:1], reference[:1])
        client.close()
    first, second = judge.requests[:2]
    assert (first["fault"], second["fault"]) == ("429", "ok") and second["t"] - first["t"] >= 0.9
    with FakeJudge(length_loving_judge, fault_all="500") as judge:
        client = _client(judge, concurrency=1, max_retries=2)
        with pytest.raises(winrate.JudgeUnavailable) as exc:
            winrate.compare_all(client, instr, policy, reference, max_lost=1)
        client.close()
    # prompt 0 lost both orders, prompt 1 its first (3 attempts each), then it stopped: 9 requests, not 3 x 2N
    assert len(judge.requests) == 9 and client.report()["judge_failed"] == 3
    assert str(exc.value).startswith(f"judge {judge.url}: 2 prompts lost a judgment (HTTP 500), more than the 1 "
                                     "allowed; stopped asking after 3 of 80 judgments (9 requests: 0 rate-limited, "
                                     "9 server errors"), str(exc.value)


def test_judgments_are_cached_and_never_paid_twice(tmp_path):
    """Keyed by the judge, the template, the instruction and both outputs in the order shown: a second client on the
    same cache (a retry, a new attempt) asks nothing; another order or another judge model is asked."""
    from spa_workers.evalcache import JudgmentCache

    instr, policy, reference = _answers(5)
    with FakeJudge(length_loving_judge, faults={instr[7]: ["garbage"]}) as judge:
        settings = winrate.JudgeSettings(endpoint=judge.url, model="judge")
        client = winrate.JudgeClient(settings, JudgmentCache(str(tmp_path), settings.cache_name()))
        first = winrate.compare_all(client, instr, policy, reference)
        client.close()
        assert len(judge.requests) == 2 * N
        again = winrate.JudgeClient(settings, JudgmentCache(str(tmp_path), settings.cache_name()))
        second = winrate.compare_all(again, instr, policy, reference)
        again.close()
        assert len(judge.requests) == 2 * N and again.report()["judge_cached"] == 2 * N
        assert [c.preference for c in second if c.complete] == [c.preference for c in first if c.complete]
        assert not second[7].complete and again.report()["judge_refused"] == 1  # the refusal is kept too
        swapped = winrate.JudgeClient(settings, JudgmentCache(str(tmp_path), settings.cache_name()))
        winrate.compare_all(swapped, instr[:3], reference[:3], policy[:3])  # the other roles: other orders
        swapped.close()
        assert len(judge.requests) == 2 * N  # ... which were all asked already (both orders)
        other = winrate.JudgeSettings(endpoint=judge.url, model="another-judge")
        fresh = winrate.JudgeClient(other, JudgmentCache(str(tmp_path), other.cache_name()))
        winrate.compare_all(fresh, instr[:3], policy[:3], reference[:3])
        fresh.close()
        assert len(judge.requests) == 2 * N + 6


def _stage_argv(tmp_path, tiny_policy, judge: FakeJudge, *extra: str, n: int = 6) -> tuple[list[str], list[str]]:
    """(prompts, `spa-worker evaluate` argv): the tiny policy answers n prompts, reference answers from a file."""
    prompts = [f"What is {i} plus 1?" for i in range(n)]
    write_jsonl(str(tmp_path / "prompts.jsonl"), [{"prompt": p} for p in prompts])
    write_jsonl(str(tmp_path / "ref.jsonl"), [{"output": f"q5 The answer is {i + 1}."} for i in range(n)])
    argv = ["evaluate", "--policy", tiny_policy, "--reference", tiny_policy, "--output", str(tmp_path / "out"),
            "--winrate-prompts", str(tmp_path / "prompts.jsonl"), "--winrate-reference-answers",
            str(tmp_path / "ref.jsonl"), "--answer-backend", "transformers", "--answer-max-new-tokens", "8",
            "--judge-endpoint", judge.url, "--judge-model", "judge", *extra]
    return prompts, argv


SECRET = "sk-test-Zq8v1-DO-NOT-PRINT"


@pytest.mark.slow
def test_stage_end_to_end_reports_figures_and_never_the_key(tmp_path, tiny_policy, worker):
    def prefers_reference(instruction: str, first: str, second: str) -> float:
        return 0.8 if first.startswith("q5") else 0.2  # in either order

    with FakeJudge(prefers_reference, api_key=SECRET, faults={"What is 0 plus 1?": ["429"]}) as judge:
        prompts, argv = _stage_argv(tmp_path, tiny_policy, judge)
        proc = worker(*argv, env={contract.JUDGE_API_KEY_ENV: SECRET})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert all(r["auth"] == f"Bearer {SECRET}" for r in judge.requests)
    out = str(tmp_path / "out")
    manifest = json.loads(storage.read_text(storage.join(out, contract.MANIFEST)))
    assert manifest["metrics"][K.WIN_RATE] == pytest.approx(20.0)
    assert manifest["metrics"][K.WIN_RATE_SE] == pytest.approx(0.0)
    assert manifest["metrics"][K.FIRST_POSITION_RATE] == pytest.approx(0.5)
    assert K.LC_WIN_RATE in manifest["metrics"] and K.HELDOUT_AGREEMENT not in manifest["metrics"]
    assert manifest["counts"][K.WINRATE_PROMPTS] == 6 and manifest["counts"]["judge_rate_limited"] == 1
    rows = [json.loads(line) for line in Path(out, "winrate.jsonl").read_text().splitlines()]
    assert [r["prompt"][0]["content"] for r in rows] == prompts
    assert [r["preference"] for r in rows] == pytest.approx([1.2] * 6)
    texts = [proc.stdout, proc.stderr, *(p.read_text() for p in Path(out).rglob("*") if p.is_file())]
    assert len(texts) >= 4 and not any(SECRET in t for t in texts)




@pytest.mark.slow
def test_a_judge_failure_keeps_the_heldout_agreement_and_a_retry_pays_nothing_twice(tmp_path, tiny, tiny_policy,
                                                                                     worker):
    """Through `spa-worker evaluate`: a bad key is bad input (exit 2, one line naming the endpoint and HTTP 401, one
    request, no retries claimed) and the held-out agreement computed before it is kept in the run's cache; the next
    attempt reuses it and the policy's answers; an attempt after that asks the judge nothing (every judgment cached).
    Calls and tokens go to the manifest's counts and ledger."""
    cache = str(tmp_path / "cache")
    with FakeJudge(lambda i, f, s: 0.8 if f.startswith("q5") else 0.2, api_key=SECRET) as judge:
        _, argv = _stage_argv(tmp_path, tiny_policy, judge, "--heldout", tiny["heldout"], "--cache", cache)
        bad = worker(*argv, env={contract.JUDGE_API_KEY_ENV: "sk-wrong"})
        assert bad.returncode == 2, bad.stderr[-3000:]
        errors = [ln for ln in bad.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and errors[0].startswith(
            f"spa-worker evaluate: error: judge {judge.url}: HTTP 401 (the API key was refused"), bad.stderr[-2000:]
        assert " held-out agreement " in errors[0] and f"is kept in {cache}/heldout/" in errors[0]
        assert "retries" not in errors[0] and len(judge.requests) == 1
        agreement = float(errors[0].split(" held-out agreement ")[1].split()[0])

        good = worker(*argv, env={contract.JUDGE_API_KEY_ENV: SECRET})
        assert good.returncode == 0, good.stderr[-3000:]
        assert "held-out agreement from the run's cache" in good.stdout and "answers from the run's cache" in \
            good.stdout
        assert len(judge.requests) == 1 + 12
        manifest = contract.read_manifest(str(tmp_path / "out"))
        assert manifest.metrics[K.HELDOUT_AGREEMENT] == pytest.approx(agreement, abs=1e-4)
        assert manifest.metrics[K.WIN_RATE] == pytest.approx(20.0)
        assert manifest.counts[K.JUDGE_CALLS] == 12 and manifest.counts[K.JUDGE_CACHED] == 0
        assert manifest.ledger[contract.Ledger.JUDGE_CALLS] == 12
        assert manifest.ledger[contract.Ledger.JUDGE_PROMPT_TOKENS] == manifest.counts[K.JUDGE_PROMPT_TOKENS] > 12 * 100
        assert manifest.ledger[contract.Ledger.JUDGE_COMPLETION_TOKENS] == 12
        assert manifest.metrics[K.EVAL_ANSWER_TOKENS] > 0 and manifest.metrics[K.REFERENCE_ANSWER_TOKENS] > 0

        storage.delete_tree(str(tmp_path / "out"))  # a new attempt
        again = worker(*argv, env={contract.JUDGE_API_KEY_ENV: SECRET})
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(judge.requests) == 1 + 12  # nothing asked
        manifest = contract.read_manifest(str(tmp_path / "out"))
        assert manifest.counts[K.JUDGE_CACHED] == 12 and manifest.ledger.get(contract.Ledger.JUDGE_CALLS, 0) == 0
        assert manifest.metrics[K.WIN_RATE] == pytest.approx(20.0)
    texts = [bad.stderr, good.stdout, good.stderr, *(p.read_text() for p in Path(cache).rglob("*") if p.is_file())]
    assert not any(SECRET in t for t in texts)


@pytest.mark.slow
def test_reference_answers_are_sampled_once_per_run_and_lengths_recorded(tmp_path, tiny, tiny_policy, monkeypatch):
    """Without referenceAnswers the reference model (the SFT model) answered the prompts again in every
    iteration's evaluation. The run's cache keeps them: a second iteration's evaluate samples only its own policy.
    Its manifest records the mean answer lengths (tokens), the SFT model's being the reference's here."""
    from spa_workers import evaluate

    sampled: list[str] = []
    real = evaluate._sample
    monkeypatch.setattr(evaluate, "_sample", lambda model, prompts, args, work=None: sampled.append(model) or
                        real(model, prompts, args, work))
    write_jsonl(str(tmp_path / "prompts.jsonl"), [{"prompt": f"What is {i} plus 1?"} for i in range(4)])
    with FakeJudge(lambda i, f, s: 0.5) as judge:
        for n, policy in enumerate((tiny_policy, tiny["model"])):
            args = contract.EvaluateArgs(
                policy=policy, reference=tiny["model"], output=str(tmp_path / f"iter-{n}"),
                winrate_prompts=str(tmp_path / "prompts.jsonl"), answer_backend="transformers",
                answer_max_new_tokens=6, judge_endpoint=judge.url, judge_model="judge", cache=str(tmp_path / "cache"))
            assert evaluate.run(args) == 0
    # iteration 0: its policy and the reference; iteration 1, whose policy is the SFT model itself: nothing new
    assert sampled == [tiny_policy, tiny["model"]]
    metrics = contract.read_manifest(str(tmp_path / "iter-1")).metrics
    assert metrics[K.SFT_ANSWER_TOKENS] == metrics[K.REFERENCE_ANSWER_TOKENS] == metrics[K.EVAL_ANSWER_TOKENS] > 0


def _alpaca_eval_hub_cache(root: Path, rng: np.random.Generator) -> np.ndarray:
    """A Hugging Face Hub cache holding alpaca_eval's `df_gamed.csv` (tatsu-lab/alpaca_eval), as a pod with Hub
    access would have it after the download: the difficulty of each of the 805 instructions, and the annotations of
    the two length-gamed baselines its GLM is regularised towards. Synthetic figures, alpaca_eval's format."""
    snapshot = root / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (root / "datasets--tatsu-lab--alpaca_eval" / "refs").mkdir()
    (root / "datasets--tatsu-lab--alpaca_eval" / "refs" / "main").write_text("0" * 40)
    difficulty = rng.normal(0.0, 1.0, 805)
    lines = ["model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline"]
    for model, shift in (("gamed_verbose", 1.0), ("gamed_concise", -1.0)):
        for i in range(805):
            p = 1 / (1 + np.exp(-(0.5 * shift - difficulty[i])))
            lines.append(f"{model},{i},{p:.6f},{shift:.3f},{difficulty[i]:.6f},False")
    (snapshot / "df_gamed.csv").write_text("\n".join(lines) + "\n")
    return difficulty


def test_leaderboard_lc_is_alpaca_evals_length_controlled_v1(tmp_path, monkeypatch):
    """lengthControl alpacaEvalV1: the 805 AlpacaEval instructions are scored by alpaca_eval's own
    `length_controlled_v1` (its instruction-difficulty term included), which differs from the minimal GLM on the
    same annotations; without the Hub file, one line saying so."""
    import huggingface_hub.constants

    rng = np.random.default_rng(0)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "nothing"))
    with pytest.raises(contract.StageInputError, match=r"could not get df_gamed\.csv from the Hugging Face Hub"):
        winrate.leaderboard_lc_win_rate([1.5] * 805, ["a"] * 805, ["b"] * 805, list(range(805)))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    difficulty = _alpaca_eval_hub_cache(tmp_path / "hub", rng)
    policy = ["x" * int(rng.integers(50, 400)) for _ in range(805)]
    reference = ["y" * int(rng.integers(50, 400)) for _ in range(805)]
    delta = np.array([len(r) - len(p) for p, r in zip(policy, reference, strict=True)], dtype=float)
    prefs = list(1 + 1 / (1 + np.exp(-(0.3 - 1.2 * difficulty - 0.8 * np.tanh(delta / delta.std())))))
    lc, se = winrate.leaderboard_lc_win_rate(prefs, reference, policy, list(range(805)))
    minimal, _ = winrate.length_controlled_win_rate(prefs, [len(r) for r in reference], [len(p) for p in policy])
    # alpaca_eval's standard error for v1 is the spread of its per-instruction predictions (0 for the minimal GLM,
    # whose prediction is one number); the figures differ by the difficulty term and the regularisation
    assert 0 < lc < 100 and 0.1 < se < 5 and lc != pytest.approx(minimal, abs=0.05), (lc, se, minimal)


def test_length_control_by_hand():
    """Checks that need no library: equal answer lengths leave nothing to control for (LC = raw win rate, and the
    delta-method SE is the raw SE with ddof 0); all-win stays near 100; one prompt has no standard error."""
    prefs = [1.0, 2.0, 1.5, 2.0, 1.25, 2.0, 1.0, 1.75]
    n = len(prefs)
    wr, se = winrate.win_rate(prefs)
    lc, lc_se = winrate.length_controlled_win_rate(prefs, [10] * n, [10] * n)
    assert lc == pytest.approx(wr) and lc_se == pytest.approx(se * math.sqrt((n - 1) / n))
    # the same length gap everywhere is no length variation either
    assert winrate.length_controlled_win_rate(prefs, [30] * n, [10] * n)[0] == pytest.approx(wr)
    assert winrate.length_controlled_win_rate([2.0] * 3, [3, 5, 9], [4, 1, 2])[0] > 99.9
    assert math.isnan(winrate.win_rate([1.7])[1])
    # every preference the same with lengths far apart: an exact fit, whose covariance rounds to just below 0 (it
    # failed the stage with "math domain error")
    lc, lc_se = winrate.length_controlled_win_rate([1.8] * 4, [5] * 4, [60, 61, 58, 55])
    assert math.isfinite(lc) and lc_se == 0.0


@pytest.mark.parametrize(("change", "message"), [
    ({"--judge-endpoint": None}, "--winrate-prompts needs --judge-endpoint and --judge-model"),
    ({"--judge-extra-body": "{structured"}, "--judge-extra-body: not JSON"),
    ({"ref_rows": 2}, "ref.jsonl: 2 reference answers for 6 prompts (one row per prompt, in order)"),
    ({"ref_rows": [{"text": "x"}] * 6}, "ref.jsonl: row 1: missing string column answer (or output)"),
])
def test_bad_win_rate_input_fails_fast_with_one_line(change, message, tmp_path, worker):
    """Exit 2 (bad input, not retried) before any model is loaded; the line names the flag, file and row."""
    write_jsonl(str(tmp_path / "prompts.jsonl"), [{"prompt": f"q{i}"} for i in range(6)])
    rows = change.pop("ref_rows", 6)
    write_jsonl(str(tmp_path / "ref.jsonl"), rows if isinstance(rows, list) else [{"answer": "a"}] * rows)
    flags = {"--policy": "/nonexistent/policy", "--reference": "/nonexistent/ref", "--output": str(tmp_path / "o"),
             "--winrate-prompts": str(tmp_path / "prompts.jsonl"), "--winrate-reference-answers":
             str(tmp_path / "ref.jsonl"), "--judge-endpoint": "http://127.0.0.1:9/v1", "--judge-model": "j", **change}
    proc = worker("evaluate", *[x for k, v in flags.items() if v is not None for x in (k, v)])
    assert proc.returncode == contract.EXIT_BAD_INPUT, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
