"""The built-in tiny example: an arithmetic preference task and a random-weight tiny model, all made offline."""

from __future__ import annotations

import os
import random

from spa_workers.data import write_jsonl
from spa_workers.modeling import build_tiny_model


def _question(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} plus {b}?", a + b


def _pair(rng: random.Random) -> dict[str, str]:
    q, ans = _question(rng)
    wrong = ans + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
    return {"prompt": q, "chosen": f"The answer is {ans}.", "rejected": f"The answer is {wrong}."}


def make_tiny_example(out_dir: str, n_seed: int = 32, n_prompts: int = 64, n_heldout: int = 32,
                      seed: int = 0) -> dict[str, str]:
    """Write model/, seed.jsonl, prompts.jsonl and heldout.jsonl under `out_dir`; return their paths."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("seed", "prompts", "heldout")}
    seed_pairs = [_pair(rng) for _ in range(n_seed)]
    heldout = [_pair(rng) for _ in range(n_heldout)]
    prompts = [{"prompt": _question(rng)[0]} for _ in range(n_prompts)]
    write_jsonl(paths["seed"], seed_pairs)
    write_jsonl(paths["heldout"], heldout)
    write_jsonl(paths["prompts"], prompts)
    corpus = [f"{p['prompt']} {p['chosen']} {p['rejected']}" for p in seed_pairs + heldout]
    corpus += [p["prompt"] for p in prompts] + [str(i) for i in range(200)]
    paths["model"] = build_tiny_model(os.path.join(out_dir, "model"), corpus, seed=seed)
    return paths
