"""Stage benchmarks on this machine (CPU, tiny model): prints a table and saves it under benchmarks/results/.

    python benchmarks/stages.py [--only generate,judge,train]

- generation tokens/s, vLLM backend vs transformers backend (aim >= 5x)
- judge pairs/s, batched length-sorted scoring vs a naive per-answer loop (aim >= 10x)
- train step time with the SPA loss at lambda = 0 and lambda > 0 vs plain DPO (aim <= 1.10x and <= 1.35x)

Ratios are measured in one run on one machine; absolute times on a shared 2-core box are noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gen_judge import bench_generate, bench_judge  # noqa: E402
from bench_train import bench_train  # noqa: E402

BENCHES = {"generate": bench_generate, "judge": bench_judge, "train": bench_train}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


def render(rows: list[dict]) -> str:
    lines = ["| benchmark | variant | value | unit | ratio |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = r.get("ratio", r.get("ratio_vs_plain"))
        ratio_text = "" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| {r['benchmark']} | {r['variant']} | {r['value']:.3f} | {r['unit']} | {ratio_text} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of: " + ", ".join(BENCHES))
    p.add_argument("--out", default=str(HERE / "results" / "stages.md"))
    args = p.parse_args()
    rows: list[dict] = []
    for name in args.only.split(","):
        rows += BENCHES[name.strip()]()
    table = render(rows)
    header = (f"# Stage benchmarks\n\nMeasured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {machine()}.\n"
              f"Command: `python benchmarks/stages.py --only {args.only}`\n\n")
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + table + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
