"""Starting and stopping a vLLM engine the same way for generation and scoring.

vLLM is imported only inside the function: it spawns processes, so modules that use it must stay cheap and
side-effect free to import.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
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


# CPU engine modes. Where the CPU computes in bfloat16 natively, vLLM's own defaults (bfloat16, torch.compile, the
# engine in processes of its own) decode ~1.8x faster than float32 eager but start ~60 s later (issue 21's figures:
# 94 s against 34 s, 0.56x the decode speed): they pay off above ~14k generated tokens. Without native bfloat16 they
# decode slower than float32 (benchmarks/results/vllm_cpu_modes.md). Otherwise a stage takes the quick start:
# float32, eager, and the engine inside the stage's own process (no spawned process importing torch and vLLM again;
# under `spa run`'s warm start vLLM is already imported). Scoring always takes it: its log-probs must match the
# float32 transformers path, and one-token prompt scoring gains nothing from the engine's own process.
QUICK = "quick"  # float32, eager, in-process
DEFAULTS = "defaults"  # vLLM's: bfloat16, compiled, engine processes
QUICK_START_MAX_TOKENS = 14_000
SHUTDOWN_TIMEOUT_S = 1.0  # the work is done: vLLM's engine processes get this long to exit, not its default 5 s
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
BUILT: list[str] = []  # the modes of the engines this process built (the manifest's versions record them)


CPU_MODE_ENV = "SPA_VLLM_CPU_MODE"  # "quick" or "defaults": overrides the choice for generation (benchmarks)


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX). Without it vllm-cpu's bfloat16 matmuls
    fall back from oneDNN to plain torch ("Failed to create oneDNN linear") and decode slower than float32."""
    try:
        with open(cpuinfo) as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_mode(planned_tokens: int | None) -> str:
    """The CPU engine mode for a job of `planned_tokens` generated tokens (None: scoring, always quick).

    `planned_tokens` must not depend on sharding (the whole stage's prompts x answers x max new tokens), so every
    shard of a stage samples with the same numerics and a prompt's answers stay those of its seed (so must the CPU
    check: every shard of a stage runs on the same kind of node, or `SPA_VLLM_CPU_MODE` fixes the mode)."""
    if planned_tokens is None:
        return QUICK
    forced = os.environ.get(CPU_MODE_ENV, "").strip()
    if forced:
        if forced not in (QUICK, DEFAULTS):
            raise ValueError(f"{CPU_MODE_ENV}={forced!r}: expected {QUICK!r} or {DEFAULTS!r}")
        return forced
    return DEFAULTS if planned_tokens > QUICK_START_MAX_TOKENS and native_bf16() else QUICK


def engine_mode(planned_tokens: int | None = None) -> str:
    """What `engine` will build here, as recorded in manifests: "cuda bfloat16", "cpu float32 eager in-process", ..."""
    if best_device() == "cuda":
        return "cuda bfloat16"
    return "cpu float32 eager in-process" if cpu_mode(planned_tokens) == QUICK else "cpu bfloat16 compiled"


@contextlib.contextmanager
def engine(model_dir: str, max_model_len: int, seed: int = 0, tensor_parallel_size: int = 1,
           planned_tokens: int | None = None) -> Iterator[LLM]:
    """A vLLM engine for `model_dir`, shut down on exit so a second engine can take its memory.

    tensor_parallel_size: GPUs the engine splits the model over (the pod's GPUs; vLLM starts one worker per GPU).
    planned_tokens: tokens the whole stage will generate (None for scoring); on CPU it picks the mode (`cpu_mode`).

    bfloat16 on GPU; on CPU float32 and eager (quick start) or vLLM's defaults (see QUICK_START_MAX_TOKENS).
    """
    on_gpu = best_device() == "cuda"
    quick = not on_gpu and cpu_mode(planned_tokens) == QUICK
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

    BUILT.append(engine_mode(planned_tokens))
    print(f"vLLM engine: {BUILT[-1]} ({'scoring' if planned_tokens is None else f'{planned_tokens} planned tokens'})",
          file=sys.stderr, flush=True)
    with _in_process(quick):
        llm = LLM(model=model_dir, dtype="float32" if quick else "bfloat16", enforce_eager=quick,
                  max_model_len=max_model_len, seed=seed, tensor_parallel_size=tensor_parallel_size, **cpu_options)
    try:
        yield llm
    finally:
        # Dropping the last reference is not enough to stop the engine-core process promptly; its results are all in,
        # so it need not be waited for (vLLM's default wait is 5 s, which a CPU worker process always used up).
        llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
        del llm
        if quick:
            gc.unfreeze()  # an in-process engine freezes the heap once built; let its own garbage go
        gc.collect()


@contextlib.contextmanager
def _in_process(enabled: bool) -> Iterator[None]:
    """vLLM's engine core (and on CPU its worker) in this process while the engine is built, when `enabled`."""
    from vllm import envs

    forget_cached_env = getattr(envs, "disable_envs_cache", lambda: None)  # an in-process engine caches the env
    previous = os.environ.get(MULTIPROCESSING_ENV)
    if enabled:
        os.environ[MULTIPROCESSING_ENV] = "0"
    forget_cached_env()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MULTIPROCESSING_ENV, None)
        else:
            os.environ[MULTIPROCESSING_ENV] = previous
        forget_cached_env()
