"""Host memory of loading a bf16 model into 2 ranks, with and without FSDP's CPU-RAM-efficient loading (README,
"Host memory"): how much resident memory `from_pretrained` adds on each rank, and whether the rank got weights.

    python benchmarks/load_memory.py      # ~1 minute on 2 cores; writes benchmarks/results/load_memory.md

Each rank runs what the train stage runs to load a model under `accelerate launch --use_fsdp` (accelerate's
PartialState on gloo, then `AutoModelForCausalLM.from_pretrained` in the stored dtype, as on a GPU), with
FSDP_CPU_RAM_EFFICIENT_LOADING true and false. The model: a random Llama of 335 M parameters stored in bf16.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RANK_SCRIPT = """
import sys, psutil, torch
from accelerate import PartialState
state = PartialState(cpu=True)
from transformers import AutoModelForCausalLM
before = psutil.Process().memory_info().rss
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
added = psutil.Process().memory_info().rss - before
loaded = bool(next(model.parameters()).abs().sum() > 0)
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(f"RANK {state.process_index} {size} {added} {loaded}", flush=True)
state.wait_for_everyone()
"""


def build(model_dir: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                      num_attention_heads=8, num_key_value_heads=8)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)


def measure(model_dir: str, script: str, efficient: bool, port: int) -> list[tuple[int, int, int, bool]]:
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": str(efficient).lower(),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), script, model_dir], env=env, capture_output=True, text=True, timeout=600)
    rows = re.findall(r"RANK (\d) (\d+) (-?\d+) (True|False)", out.stdout)
    if out.returncode != 0 or len(rows) != 2:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
    return sorted((int(r), int(s), int(a), flag == "True") for r, s, a, flag in rows)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="load-memory-") as work:
        model_dir, script = os.path.join(work, "model"), os.path.join(work, "rank.py")
        Path(script).write_text(RANK_SCRIPT)
        build(model_dir)
        lines = ["# Host memory of loading a bf16 model on 2 ranks", "",
                 "`python benchmarks/load_memory.py`: a 335 M-parameter Llama stored in bf16, loaded by each of 2 "
                 "gloo ranks as the train stage loads it under FSDP; resident memory `from_pretrained` added.", "",
                 "| CPU-RAM-efficient loading | rank | model (bf16) | resident memory added | weights |",
                 "| --- | --- | --- | --- | --- |"]
        for efficient, port in ((True, 29611), (False, 29612)):
            for rank, size, added, loaded in measure(model_dir, script, efficient, port):
                lines.append(f"| {'on' if efficient else 'off'} | {rank} | {size / 2**20:.0f} MiB | "
                             f"{added / 2**20:.0f} MiB | {'loaded' if loaded else 'zeros'} |")
    lines += ["", "Without it every rank memory-maps the safetensors file (the page cache holds one copy per node "
              "and nothing is resident until used); with it the other ranks get zero-filled tensors of the whole "
              "model, resident until the model is sharded.", ""]
    text = "\n".join(lines)
    out = REPO / "benchmarks" / "results" / "load_memory.md"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
