"""IFEval-style prompts for a small chat model, scored by IFEval's own checkers (the `if-verifiable` package).

A prompt = a short base task + 1-3 verifiable instructions whose text is the checker's own description
(`build_description`), so the checker that scores an answer is the one that wrote the instruction. Only checkers
that need no downloaded data are used (no sentence counting: it needs NLTK's punkt model), with arguments that fit
short answers (the benchmark samples at most a few dozen tokens). Conflicting pairs are never combined (IFEval's own
conflict table). Gold score of an answer = the fraction of its instructions followed, strict (IFEval's
instruction-level strict accuracy for that prompt).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from if_verifiable.common import evaluate_instructions
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, INSTRUCTION_DICT

TOPICS = [
    "the ocean", "a rainy day", "coffee", "your favorite book", "the moon", "a city park", "learning to cook",
    "winter", "a bicycle", "friendship", "tea", "a job interview", "recycling", "a mountain hike", "video games",
    "a birthday party", "the library", "a train journey", "gardening", "the night sky", "a new phone", "music",
    "a lazy Sunday", "the first day of school", "a market", "running", "a lighthouse", "homework", "a picnic",
    "the desert", "a museum", "snow", "a small town", "breakfast", "a dog", "a cat", "the sea breeze", "a river",
    "the internet", "a campfire", "an old photograph", "a thunderstorm", "the city at night", "a road trip",
]
# Tasks a short answer completes: with "a short paragraph", "a poem" or "a diary entry" SmolLM2 ran past 40 new
# tokens on 78% of its answers, and a cut answer fails "end with ..." or "P.S." whatever it would have done.
TASKS = [
    "Describe {t} in one sentence.", "Write a one-line story about {t}.", "Give a friend one short tip about {t}.",
    "Write a one-sentence advertisement for {t}.", "Write a two-line poem about {t}.",
    "Say in one sentence why people like {t}.", "Name one good thing about {t}, briefly.",
    "Write a short headline about {t}.",
]
WORDS = ["happy", "green", "light", "simple", "quiet", "warm", "bright", "small", "gentle", "fresh"]
END_PHRASES = ["Is there anything else I can help with?", "Any other questions?", "That is all."]

# instruction id -> its arguments, drawn from `rng` (None: the checker takes none)
ARGS: dict[str, Callable[[random.Random], dict | None]] = {
    "punctuation:no_comma": lambda r: None,
    "detectable_format:title": lambda r: None,
    "change_case:english_lowercase": lambda r: None,
    "change_case:english_capital": lambda r: None,
    "startend:quotation": lambda r: None,
    "length_constraints:number_words": lambda r: {"relation": "less than", "num_words": r.choice([20, 30, 40])},
    "detectable_content:postscript": lambda r: {"postscript_marker": "P.S."},
    "keywords:existence": lambda r: {"keywords": r.sample(WORDS, 2)},
    "keywords:forbidden_words": lambda r: {"forbidden_words": r.sample(["very", "really", "beautiful", "also"], 2)},
    "detectable_format:number_highlighted_sections": lambda r: {"num_highlights": 1},
    "detectable_format:number_bullet_lists": lambda r: {"num_bullets": r.choice([2, 3])},
    "detectable_content:number_placeholders": lambda r: {"num_placeholders": 1},
    "startend:end_checker": lambda r: {"end_phrase": r.choice(END_PHRASES)},
}


@dataclass(frozen=True)
class Prompt:
    text: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict, ...]

    def to_json(self) -> dict:
        return {"prompt": self.text, "instruction_id_list": list(self.instruction_ids), "kwargs": list(self.kwargs)}

    @classmethod
    def from_json(cls, row: dict) -> Prompt:
        return cls(row["prompt"], tuple(row["instruction_id_list"]), tuple(row["kwargs"]))


def make_prompt(rng: random.Random, allowed: list[str]) -> Prompt:
    k = rng.choices([1, 2, 3], weights=[2, 2, 1])[0]
    ids: list[str] = []
    for iid in rng.sample(allowed, len(allowed)):
        if len(ids) == k:
            break
        if not any(iid in INSTRUCTION_CONFLICTS[j] or j in INSTRUCTION_CONFLICTS[iid] for j in ids):
            ids.append(iid)
    texts, kwargs = [], []
    for iid in ids:
        kw = ARGS[iid](rng)
        checker = INSTRUCTION_DICT[iid](iid)
        texts.append(checker.build_description(**(kw or {})))
        kwargs.append(kw or {})
    task = rng.choice(TASKS).format(t=rng.choice(TOPICS))
    return Prompt(" ".join([task, *texts]), tuple(ids), tuple(kwargs))


def make_prompts(rng: random.Random, n: int, allowed: list[str], taken: set[str]) -> list[Prompt]:
    """n distinct prompts whose text is not in `taken` (which grows: sets drawn in turn are disjoint)."""
    out: list[Prompt] = []
    for _ in range(100 * n):
        if len(out) == n:
            return out
        p = make_prompt(rng, allowed)
        if p.text not in taken:
            taken.add(p.text)
            out.append(p)
    raise RuntimeError(f"could not draw {n} distinct prompts (got {len(out)}): add topics or tasks")


@dataclass
class Check:
    score: float  # fraction of instructions followed (strict)
    all_followed: bool  # prompt-level strict
    passed: int
    total: int
    per_instruction: dict[str, bool]


def check(p: Prompt, answer: str) -> Check:
    """IFEval's strict check of one answer (an empty answer follows nothing)."""
    results, _ = evaluate_instructions(answer, list(p.instruction_ids), list(p.kwargs), p.text, INSTRUCTION_DICT)
    follows = {iid: False for iid in p.instruction_ids}
    follows.update({r.instruction_id: r.strict_pass for r in results})
    passed = sum(follows.values())
    return Check(passed / len(follows), passed == len(follows), passed, len(follows), follows)
