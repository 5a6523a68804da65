"""vLLM tensor parallelism: the stage args' tensor_parallel_size reaches the engine (a real TP > 1 engine needs GPUs;
benchmarks/gpu_train.py is the GPU check). vLLM itself is replaced by a recorder: these tests check our wiring."""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, ClassVar

import pytest
from spa_workers import generate, scoring, vllm_engine
from spa_workers.contract import GenerateArgs


class FakeLLM:
    made: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        FakeLLM.made.append(kwargs)
        self.stopped = False
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=self._stop))

    def _stop(self) -> None:
        self.stopped = True


@pytest.fixture()
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, lambda **kw: kw
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    FakeLLM.made = []
    return FakeLLM


def test_engine_is_built_with_the_tensor_parallel_size(fake_vllm):
    with vllm_engine.engine("/models/m", max_model_len=64, seed=3, tensor_parallel_size=4) as llm:
        assert fake_vllm.made == [{"model": "/models/m", "dtype": "float32", "enforce_eager": True,
                                   "max_model_len": 64, "seed": 3, "tensor_parallel_size": 4,
                                   # CPU: no chunked prefill (per-request seeds), a step that holds a whole prompt
                                   "enable_chunked_prefill": False, "max_num_batched_tokens": 2048}]
    assert llm.stopped
    with vllm_engine.engine("/models/m", max_model_len=64):
        assert fake_vllm.made[-1]["tensor_parallel_size"] == 1


class Built(Exception):
    pass


@pytest.fixture()
def engine_calls(monkeypatch, fake_vllm):
    calls: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def recorder(model_dir: str, max_model_len: int, seed: int = 0, tensor_parallel_size: int = 1):
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
