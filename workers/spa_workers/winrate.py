"""Win rate against a reference, judged by an LLM over the OpenAI-compatible chat API, the AlpacaEval 2.0 way.

Annotator (alpaca_eval's `weighted_alpaca_eval_gpt4_turbo` conventions): the judge sees the instruction and two
outputs labelled with the model identifiers "m" (shown first) and "M" (shown second), answers with one identifier
in one token, and the preference is the probability mass it puts on each identifier among its top log-probs
(its text answer when the server returns no log-probs). Every prompt is judged in both orders, policy second and
policy first, and the two probabilities that the policy wins are averaged: position bias cancels.

Arithmetic (alpaca_eval's definitions): preferences in [1, 2], 2 = the policy (alpaca_eval's `output_2`) wins;
win rate = mean(preference − 1), standard error = its sample standard error (ddof 1), both in percent.
The length-controlled win rate fits alpaca_eval's GLM `length_controlled_minimal`,
    P(policy wins) = σ(θ_len · tanh(Δ / sd(Δ)) + θ_0),   Δ = len(reference answer) − len(policy answer) in characters,
by maximum likelihood on the soft preferences, then predicts at Δ = 0 (LC win rate; its standard error by the
delta method on a robust covariance, see `length_controlled_win_rate`). alpaca_eval's leaderboard GLM
(`length_controlled_v1`) adds a per-instruction difficulty term, learnt from its leaderboard's models on its 805
fixed instructions and downloaded from the Hub; a run's own prompt set has no such term, so the minimal GLM is the
one that applies. alpaca_eval fits it with
scikit-learn's L1 LogisticRegressionCV; this module fits the unregularised likelihood with Newton's method
(numpy only, in the worker image), and tests/test_winrate.py checks it against alpaca_eval's own fit on the same
annotations.

Client: the `openai` package (already a vLLM dependency in the worker image): its built-in retries with
exponential backoff cover timeouts, connection errors, 429 (honouring Retry-After) and 5xx; an httpx event hook
counts every attempt and response so retries are reported, not hidden. Answers that parse to neither identifier
are asked again up to `max_retries` times, then counted as failed. The API key is read from the environment and
handed to the client only: never printed, never in arguments or the manifest.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

FIRST, SECOND = "m", "M"  # alpaca_eval's model identifiers

SYSTEM = ("You are a highly efficient assistant, who evaluates and selects the best large language model based on "
          "the quality of their responses to a given instruction.")
USER = """I will give you an instruction given to two models and the output of each. Select the model whose output \
is best from a human perspective.

## Instruction

{instruction}

## Model outputs

Model identifier "m":
\"\"\"{first}\"\"\"

Model identifier "M":
\"\"\"{second}\"\"\"

## Task

Evaluate the quality and relevance of the outputs and answer with the identifier of the best model, and nothing \
else: m or M.

## Best model identifier"""


def messages_for(instruction: str, first: str, second: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER.format(instruction=instruction, first=first, second=second)}]


def first_wins_probability(choice: object) -> float | None:
    """P(the output shown first wins) from one chat completion choice; None when it names neither identifier.

    With log-probs: exp(logp(m)) / (exp(logp(m)) + exp(logp(M))) over the first token's top log-probs, a missing
    identifier having probability 0 (alpaca_eval's `logprob_parser`, not binarised). Without: the text answer.
    """
    logprobs = getattr(choice, "logprobs", None)
    content = getattr(logprobs, "content", None) if logprobs is not None else None
    if content:
        top = {t.token.strip(): t.logprob for t in (content[0].top_logprobs or [])
               if t.token.strip() in (FIRST, SECOND)}
        if top:
            p_first = math.exp(top.get(FIRST, -math.inf))
            p_second = math.exp(top.get(SECOND, -math.inf))
            if p_first + p_second > 0:
                return p_first / (p_first + p_second)
    text = (getattr(getattr(choice, "message", None), "content", None) or "").strip().strip("\"'`.")
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


class JudgeClient:
    """Asks the judge which of two outputs is better; counts every HTTP attempt, rate limit and failure."""

    def __init__(self, settings: JudgeSettings) -> None:
        import httpx
        import openai

        self.settings = settings
        self.counts: Counter[str] = Counter()
        self.last_error = ""  # why the latest judgment was given up (no secret in it: status code or error type)
        self._lock = threading.Lock()
        http = openai.DefaultHttpxClient(
            limits=httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency),
            event_hooks={"request": [self._on_request], "response": [self._on_response]})
        # A local server (vLLM) needs no key; the client requires a non-empty string anyway.
        self.client = openai.OpenAI(base_url=settings.endpoint, api_key=settings.api_key or "none",
                                    max_retries=settings.max_retries, timeout=settings.timeout_s, http_client=http)

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

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

    def first_wins(self, instruction: str, first: str, second: str) -> float | None:
        """P(first output wins), or None once the retries are spent (the failure is counted, never dropped)."""
        import openai

        for _ in range(self.settings.max_retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.settings.model, messages=messages_for(instruction, first, second),  # type: ignore[arg-type]
                    max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5,
                    extra_body=self.settings.extra_body)
            except openai.APIStatusError as e:
                # The client already retried 408/409/429/5xx; what is left is not worth asking again.
                return self._give_up(f"HTTP {e.status_code}")
            except (openai.APITimeoutError, openai.APIConnectionError) as e:  # after the client's retries
                return self._give_up(type(e).__name__)
            if reply.choices:
                p = first_wins_probability(reply.choices[0])
                if p is not None:
                    return p
            self._count("judge_unparseable")
        return self._give_up("unparseable answers")

    def _give_up(self, why: str) -> None:
        self._count("judge_failed")
        self.last_error = why

    def report(self) -> dict[str, int]:
        """Every retry-worthy event, by kind: attempts, 429s, 5xx, 4xx, attempts that got no response (timeouts,
        refused connections), unparseable answers, and judgments given up."""
        c = self.counts
        keys = ("judge_http_attempts", "judge_rate_limited", "judge_server_errors", "judge_client_errors",
                "judge_unparseable", "judge_failed")
        return {**{k: c[k] for k in keys}, "judge_no_response": c["judge_http_attempts"] - c["judge_http_responses"]}

    def close(self) -> None:
        self.client.close()


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
                progress: Callable[[int, int], None] | None = None) -> list[Comparison]:
    """Judge every (reference, policy) answer pair in both orders, `concurrency` requests at a time."""
    jobs = [(i, swapped) for i in range(len(instructions)) for swapped in (False, True)]
    done = 0
    lock = threading.Lock()

    def one(job: tuple[int, bool]) -> float | None:
        nonlocal done
        i, policy_first = job
        if policy_first:
            result = client.first_wins(instructions[i], policy[i], reference[i])
        else:
            p_first = client.first_wins(instructions[i], reference[i], policy[i])
            result = None if p_first is None else 1.0 - p_first
        with lock:
            done += 1
            if progress:
                progress(done, len(jobs))
        return result

    with ThreadPoolExecutor(max_workers=client.settings.concurrency) as pool:
        results = list(pool.map(one, jobs))
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
    return lc * 100, lc * (1 - lc) * math.sqrt(cov[-1, -1]) * 100
