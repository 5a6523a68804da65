"""vLLM tensor parallelism: the stage args' tensor_parallel_size reaches the engine (a real TP > 1 engine needs GPUs;
benchmarks/gpu_train.py is the GPU check). vLLM itself is replaced by a recorder: these tests check our wiring."""

from __future__ import annotations

import contextlib
import os
import sys
import types
from typing import Any, ClassVar

import pytest
from spa_workers import generate, scoring, vllm_engine
from spa_workers.contract import GenerateArgs


class FakeLLM:
    made: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        # what vLLM would read from the environment now: its engine core in this process ("0") or its own
        FakeLLM.made.append({**kwargs, "in_process": os.environ.get(vllm_engine.MULTIPROCESSING_ENV) == "0"})
        self.stopped: float | None = None
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=self._stop))

    def _stop(self, timeout: float | None = None) -> None:
        self.stopped = timeout


@pytest.fixture()
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, lambda **kw: kw
    mod.envs = types.SimpleNamespace()
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    FakeLLM.made = []
    return FakeLLM


def test_engine_is_built_with_the_tensor_parallel_size(fake_vllm, monkeypatch):
    monkeypatch.delenv(vllm_engine.MULTIPROCESSING_ENV, raising=False)
    with vllm_engine.engine("/models/m", max_model_len=64, seed=3, tensor_parallel_size=4) as llm:
        assert fake_vllm.made == [{"model": "/models/m", "dtype": "float32", "enforce_eager": True,
                                   "max_model_len": 64, "seed": 3, "tensor_parallel_size": 4,
                                   # CPU: no chunked prefill (per-request seeds), a step that holds a whole prompt
                                   "enable_chunked_prefill": False, "max_num_batched_tokens": 2048,
                                   "in_process": True}]  # scoring: the quick start
    assert llm.stopped == vllm_engine.SHUTDOWN_TIMEOUT_S == 1.0  # the engine is done: vLLM's 5 s wait is not
    assert vllm_engine.MULTIPROCESSING_ENV not in os.environ  # only while the engine is built
    with vllm_engine.engine("/models/m", max_model_len=64):
        assert fake_vllm.made[-1]["tensor_parallel_size"] == 1


@pytest.mark.parametrize(("planned", "native", "dtype", "eager", "in_process"), [
    (vllm_engine.QUICK_START_MAX_TOKENS, True, "float32", True, True),  # small: starts in seconds
    (vllm_engine.QUICK_START_MAX_TOKENS + 1, True, "bfloat16", False, False),  # large: vLLM's defaults decode faster
    (vllm_engine.QUICK_START_MAX_TOKENS * 10, False, "float32", True, True),  # no native bfloat16: never
])
def test_cpu_engine_mode_follows_the_stage_size_and_the_cpu(fake_vllm, monkeypatch, planned, native, dtype, eager,
                                                             in_process):
    """Issue 21.3: float32 + eager everywhere on CPU started 60 s sooner than vLLM's defaults; where the CPU computes
    in bfloat16 natively the defaults decode faster. Without it (AVX2 only, as on this machine) their bfloat16
    matmuls fall back to plain torch and decode slower than float32 (benchmarks/results/vllm_cpu_modes.md)."""
    monkeypatch.delenv(vllm_engine.MULTIPROCESSING_ENV, raising=False)
    monkeypatch.delenv(vllm_engine.CPU_MODE_ENV, raising=False)
    monkeypatch.setattr(vllm_engine, "native_bf16", lambda: native)
    with vllm_engine.engine("/models/m", max_model_len=64, planned_tokens=planned):
        made = fake_vllm.made[-1]
        assert (made["dtype"], made["enforce_eager"], made["in_process"]) == (dtype, eager, in_process)
        assert not made["enable_chunked_prefill"]  # per-prompt seeds need it off in both modes
    assert vllm_engine.engine_mode(planned) == ("cpu float32 eager in-process" if eager else "cpu bfloat16 compiled")


def test_the_cpu_mode_can_be_fixed_and_a_wrong_value_is_named(monkeypatch):
    monkeypatch.setenv(vllm_engine.CPU_MODE_ENV, "defaults")
    assert vllm_engine.cpu_mode(10) == vllm_engine.DEFAULTS
    assert vllm_engine.cpu_mode(None) == vllm_engine.QUICK  # scoring always: its log-probs match float32
    monkeypatch.setenv(vllm_engine.CPU_MODE_ENV, "quick")
    assert vllm_engine.cpu_mode(10**9) == vllm_engine.QUICK
    monkeypatch.setenv(vllm_engine.CPU_MODE_ENV, "fast")
    with pytest.raises(ValueError, match="SPA_VLLM_CPU_MODE='fast'"):
        vllm_engine.cpu_mode(10)


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse2 avx2 fma", False),  # AVX2 only (this machine)
    ("fpu avx2 avx512f avx512_bf16", True),  # Cooper Lake, Zen 4
    ("fpu avx2 avx512f amx_bf16 amx_tile", True),  # Sapphire Rapids
])
def test_native_bf16_reads_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert vllm_engine.native_bf16(str(cpuinfo)) is native
    assert vllm_engine.native_bf16(str(tmp_path / "missing")) is False


def test_generate_plans_by_the_whole_stage_not_the_shard(tiny):
    """Every shard of a stage picks the same engine mode (so a prompt's answers never depend on sharding)."""
    sizes = set()
    for shard in range(3):
        args = GenerateArgs(policy="p", prompts=tiny["prompts"], output="o", slice_start=4, slice_end=-1,
                            shard_index=shard, shard_count=3, responses_per_prompt=2, max_new_tokens=100)
        selected, slice_size = generate.select_prompts(args)
        assert len(selected) == 20
        sizes.add(generate.planned_tokens(args, slice_size))
    assert sizes == {60 * 2 * 100}


class Built(Exception):
    pass


@pytest.fixture()
def engine_calls(monkeypatch, fake_vllm):
    calls: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def recorder(model_dir: str, max_model_len: int, seed: int = 0, tensor_parallel_size: int = 1,
                 planned_tokens: int | None = None):
        calls.append({"model_dir": model_dir, "tensor_parallel_size": tensor_parallel_size})
        raise Built
        yield  # pragma: no cover

    monkeypatch.setattr(vllm_engine, "engine", recorder)
    return calls


def test_generate_and_judge_pass_their_tensor_parallel_size(engine_calls, tmp_path):
    args = GenerateArgs(policy="p", prompts="x", output="o", tensor_parallel_size=2)
    with pytest.raises(Built), generate._vllm_sampler(args, types.SimpleNamespace(eos_token_id=0), "/m", 64):
        pass
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(Built):
        scoring._logprobs_vllm(str(tmp_path), [scoring.Encoded([1, 2, 3], 1)],
                               scoring.Limits(tensor_parallel_size=8), lambda done, total: None)
    assert [c["tensor_parallel_size"] for c in engine_calls] == [2, 8]
