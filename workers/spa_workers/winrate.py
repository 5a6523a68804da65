"""Win rate against a reference, judged by an LLM over the OpenAI-compatible chat API, the AlpacaEval 2.0 way.

Annotator: alpaca_eval's own `weighted_alpaca_eval_gpt4_turbo`, read from the installed `alpaca_eval` package (its
configs.yaml names the prompt template, `alpaca_eval_clf.txt`, and the parser's arguments): the judge sees the
instruction and two outputs labelled with the model identifiers "m" (shown first, alpaca_eval's output_1) and "M"
(output_2), answers with one identifier in one token, and alpaca_eval's `logprob_parser` turns the top log-probs of
that token into the preference (not binarised); a server that returns no log-probs is read from its text answer.
The prompt is built by alpaca_eval's `make_prompts` and `prompt_to_chatml`, as alpaca_eval sends it to chat models.
Every prompt is judged in both orders, policy second and policy first, and the two probabilities that the policy
wins are averaged: position bias cancels. alpaca_eval samples this annotator at temperature 1 with the preference
from the log-probs, which do not depend on the temperature; we ask at temperature 0, which changes only a text-only
server's answer (deterministic, so a refusal is never asked again).

Arithmetic (alpaca_eval's definitions): preferences in [1, 2], 2 = the policy (alpaca_eval's `output_2`) wins;
win rate = mean(preference − 1), the mean probability that the judge prefers the policy's answer, standard error =
its sample standard error (ddof 1), both in percent. The length-controlled win rate fits alpaca_eval's GLM
`length_controlled_minimal`,
    P(policy wins) = σ(θ_len · tanh(Δ / sd(Δ)) + θ_0),   Δ = len(reference answer) − len(policy answer) in characters,
by maximum likelihood on the soft preferences, then predicts at Δ = 0 (LC win rate; its standard error by the
delta method on a robust covariance, see `length_controlled_win_rate`). alpaca_eval fits it with scikit-learn's L1
LogisticRegressionCV; this module fits the unregularised likelihood with Newton's method, and tests/test_winrate.py
checks it against alpaca_eval's own fit on the same annotations. Such a figure is labelled "LC (minimal GLM), not
comparable with the leaderboard". The leaderboard's GLM (`length_controlled_v1`) adds a per-instruction difficulty
term learnt from its leaderboard's models on its 805 fixed instructions (downloaded from the Hugging Face Hub by
alpaca_eval): with `lengthControl: alpacaEvalV1` (the 805 AlpacaEval instructions, in order), alpaca_eval computes
it (`leaderboard_lc_win_rate`).

Client: the `openai` package: its built-in retries with exponential backoff cover timeouts, connection errors, 429
(honouring Retry-After) and 5xx; an httpx event hook counts every attempt and response so retries are reported,
not hidden. A request the judge refuses (400, 401, 403, 404, 422, any 4xx but 408/409/429) or a reply that is not a
chat completion (an HTML page from a proxy, truncated JSON, no choices) is bad input (`JudgeError`, exit 2): asking
again cannot help. A reply that parses but names neither output is a refusal: counted, not asked again. Judgments
given up after the client's retries are counted; once more prompts are lost than the stage allows, the remaining
ones are not asked (`JudgeUnavailable`, retryable). The API key is read from the environment and handed to the
client only: never printed, never in arguments or the manifest.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spa_workers.contract import JUDGE_API_KEY_ENV, StageInputError, StageRetryableError
from spa_workers.evalcache import JudgmentCache, key_of

FIRST, SECOND = "m", "M"  # alpaca_eval's model identifiers
ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
RETRIED_STATUSES = (408, 409, 429)  # 4xx the client retries (with 5xx); any other 4xx is the request's fault


class JudgeError(StageInputError):
    """The judge refused the request (key, model, request) or answered with something that is not a chat completion:
    asking again cannot help (exit 2)."""


class JudgeUnavailable(StageRetryableError):
    """More judgments were lost (after the client's retries) than the stage allows: retryable (exit 1)."""


@dataclass(frozen=True)
class Annotator:
    name: str
    template: str  # alpaca_eval's prompt template, placeholders {instruction}, {output_1}, {output_2}
    parser_kwargs: dict[str, Any]  # alpaca_eval's logprob_parser arguments
    max_tokens: int
    top_logprobs: int

    @property
    def version(self) -> str:
        """What identifies the prompts and parsing (a judgment cached under another is not reused)."""
        return key_of(self.name, self.template, self.parser_kwargs)


@functools.cache
def annotator() -> Annotator:
    """alpaca_eval's `weighted_alpaca_eval_gpt4_turbo` annotator, read from the installed package's files."""
    import yaml

    spec = importlib.util.find_spec("alpaca_eval")  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise StageInputError("the win rate needs the alpaca_eval package (pip install 'spa-operator[worker]')")
    configs = Path(spec.origin).parent / "evaluators_configs"
    config = yaml.safe_load((configs / ANNOTATOR / "configs.yaml").read_text())[ANNOTATOR]
    kwargs = config["completions_kwargs"]
    return Annotator(ANNOTATOR, (configs / config["prompt_template"]).read_text(),
                     dict(config["completion_parser_kwargs"]), int(kwargs["max_tokens"]), int(kwargs["top_logprobs"]))


def messages_for(instruction: str, first: str, second: str) -> list[dict[str, str]]:
    """The chat messages alpaca_eval sends for one comparison (output_1 = `first`, shown as "m")."""
    import pandas as pd
    from alpaca_eval import utils

    row = pd.DataFrame([{"instruction": instruction, "output_1": first, "output_2": second}])
    prompt = utils.make_prompts(row, annotator().template)[0][0]
    return utils.prompt_to_chatml(prompt)


def first_wins_probability(choice: dict[str, Any]) -> float | None:
    """P(the output shown first wins) from one chat completion choice (as a dict); None when it names neither
    identifier (a refusal). With log-probs: alpaca_eval's `logprob_parser` (exp(logp(m)) / (exp(logp(m)) +
    exp(logp(M))) over the first token's top log-probs, a missing identifier having probability 0). Without: the
    text answer."""
    logprobs = choice.get("logprobs") or {}
    if logprobs.get("content") and all("top_logprobs" in c for c in logprobs["content"]):
        from alpaca_eval.completion_parsers import logprob_parser

        preference = logprob_parser(choice, **annotator().parser_kwargs)[0]  # in [1, 2]; 1: the first wins
        if not math.isnan(preference):
            return 2.0 - float(preference)
    text = ((choice.get("message") or {}).get("content") or "").strip().strip("\"'`.")
    return {FIRST: 1.0, SECOND: 0.0}.get(text)


@dataclass
class JudgeSettings:
    endpoint: str  # base URL of the OpenAI-compatible API, e.g. http://judge:8000/v1
    model: str
    api_key: str | None = None
    concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 60.0
    extra_body: dict | None = None  # server-specific request fields (e.g. vLLM's structured_outputs)

    def cache_name(self) -> str:
        """The judgment cache's folder for this judge: model, annotator and request fields."""
        return key_of(self.model, annotator().version, self.extra_body)[:16]


def judge_settings(endpoint: str, model: str, extra_body_json: str | None, **kw: float | int) -> JudgeSettings:
    """The judge as the evaluate and validate stages reach it (the key from the environment, never an argument)."""
    try:
        extra_body = json.loads(extra_body_json) if extra_body_json else None
    except json.JSONDecodeError as e:
        raise StageInputError(f"--judge-extra-body: not JSON: {e}") from None
    if extra_body is not None and not isinstance(extra_body, dict):
        raise StageInputError("--judge-extra-body: must be a JSON object")
    return JudgeSettings(endpoint=endpoint, model=model, extra_body=extra_body,
                         api_key=os.environ.get(JUDGE_API_KEY_ENV) or None, **kw)  # type: ignore[arg-type]


class JudgeClient:
    """Asks the judge which of two outputs is better; counts every HTTP attempt, rate limit, refusal, failure, call
    and token, and keeps every verdict in `cache` (when given) so that it is never paid for twice."""

    def __init__(self, settings: JudgeSettings, cache: JudgmentCache | None = None) -> None:
        import httpx
        import openai

        self.settings = settings
        self.cache = cache
        self.counts: Counter[str] = Counter()
        self.last_error = ""  # why the latest judgment was given up (no secret in it: status code or error type)
        self._lock = threading.Lock()
        http = openai.DefaultHttpxClient(
            limits=httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency),
            event_hooks={"request": [self._on_request], "response": [self._on_response]})
        # A local server (vLLM) needs no key; the client requires a non-empty string anyway.
        self.client = openai.OpenAI(base_url=settings.endpoint, api_key=settings.api_key or "none",
                                    max_retries=settings.max_retries, timeout=settings.timeout_s, http_client=http)

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[key] += amount

    def _on_request(self, request) -> None:
        self._count("judge_http_attempts")

    def _on_response(self, response) -> None:
        self._count("judge_http_responses")
        if response.status_code == 429:
            self._count("judge_rate_limited")
        elif response.status_code >= 500:
            self._count("judge_server_errors")
        elif response.status_code >= 400:
            self._count("judge_client_errors")

    def _redact(self, text: str) -> str:
        key = self.settings.api_key
        return text.replace(key, "***") if key else text

    def ask(self, messages: list[dict[str, str]], max_tokens: int, logprobs: bool) -> dict[str, Any]:
        """One chat completion's first choice (a dict); JudgeError for a refused request or an unusable reply,
        openai's APIStatusError/APITimeoutError/APIConnectionError once its retries are spent."""
        import openai
        from openai.types.chat import ChatCompletion

        where = f"judge {self.settings.endpoint}"
        extra = {"logprobs": True, "top_logprobs": annotator().top_logprobs} if logprobs else {}
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.settings.model, messages=messages, max_tokens=max_tokens,  # type: ignore[arg-type]
                temperature=0.0, extra_body=self.settings.extra_body, **extra)
        except openai.APIStatusError as e:
            if 400 <= e.status_code < 500 and e.status_code not in RETRIED_STATUSES:
                raise JudgeError(f"{where}: HTTP {e.status_code} ({_why(e.status_code)}), not retried: "
                                 f"{self._redact(_error_text(e))[:200]}") from None
            raise
        try:
            reply = raw.parse()
        except ValueError as e:  # truncated or malformed JSON
            raise JudgeError(f"{where}: HTTP {raw.status_code} but the reply is not JSON "
                             f"({raw.headers.get('content-type', 'no content type')}: {e}); is the endpoint an "
                             "OpenAI-compatible chat API (…/v1)?") from None
        if not isinstance(reply, ChatCompletion) or not reply.choices or reply.choices[0].message is None:
            what = repr(self._redact(reply)[:80]) if isinstance(reply, str) else "a JSON object without choices"
            raise JudgeError(f"{where}: HTTP {raw.status_code} but the reply is not a chat completion "
                             f"({raw.headers.get('content-type', 'no content type')}: {what}); a proxy or login page? "
                             "check spec.evaluation.winRate.judge.endpoint")
        self._count("judge_calls")
        if reply.usage is not None:
            self._count("judge_prompt_tokens", int(reply.usage.prompt_tokens or 0))
            self._count("judge_completion_tokens", int(reply.usage.completion_tokens or 0))
        return reply.choices[0].model_dump()

    def first_wins(self, instruction: str, first: str, second: str) -> float | None:
        """P(first output wins); None for a refusal (counted, cached) or once the client's retries are spent
        (counted as failed). JudgeError propagates: the judge refused the request or its reply is unusable."""
        import openai

        key = key_of(instruction, first, second)
        if self.cache is not None:
            found, value = self.cache.get(key)
            if found:
                self._count("judge_cached")
                if value is None:
                    self._count("judge_refused")
                return value
        try:
            choice = self.ask(messages_for(instruction, first, second), annotator().max_tokens, logprobs=True)
        except openai.APIStatusError as e:  # 408/409/429/5xx after the client's retries
            return self._give_up(f"HTTP {e.status_code}")
        except (openai.APITimeoutError, openai.APIConnectionError) as e:  # after the client's retries
            return self._give_up(type(e).__name__)
        p = first_wins_probability(choice)
        if p is None:  # it parsed, but names neither output: at temperature 0 it would say the same again
            self._count("judge_refused")
            self.last_error = "the judge answered with neither identifier"
        if self.cache is not None:
            self.cache.put(key, p)
        return p

    def _give_up(self, why: str) -> None:
        self._count("judge_failed")
        self.last_error = why

    def report(self) -> dict[str, int]:
        """Every retry-worthy event, by kind: attempts, 429s, 5xx, 4xx, attempts that got no response (timeouts,
        refused connections), refusals, judgments given up, judgments from the cache; calls answered and the
        tokens their `usage` reports."""
        c = self.counts
        keys = ("judge_http_attempts", "judge_rate_limited", "judge_server_errors", "judge_client_errors",
                "judge_refused", "judge_failed", "judge_cached", "judge_calls", "judge_prompt_tokens",
                "judge_completion_tokens")
        return {**{k: c[k] for k in keys}, "judge_no_response": c["judge_http_attempts"] - c["judge_http_responses"]}

    def close(self) -> None:
        if self.cache is not None:
            self.cache.flush()
        self.client.close()


def _why(status: int) -> str:
    return {400: "the request was refused: check judge.model and judge.extraBody",
            401: "the API key was refused: SPA_JUDGE_API_KEY, or judge.secretRef on a cluster",
            403: "the API key may not use this model or endpoint",
            404: "no such endpoint or model: check judge.endpoint (…/v1) and judge.model",
            422: "the request was refused: check judge.model and judge.extraBody"}.get(status, "refused")


def _error_text(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return str(message)
    return str(getattr(e, "message", "") or e)


def probe(settings: JudgeSettings) -> str:
    """One small request with the key, as the validate stage sends it: returns what answered; JudgeError for a
    refused request or an unusable reply, JudgeUnavailable when the endpoint cannot be reached."""
    import openai

    client = JudgeClient(settings)
    try:
        client.ask(messages_for("Say which output is the letter a.", "a", "b"), annotator().max_tokens,
                   logprobs=True)
    except openai.APIStatusError as e:
        raise JudgeUnavailable(f"judge {settings.endpoint}: HTTP {e.status_code} after {settings.max_retries} "
                               "retries") from None
    except (openai.APITimeoutError, openai.APIConnectionError) as e:
        raise JudgeUnavailable(f"judge {settings.endpoint}: unreachable ({type(e).__name__}) after "
                               f"{settings.max_retries} retries") from None
    finally:
        client.close()
    return f"judge {settings.endpoint} ({settings.model}) answers"


@dataclass(frozen=True)
class Comparison:
    """One prompt judged in both orders. `preference` is alpaca_eval's: 1 = reference wins, 2 = policy wins."""

    policy_second: float | None  # P(policy wins) with the reference shown first ("m") and the policy second
    policy_first: float | None  # P(policy wins) with the policy shown first

    @property
    def complete(self) -> bool:
        return self.policy_second is not None and self.policy_first is not None

    @property
    def preference(self) -> float:
        return 1.0 + (self.policy_second + self.policy_first) / 2  # type: ignore[operator]


def compare_all(client: JudgeClient, instructions: Sequence[str], policy: Sequence[str], reference: Sequence[str],
                progress: Callable[[int, int], None] | None = None,
                max_lost: int | None = None) -> list[Comparison]:
    """Judge every (reference, policy) answer pair in both orders, `concurrency` requests at a time.

    A JudgeError (bad key, refused request, unusable reply) stops the rest at once; once more than `max_lost`
    prompts have lost a judgment (given up or refused), the rest are not asked either (JudgeUnavailable)."""
    jobs = [(i, swapped) for i in range(len(instructions)) for swapped in (False, True)]
    done = 0
    lost: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def one(job: tuple[int, bool]) -> float | None:
        nonlocal done
        if stop.is_set():
            return None
        i, policy_first = job
        try:
            if policy_first:
                result = client.first_wins(instructions[i], policy[i], reference[i])
            else:
                p_first = client.first_wins(instructions[i], reference[i], policy[i])
                result = None if p_first is None else 1.0 - p_first
        except BaseException:
            stop.set()
            raise
        with lock:
            done += 1
            if result is None:
                lost.add(i)
                if max_lost is not None and len(lost) > max_lost:
                    stop.set()
            if progress:
                progress(done, len(jobs))
        return result

    # the first judgment alone: a refused key or an unusable reply costs one request, not `concurrency`
    results = [one(jobs[0])] if jobs else []
    with ThreadPoolExecutor(max_workers=client.settings.concurrency) as pool:
        futures = [pool.submit(one, job) for job in jobs[1:]]
        for f in futures:
            results.append(f.result())  # the first JudgeError is raised here; `stop` keeps the rest from asking
    if max_lost is not None and len(lost) > max_lost:
        c = client.report()
        raise JudgeUnavailable(
            f"judge {client.settings.endpoint}: {len(lost)} prompts lost a judgment ({client.last_error}), more "
            f"than the {max_lost} allowed; stopped asking after {done} of {len(jobs)} judgments ("
            f"{c['judge_http_attempts']} requests: {c['judge_rate_limited']} rate-limited, {c['judge_server_errors']} "
            f"server errors, {c['judge_no_response']} without a response; {c['judge_refused']} refusals)")
    return [Comparison(policy_second=results[2 * i], policy_first=results[2 * i + 1])
            for i in range(len(instructions))]


def first_position_rate(comparisons: Sequence[Comparison]) -> float:
    """How often the judge prefers whichever output it sees first (0.5 = no position bias)."""
    firsts = [p for c in comparisons if c.complete
              for p in (1.0 - c.policy_second, c.policy_first)]  # type: ignore[operator]
    return float(np.mean(firsts)) if firsts else math.nan


def _sem(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def win_rate(preferences: Sequence[float]) -> tuple[float, float]:
    """(win rate, standard error) in percent, from alpaca_eval preferences in [1, 2]."""
    p = np.asarray(preferences, dtype=float) - 1.0
    return float(p.mean() * 100), _sem(p) * 100


def _fit_logistic(x: np.ndarray, y: np.ndarray, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood logistic regression on soft labels y in [0, 1] (Newton's method, no implicit intercept).

    Returns the coefficients and their robust (sandwich) covariance, which holds for soft labels too.
    """
    theta = np.zeros(x.shape[1])
    # a tiny ridge keeps the Hessian invertible when the preferences are (nearly) separable
    ridge = 1e-9 * np.eye(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge
        step = np.linalg.solve(hess, x.T @ (y - p))
        theta += np.clip(step, -5.0, 5.0)
        if np.max(np.abs(step)) < 1e-10:
            break
    p = 1.0 / (1.0 + np.exp(-(x @ theta)))
    bread = np.linalg.inv((x * (p * (1 - p))[:, None]).T @ x + ridge)
    scores = x * (y - p)[:, None]
    return theta, bread @ (scores.T @ scores) @ bread


def length_controlled_win_rate(preferences: Sequence[float], reference_lengths: Sequence[int],
                               policy_lengths: Sequence[int]) -> tuple[float, float]:
    """(LC win rate, standard error) in percent: alpaca_eval's `length_controlled_minimal` GLM at zero length gap.

    The prediction at Δ = 0 is σ(θ_0) for every prompt, so alpaca_eval's `lc_standard_error` (the spread of the
    per-prompt predictions) would be 0 here; the standard error reported is the delta method's on θ_0 instead.
    """
    y = np.asarray(preferences, dtype=float) - 1.0
    delta = np.asarray(reference_lengths, dtype=float) - np.asarray(policy_lengths, dtype=float)
    sd = delta.std(ddof=1) if len(delta) > 1 else 0.0
    ones = np.ones_like(delta)
    # equal length gaps everywhere leave nothing to control for: the intercept alone is the raw win rate
    x = np.column_stack([np.tanh(delta / sd), ones]) if sd > 0 else ones[:, None]
    theta, cov = _fit_logistic(x, y)
    lc = 1.0 / (1.0 + math.exp(-theta[-1]))
    # the robust covariance of an exact fit (every preference the same) is 0 up to rounding, which may be below it
    return lc * 100, lc * (1 - lc) * math.sqrt(max(cov[-1, -1], 0.0)) * 100


def leaderboard_lc_win_rate(preferences: Sequence[float], reference: Sequence[str], policy: Sequence[str],
                            instruction_indices: Sequence[int]) -> tuple[float, float]:
    """(LC win rate, standard error) in percent by alpaca_eval's leaderboard GLM `length_controlled_v1`, computed by
    alpaca_eval itself: instruction k must be AlpacaEval's k-th instruction (its difficulty term is learnt per
    instruction on its leaderboard's models; alpaca_eval downloads it, `df_gamed.csv`, from the Hugging Face Hub)."""
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate

    df = pd.DataFrame({"index": list(instruction_indices), "output_1": list(reference), "output_2": list(policy),
                       "preference": list(preferences), "generator_1": "reference", "generator_2": "policy",
                       "annotator": ANNOTATOR})
    try:
        metrics = get_length_controlled_winrate(df, glm_name="length_controlled_v1", save_weights_dir=None,
                                                is_add_glm_preference_inplace=False)
    except OSError as e:  # huggingface_hub's errors for a file it cannot download or find in its cache
        raise StageInputError(f"lengthControl alpacaEvalV1: alpaca_eval could not get df_gamed.csv from the Hugging "
                              f"Face Hub (tatsu-lab/alpaca_eval) nor its cache ({type(e).__name__}); give the pod "
                              "Hub access or fill HF_HOME's cache with it") from None
    return float(metrics["length_controlled_winrate"]), float(metrics["lc_standard_error"])
