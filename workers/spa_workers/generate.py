"""generate: the policy samples `responses_per_prompt` answers for its slice (and shard) of the prompt set.

Output `responses.jsonl`, one row per prompt: {"prompt_index": global index in the prompt file,
"prompt": messages, "responses": [str, ...]}. Each prompt's sampling seed derives from (seed,
prompt_index), so with the vLLM backend a prompt's answers do not depend on how prompts were sharded or
batched. The transformers backend seeds each batch (torch's generate has one RNG per call), so its
answers depend on batch size and sharding.

Heavy libraries (torch, transformers, vLLM) are imported inside functions: vLLM spawns processes that
re-import the main module, and bad-input errors should come back before a model is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from spa_workers import contract
from spa_workers.contract import GenerateArgs, Ledger, ManifestKeys, StageInputError
from spa_workers.data import load_prompts, write_jsonl
from spa_workers.modeling import Messages, best_device, encode_prompt, load_tokenizer, resolve_model
from spa_workers.runner import StageWork, run_stage

BACKENDS = ("vllm", "transformers")
# Prompts per vLLM call: enough to keep continuous batching full, few enough for a regular heartbeat.
VLLM_CHUNK = 512

Answer = tuple[str, int]  # (text, generated tokens including the stop token)


def shard_part(total: int, index: int, count: int) -> range:
    """Shard `index` of `count` over `total` items: contiguous, sizes differ by at most one."""
    return range(total * index // count, total * (index + 1) // count)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """A 31-bit seed for one prompt, a function of the run seed and the prompt's global index only."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def select_prompts(args: GenerateArgs) -> tuple[list[tuple[int, Messages]], int]:
    """(global index, messages) of the prompts this shard generates for (slice, then contiguous shard part), and
    the number of prompts in the whole slice."""
    prompts = load_prompts(args.prompts)
    end = len(prompts) if args.slice_end < 0 else min(args.slice_end, len(prompts))
    start = max(args.slice_start, 0)
    if start >= end:
        raise StageInputError(f"{args.prompts}: slice [{args.slice_start}, {args.slice_end}) selects no "
                              f"prompts (the file has {len(prompts)})")
    if args.slice_end > len(prompts):  # silently taking fewer prompts would change the run's schedule
        raise StageInputError(f"{args.prompts}: slice [{args.slice_start}, {args.slice_end}) needs "
                              f"{args.slice_end} prompts but the file has {len(prompts)}")
    if not 0 <= args.shard_index < args.shard_count:
        raise StageInputError(f"shard index {args.shard_index} is outside 0..{args.shard_count - 1}")
    part = shard_part(end - start, args.shard_index, args.shard_count)
    return [(start + i, prompts[start + i]) for i in part], end - start


def context_limit(model_dir: str) -> int | None:
    """The model's maximum sequence length from its config, when it declares one."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
        limit = json.load(fh).get("max_position_embeddings")
    return int(limit) if limit else None


def finish(tokenizer, ids: list[int], eos_ids: set[int]) -> Answer:
    """Cut a sampled sequence after its first stop token; decode it without special tokens."""
    for k, t in enumerate(ids):
        if t in eos_ids:
            ids = ids[: k + 1]
            break
    return tokenizer.decode(ids, skip_special_tokens=True), len(ids)


class Sampler(NamedTuple):
    # [(prompt index, prompt ids)] -> n answers for each prompt
    sample: Callable[[list[tuple[int, list[int]]]], list[list[Answer]]]
    chunk: int  # prompts per call


@contextlib.contextmanager
def _vllm_sampler(args: GenerateArgs, tokenizer, model_dir: str, max_model_len: int,
                  planned_tokens: int | None = None) -> Iterator[Sampler]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from spa_workers.vllm_engine import engine

    eos = {tokenizer.eos_token_id}

    def sample(batch: list[tuple[int, list[int]]]) -> list[list[Answer]]:
        # top_k=0: sample from temperature and top_p only, whatever the model's generation_config suggests.
        params = [SamplingParams(n=args.responses_per_prompt, temperature=args.temperature, top_p=args.top_p,
                                 top_k=0, max_tokens=args.max_new_tokens, seed=prompt_seed(args.seed, index),
                                 detokenize=False) for index, _ in batch]
        prompts = [TokensPrompt(prompt_token_ids=ids) for _, ids in batch]
        results = llm.generate(prompts, params, use_tqdm=False)
        return [[finish(tokenizer, list(o.token_ids), eos) for o in r.outputs] for r in results]

    with engine(model_dir, max_model_len=max_model_len, seed=args.seed,
                tensor_parallel_size=args.tensor_parallel_size, planned_tokens=planned_tokens) as llm:
        yield Sampler(sample, VLLM_CHUNK)


@contextlib.contextmanager
def _transformers_sampler(args: GenerateArgs, tokenizer, model_dir: str, max_model_len: int,
                          planned_tokens: int | None = None) -> Iterator[Sampler]:
    import torch

    from spa_workers.modeling import load_model

    device = best_device()
    model = load_model(model_dir, dtype="bfloat16" if device == "cuda" else "float32", device=device)
    model.eval()
    configured = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    n = args.responses_per_prompt
    sampling = ({"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0}
                if args.temperature > 0 else {"do_sample": False})

    def sample(batch: list[tuple[int, list[int]]]) -> list[list[Answer]]:
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, ids) in enumerate(batch):  # left padding: every row's answer starts at column `width`
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        torch.manual_seed(prompt_seed(args.seed, batch[0][0]))
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=args.max_new_tokens, num_return_sequences=n,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        new = out[:, width:].tolist()  # rows are grouped by prompt: prompt0 × n, prompt1 × n, ...
        return [[finish(tokenizer, new[p * n + k], eos) for k in range(n)] for p in range(len(batch))]

    yield Sampler(sample, args.batch_size)


# Each takes (args, tokenizer, model dir, max model length, planned tokens); only vLLM sizes its engine by the last
# two (the longest sequence; the tokens the whole stage may generate, which picks its CPU mode).
SAMPLERS = {"vllm": _vllm_sampler, "transformers": _transformers_sampler}


def planned_tokens(args: GenerateArgs, prompts: int) -> int:
    """The most tokens the whole stage (every shard) can generate for its `prompts` prompts."""
    return prompts * args.responses_per_prompt * args.max_new_tokens


def _body(work: StageWork) -> None:
    args: GenerateArgs = work.args  # type: ignore[assignment]  # shard index resolved by the runner
    if args.backend not in SAMPLERS:
        raise StageInputError(f"unknown generation backend {args.backend!r} "
                              f"(expected {' or '.join(BACKENDS)})")
    selected, slice_size = select_prompts(args)
    t0 = time.time()
    model_dir = resolve_model(args.policy)
    tokenizer = load_tokenizer(model_dir)
    limit = context_limit(model_dir)
    encoded = [(index, messages, encode_prompt(tokenizer, messages)) for index, messages in selected]
    # A prompt that leaves no room for max_new_tokens within the model's context cannot be answered in full.
    fits = [e for e in encoded if limit is None or len(e[2]) + args.max_new_tokens <= limit]
    work.counts[ManifestKeys.SKIPPED_LONG_PROMPTS] = len(encoded) - len(fits)
    rows: list[dict] = []
    tokens = 0
    gen_s = 0.0
    if fits:
        max_model_len = max(len(e[2]) for e in fits) + args.max_new_tokens
        planned = planned_tokens(args, slice_size)
        with SAMPLERS[args.backend](args, tokenizer, model_dir, max_model_len, planned) as sampler:
            work.timings["load_s"] = time.time() - t0
            t1 = time.time()
            for start in range(0, len(fits), sampler.chunk):
                chunk = fits[start: start + sampler.chunk]
                answers = sampler.sample([(index, ids) for index, _, ids in chunk])
                for (index, messages, _), per_prompt in zip(chunk, answers, strict=True):
                    rows.append({"prompt_index": index, "prompt": messages,
                                 "responses": [t for t, _ in per_prompt]})
                    tokens += sum(k for _, k in per_prompt)
                elapsed = time.time() - t1
                work.progress(len(rows), len(fits), unit="prompts",
                              tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0)
            gen_s = time.time() - t1
    write_jsonl(os.path.join(work.dir, contract.RESPONSES_FILE), rows)
    work.counts[ManifestKeys.PROMPTS] = len(rows)
    work.counts[ManifestKeys.RESPONSES] = sum(len(r["responses"]) for r in rows)
    work.counts[ManifestKeys.GENERATED_TOKENS] = tokens
    work.timings["generate_s"] = work.timings[contract.WORK_SECONDS] = gen_s
    if rows:  # the sampling model's answer length, watched for drift across iterations
        work.metrics[ManifestKeys.ANSWER_TOKENS] = tokens / work.counts[ManifestKeys.RESPONSES]
    work.spend(Ledger.PROMPTS, len(rows))
    work.spend(Ledger.ANSWERS_GENERATED, work.counts[ManifestKeys.RESPONSES])
    work.spend(Ledger.TOKENS_GENERATED, tokens)
    if gen_s > 0:
        work.metrics[ManifestKeys.TOKENS_PER_S] = tokens / gen_s


def run(args: GenerateArgs) -> int:
    return run_stage(args, _body)
