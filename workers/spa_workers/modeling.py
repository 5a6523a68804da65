"""Model and tokenizer loading by URI, the prompt/answer token boundary, and the tiny offline model.

`encode_prompt_answer` is the one definition of how a (conversation, answer) becomes token ids: the judge,
the evaluator and the train stage's dataset all go through it, and it reproduces TRL's DPO tokenization
(chat template with generation prompt for the prompt; prompt + assistant turn for the full sequence; the answer
starts where the two diverge), which a test checks against TRL itself.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from spa_workers import storage
from spa_workers.contract import StageInputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Messages = list[dict[str, str]]


def cache_dir() -> str:
    return os.environ.get("SPA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spa")


def resolve_model(uri: str) -> str:
    """A local directory holding the HF-format model at `uri` (path, `s3://`, `hf://org/name[@revision]`).

    S3 models are downloaded once per cache (one pod, or every pod sharing a model-cache volume) into a folder keyed
    by URI and ETag: the processes of a pod that ask together wait for one download; `hf://` goes through the Hub's
    own cache.
    """
    if uri.startswith("hf://"):
        repo, _, revision = uri[len("hf://"):].partition("@")
        try:
            from huggingface_hub import snapshot_download

            return _fetched_copy(snapshot_download(repo_id=repo, revision=revision or None))
        except Exception as e:  # offline, unknown repo, auth: all mean "cannot get this model"
            raise StageInputError(f"model {uri}: not found or not downloadable ({type(e).__name__})") from None
    if storage.is_s3(uri):
        if not storage.exists(storage.join(uri, "config.json")):
            raise StageInputError(f"model {uri}: not found (no config.json)")
        key = hashlib.sha256(f"{uri}@{storage.etag(uri)}".encode()).hexdigest()[:24]
        return _fetched_copy(storage.fetch_once(os.path.join(cache_dir(), "models", key),
                                                lambda tmp: storage.download_dir(uri, tmp)))
    path = storage._local(uri)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise StageInputError(f"model {uri}: not found (no config.json)")
    if os.path.realpath(path) not in _fetched:  # a copy fetched above was counted as it was downloaded
        storage.count_local_tree_read(path)  # loaded from the storage folder itself: the ledger's bytes read
    return path


_fetched: set[str] = set()  # local copies of s3:// and hf:// models made by `resolve_model`


def _fetched_copy(path: str) -> str:
    _fetched.add(os.path.realpath(path))
    return path


def load_tokenizer(uri: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(uri))
    if tok.chat_template is None:
        raise StageInputError(f"model {uri}: tokenizer has no chat template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(uri: str, dtype: str = "float32", device: str | None = None) -> PreTrainedModel:
    """The causal LM at `uri` in `dtype`; "auto" = the dtype it is stored in on GPU (a bf16 7B model stays 14.5 GB,
    not 29), float32 on CPU (CPU bf16 matmuls are slow and the CPU runs are tiny)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype, None) or ("auto" if torch.cuda.is_available() else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(uri), dtype=torch_dtype)
    if device:
        model.to(device)
    return model


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Messages) -> list[int]:
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def encode_prompt_answer(tokenizer: PreTrainedTokenizerBase, prompt: Messages, answer: str,
                         prompt_ids: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) exactly as TRL's DPO trainer splits a conversational example."""
    if prompt_ids is None:
        prompt_ids = encode_prompt(tokenizer, prompt)
    full = list(tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=True,
                                              return_dict=True)["input_ids"])
    cut = _common_prefix(prompt_ids, full)
    return prompt_ids[:cut], full[cut:]


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def build_tiny_model(out_dir: str, corpus: list[str], vocab_size: int = 512, hidden_size: int = 128,
                     layers: int = 2, heads: int = 2, seed: int = 0) -> str:
    """A Llama-architecture model with random weights and a BPE tokenizer trained on `corpus`, saved HF-style.

    head_dim is hidden_size / heads = 64 by default: vLLM's CPU attention rejects smaller heads.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<pad>",
                                  bos_token=None, unk_token=None)
    tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      head_dim=hidden_size // heads, max_position_embeddings=1024, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
