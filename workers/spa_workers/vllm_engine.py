"""Starting and stopping a vLLM engine the same way for generation and scoring.

vLLM is imported only inside the function: it spawns processes, so modules that use it must stay cheap and
side-effect free to import.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import TYPE_CHECKING

from spa_workers.modeling import best_device

if TYPE_CHECKING:
    from vllm import LLM


@contextlib.contextmanager
def engine(model_dir: str, max_model_len: int, seed: int = 0, tensor_parallel_size: int = 1) -> Iterator[LLM]:
    """A vLLM engine for `model_dir`, shut down on exit so a second engine can take its memory.

    tensor_parallel_size: GPUs the engine splits the model over (the pod's GPUs; vLLM starts one worker per GPU).

    float32 on CPU (scores must match the float32 transformers path), bfloat16 on GPU. On CPU the engine runs
    eagerly: torch.compile nearly doubled engine construction on the 2-core test machine (51 s vs 28 s) and
    sampled no faster.
    """
    from vllm import LLM

    on_gpu = best_device() == "cuda"
    llm = LLM(model=model_dir, dtype="bfloat16" if on_gpu else "float32", enforce_eager=not on_gpu,
              max_model_len=max_model_len, seed=seed, tensor_parallel_size=tensor_parallel_size)
    try:
        yield llm
    finally:
        # Dropping the last reference is not enough to stop the engine-core process promptly.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
