"""Summed answer-token log-probabilities and the implicit DPO reward, shared by the judge and the evaluator.

r(x, y) = β·(log π(y|x) − log π_ref(y|x)), with log π(y|x) summed over the answer's tokens only. Sequences are
built by `modeling.encode_prompt_answer` (the train stage's prompt/answer boundary) and truncated as TRL does
(`keep_start` at `max_length`), so the judge scores exactly the tokens training later trains on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spa_workers.contract import WORK_SECONDS, Ledger, StageInputError
from spa_workers.modeling import Messages, best_device, encode_prompt, encode_prompt_answer, load_tokenizer

if TYPE_CHECKING:
    from spa_workers.runner import StageWork

BACKENDS = ("transformers", "vllm")
# Manifest count of (prompt, answer) items left unscored because the prompt is too long to train on.

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class Limits:
    max_length: int = 2048  # prompt + answer tokens, as TRL's max_length
    max_prompt_length: int = 1024
    # Padded tokens per forward pass (transformers backend); also bounds the logits: tokens × vocab × 4 bytes.
    max_batch_tokens: int = 8192
    tensor_parallel_size: int = 1  # vllm backend: GPUs one engine is split over
    timings: dict[str, float] | None = dataclasses.field(default=None, compare=False)  # gets the forward passes' time


@contextlib.contextmanager
def _timed(limits: Limits) -> Iterator[None]:
    """Add the block's seconds to the stage's work time (`contract.WORK_SECONDS`), if the caller keeps timings."""
    t0 = time.time()
    try:
        yield
    finally:
        if limits.timings is not None:
            limits.timings[WORK_SECONDS] = limits.timings.get(WORK_SECONDS, 0.0) + time.time() - t0


@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # prompt + answer, truncated
    answer_start: int  # ids[answer_start:] are the scored answer tokens


def encode_items(tokenizer, items: Sequence[tuple[Messages, str]], limits: Limits) -> list[Encoded | None]:
    """Token ids of each (prompt, answer); None where the prompt is too long (TRL would drop the example)."""
    out: list[Encoded | None] = []
    prompt_cache: dict[str, list[int]] = {}  # judge items share prompts: template each prompt once
    for messages, answer in items:
        key = repr(messages)
        if key not in prompt_cache:
            prompt_cache[key] = encode_prompt(tokenizer, messages)
        prompt_ids, answer_ids = encode_prompt_answer(tokenizer, messages, answer, prompt_cache[key])
        if len(prompt_ids) > limits.max_prompt_length or len(prompt_ids) >= limits.max_length:
            out.append(None)
            continue
        out.append(Encoded(ids=(prompt_ids + answer_ids)[: limits.max_length], answer_start=len(prompt_ids)))
    return out


def pack_batches(seqs: Sequence[Encoded], max_batch_tokens: int) -> list[list[int]]:
    """Indices of `seqs` grouped so that (rows × longest row) stays within `max_batch_tokens`.

    Longest first, so similar lengths share a batch (little padding) and an out-of-memory shows at once.
    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids), reverse=True)
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * len(seqs[batches[-1][0]].ids) <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def model_logprobs(model, seqs: Sequence[Encoded], max_batch_tokens: int,
                   progress: Progress | None = None) -> list[float]:
    """`sequence_logprobs` with a loaded transformers model: length-sorted, right-padded batches."""
    import torch

    device = model.device
    out = [0.0] * len(seqs)
    done = 0
    with torch.inference_mode():
        for batch in pack_batches(seqs, max_batch_tokens):
            width = max(len(seqs[i].ids) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)  # pad id irrelevant: masked, causal
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            answer_mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, i in enumerate(batch):  # right padding: positions match an unpadded forward exactly
                s = seqs[i]
                ids[row, : len(s.ids)] = torch.tensor(s.ids)
                attention[row, : len(s.ids)] = 1
                answer_mask[row, s.answer_start: len(s.ids)] = True
            ids, attention, answer_mask = ids.to(device), attention.to(device), answer_mask.to(device)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            targets = ids[:, 1:]
            # log_softmax at the target only: logit − logsumexp, without a second vocab-sized tensor.
            token_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            token_logp = token_logit - torch.logsumexp(logits, dim=-1)
            # Summed in float64: a reward is β times a small difference of two sums of hundreds of terms.
            sums = token_logp.masked_fill(~answer_mask[:, 1:], 0.0).double().sum(dim=-1).tolist()
            for row, i in enumerate(batch):
                out[i] = sums[row]
            done += len(batch)
            if progress:
                progress(done, len(seqs))
    return out


def _logprobs_transformers(model_uri: str, seqs: Sequence[Encoded], limits: Limits,
                           progress: Progress) -> list[float]:
    from spa_workers.modeling import load_model

    device = best_device()
    # float32 on CPU (bf16 is slow there, and tests check rewards to 1e-5); bf16 on GPU, as training runs.
    model = load_model(model_uri, dtype="bfloat16" if device == "cuda" else "float32", device=device)
    model.eval()
    with _timed(limits):
        return model_logprobs(model, seqs, limits.max_batch_tokens, progress)


# Scoring requests per vLLM call: large enough to keep the engine busy, small enough for a regular heartbeat.
_VLLM_CHUNK = 1024


def _logprobs_vllm(model_uri: str, seqs: Sequence[Encoded], limits: Limits,
                   progress: Progress) -> list[float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from spa_workers.modeling import resolve_model
    from spa_workers.vllm_engine import engine

    # One generated token is required; the score is the prompt log-probs of the answer positions.
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    out: list[float] = []
    with engine(resolve_model(model_uri), max_model_len=max(len(s.ids) for s in seqs) + 1,
                tensor_parallel_size=limits.tensor_parallel_size) as llm, _timed(limits):
        for start in range(0, len(seqs), _VLLM_CHUNK):
            chunk = seqs[start: start + _VLLM_CHUNK]
            prompts = [TokensPrompt(prompt_token_ids=s.ids) for s in chunk]
            for s, r in zip(chunk, llm.generate(prompts, params, use_tqdm=False), strict=True):
                # prompt_logprobs[t] holds log p(ids[t] | ids[:t]) (entry 0 is None).
                lp = r.prompt_logprobs
                out.append(sum(lp[t][s.ids[t]].logprob for t in range(s.answer_start, len(s.ids))))
            progress(len(out), len(seqs))
    return out


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise StageInputError(f"unknown scoring backend {backend!r} (expected {' or '.join(BACKENDS)})")


def sequence_logprobs(model_uri: str, seqs: Sequence[Encoded], limits: Limits, backend: str = "transformers",
                      progress: Progress | None = None) -> list[float]:
    """log π(answer | prompt) summed over answer tokens, for each sequence, under the model at `model_uri`."""
    check_backend(backend)
    if not seqs:
        return []
    run = _logprobs_vllm if backend == "vllm" else _logprobs_transformers
    return run(model_uri, seqs, limits, progress or (lambda done, total: None))


def implicit_rewards(policy: str, reference: str, items: Sequence[tuple[Messages, str]], beta: float,
                     limits: Limits, backend: str = "transformers",
                     progress: Progress | None = None, work: StageWork | None = None) -> list[float | None]:
    """β·(log π_policy − log π_reference) of each (prompt, answer); None where the prompt is too long.

    Models are loaded one after the other, so peak memory is one model. Both share the policy's tokenizer: the
    policy descends from the reference, and training tokenizes with it. `work` (a stage's) gets the tokens both
    forward passes take (the ledger's tokens scored) and the seconds they took, models loaded (its work time).
    """
    encoded = encode_items(load_tokenizer(policy), items, limits)
    keep = [i for i, e in enumerate(encoded) if e is not None]
    seqs = [encoded[i] for i in keep]
    if work is not None:
        work.spend(Ledger.TOKENS_SCORED, 2 * sum(len(s.ids) for s in seqs))  # each sequence through both models
        limits = dataclasses.replace(limits, timings=work.timings)
    report = progress or (lambda done, total: None)
    policy_lp = sequence_logprobs(policy, seqs, limits, backend, lambda d, t: report(d, 2 * t))
    reference_lp = sequence_logprobs(reference, seqs, limits, backend, lambda d, t: report(t + d, 2 * t))
    rewards: list[float | None] = [None] * len(items)
    for i, lp, ref in zip(keep, policy_lp, reference_lp, strict=True):
        rewards[i] = beta * (lp - ref)
    return rewards
