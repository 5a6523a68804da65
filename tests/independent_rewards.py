"""An independent implicit-reward computation for tests: one plain forward pass per sequence, log_softmax
over the full logits, nothing from `spa_workers.scoring`. Only the prompt/answer token boundary is shared
(modeling's `encode_prompt_answer`, itself checked against TRL): it defines what "the answer's tokens" are."""

from __future__ import annotations

import torch
from spa_workers.modeling import encode_prompt_answer
from transformers import AutoModelForCausalLM, AutoTokenizer


def answer_logprobs(model_dir: str, tokenizer_dir: str, items: list[tuple[list[dict], str]],
                    max_length: int | None = None) -> list[float]:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for messages, answer in items:
        prompt_ids, answer_ids = encode_prompt_answer(tok, messages, answer)
        ids = (prompt_ids + answer_ids)[:max_length]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        out.append(sum(logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids))))
    return out


def rewards(policy: str, reference: str, items: list[tuple[list[dict], str]], beta: float,
            max_length: int | None = None) -> list[float]:
    """β·(log π_policy(y|x) − log π_reference(y|x)) for each (messages, answer)."""
    pol = answer_logprobs(policy, policy, items, max_length)
    ref = answer_logprobs(reference, policy, items, max_length)
    return [beta * (p - r) for p, r in zip(pol, ref, strict=True)]
