"""Starting and stopping a vLLM engine the same way for generation and scoring.

vLLM is imported only inside the function: it spawns processes, so modules that use it must stay cheap and
side-effect free to import.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from spa_workers.modeling import best_device

if TYPE_CHECKING:
    from vllm import LLM

KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
CPU_STEP_TOKENS = 2048  # tokens per engine step on CPU when prompts are shorter than that


def cpu_kv_cache_gib(fraction: float = 0.25, cap_gib: int = 16) -> int:
    """KV cache for vLLM on CPU, in GiB: a quarter of the memory available now, at least 1, at most `cap_gib`.

    Unset, vllm-cpu asks for most of the machine's memory and fails on an ordinary workstation; the model's
    weights and the other stage processes need the rest.
    """
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages: a floor
    with contextlib.suppress(OSError, ValueError, KeyError):  # Linux: MemAvailable also counts reclaimable page cache
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    return max(1, min(cap_gib, int(available * fraction / 2**30)))


@contextlib.contextmanager
def engine(model_dir: str, max_model_len: int, seed: int = 0, tensor_parallel_size: int = 1) -> Iterator[LLM]:
    """A vLLM engine for `model_dir`, shut down on exit so a second engine can take its memory.

    tensor_parallel_size: GPUs the engine splits the model over (the pod's GPUs; vLLM starts one worker per GPU).

    float32 on CPU (scores must match the float32 transformers path), bfloat16 on GPU. On CPU the engine runs
    eagerly: torch.compile nearly doubled engine construction on the 2-core test machine (51 s vs 28 s) and
    sampled no faster.
    """
    on_gpu = best_device() == "cuda"
    cpu_options: dict[str, object] = {}
    if not on_gpu:
        os.environ.setdefault(KVCACHE_ENV, str(cpu_kv_cache_gib()))
        # Per-request seeds use one torch generator per request; when chunked prefill splits a prompt, vLLM
        # rewinds that generator's offset, which CPU generators do not support ("CPU Generator does not use
        # offset" once 40 seeded prompts of ordinary length share a step). Without chunked prefill no prompt is
        # split (the step budget must then hold the longest sequence), and per-prompt seeds keep working.
        cpu_options = {"enable_chunked_prefill": False,
                       "max_num_batched_tokens": max(max_model_len, CPU_STEP_TOKENS)}
    from vllm import LLM

    llm = LLM(model=model_dir, dtype="bfloat16" if on_gpu else "float32", enforce_eager=not on_gpu,
              max_model_len=max_model_len, seed=seed, tensor_parallel_size=tensor_parallel_size, **cpu_options)
    try:
        yield llm
    finally:
        # Dropping the last reference is not enough to stop the engine-core process promptly.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
