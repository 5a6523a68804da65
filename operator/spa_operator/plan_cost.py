"""What a manifest will cost, before it runs (`spa plan`): the stages, gold labels, prompts, answers, tokens and
pairs the plan implies (bounds where the outcome decides: answers end before maxNewTokens, the judge drops prompts),
and, given an earlier run of the same model (`--rates-from RUN_ROOT`), the tokens, pairs, GPU-hours and CPU-hours
its measured rates give."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from spa_workers import contract, storage
from spa_workers.contract import Ledger, StageInputError

from spa_operator import ledger
from spa_operator.ledger import Cost
from spa_operator.spec import AlignmentRunSpec

# kind -> the ledger key its cost scales with (evaluate and validate cost the same every time: per stage)
SCALES_WITH = {contract.GENERATE: Ledger.TOKENS_GENERATED, contract.JUDGE: Ledger.TOKENS_SCORED,
               contract.TRAIN: Ledger.PAIRS_TRAINED, contract.SEED_TRAIN: Ledger.PAIRS_TRAINED}


@dataclass
class Rates:
    """An earlier run's figures per stage kind: its summed ledger and how many stages of the kind it ran."""

    root: str
    by_kind: dict[str, Cost] = field(default_factory=dict)
    stages: Counter[str] = field(default_factory=Counter)

    def ratio(self, kind: str, key: str, per: str) -> float | None:
        cost = self.by_kind.get(kind)
        if cost is None or not cost.get(per):
            return None
        return cost.get(key) / cost.get(per)

    def per_stage(self, kind: str, key: str) -> float | None:
        cost = self.by_kind.get(kind)
        return cost.get(key) / self.stages[kind] if cost is not None and self.stages[kind] else None


def rates_from(root: str) -> Rates:
    """The ledgers of every finished stage under a run root (`iter-XX/<stage>/`, shards summed)."""
    rates = Rates(root.rstrip("/"))
    parts: dict[str, list[Cost]] = {}
    for it in storage.list_dirs(root):
        if not os.path.basename(it.rstrip("/")).startswith("iter-"):
            continue
        for stage_dir in storage.list_dirs(it):
            kind = os.path.basename(stage_dir.rstrip("/"))
            shards = [d for d in storage.list_dirs(stage_dir) if os.path.basename(d).startswith("shard-")]
            found = [m for m in (contract.read_manifest(d) for d in (shards or [stage_dir])) if m is not None]
            if kind in contract.STAGES and found and (not shards or len(found) == len(shards)):
                parts.setdefault(kind, []).append(ledger.of_manifests(found))
    if not any(c.amounts for cs in parts.values() for c in cs):
        raise StageInputError(f"--rates-from {root}: no stage manifests with a ledger found (the root of a run "
                              "made by spa run or the operator, e.g. <storage>/<namespace>/<name>)")
    for kind, costs in parts.items():
        rates.by_kind[kind] = ledger.sum_ledgers(costs)
        rates.stages[kind] = len(costs)
    return rates


@dataclass(frozen=True)
class Line:
    label: str
    value: str
    note: str = ""


def _n(x: float) -> str:
    return f"{x:,.0f}"


def expected(spec: AlignmentRunSpec, kinds: Sequence[str], gold: Mapping[str, int | None],
             rates: Rates | None = None) -> list[Line]:
    """The plan's expected totals. `kinds`: the stage kind of every planned stage; `gold`: rows of the seed and
    held-out files (None where not counted here, e.g. not local)."""
    g, t = spec.generation, spec.training
    prompts = sum(spec.iterations.per_iteration())
    answers = prompts * g.responses_per_prompt
    count = Counter(kinds)
    lines = [Line("stages", str(len(kinds)), ", ".join(f"{n} {k}" for k, n in count.items()))]
    seed, held = gold.get("seed"), gold.get("heldout")
    labels = None if seed is None or (spec.data.heldout and held is None) else seed + (held or 0)
    lines.append(Line("gold labels", "?" if labels is None else _n(labels),
                      f"seed {'?' if seed is None else _n(seed)}" + (f" + held-out {'?' if held is None else _n(held)}"
                                                                     if spec.data.heldout else "")))
    lines.append(Line("prompts, answers", f"{_n(prompts)}, {_n(answers)}",
                      f"{g.responses_per_prompt} answers per prompt"))
    seed_pairs = (seed or 0) * t.seed_epochs
    pairs_bound = seed_pairs + prompts * t.epochs_per_iteration
    units: dict[str, float] = {contract.SEED_TRAIN: seed_pairs}
    per_answer = rates.ratio(contract.GENERATE, Ledger.TOKENS_GENERATED, Ledger.ANSWERS_GENERATED) if rates else None
    if per_answer is None:
        lines.append(Line("tokens generated", f"at most {_n(answers * g.max_new_tokens)}",
                          f"{_n(answers)} answers x maxNewTokens {g.max_new_tokens}"))
        lines.append(Line("pairs judged", f"at most {_n(prompts)}", "one per prompt; identical or empty answers "
                                                                     "are dropped"))
        lines.append(Line("pairs trained", f"at most {_n(pairs_bound)}",
                          f"seed {'?' if seed is None else _n(seed)} x {t.seed_epochs:g} epochs + "
                          f"{_n(prompts)} x {t.epochs_per_iteration:g}"))
        return lines
    assert rates is not None
    tokens = answers * min(per_answer, g.max_new_tokens)
    # the share of prompts the judge kept (its pairs over the prompts generate answered); all, without a judge
    judged = rates.by_kind.get(contract.JUDGE)
    asked = rates.by_kind.get(contract.GENERATE)
    kept = judged.get(Ledger.PAIRS_JUDGED) / asked.get(Ledger.PROMPTS) if judged and asked and asked.get(
        Ledger.PROMPTS) else 1.0
    scored_per_prompt = judged.get(Ledger.TOKENS_SCORED) / asked.get(Ledger.PROMPTS) if judged and asked and \
        asked.get(Ledger.PROMPTS) else 0.0
    pairs = prompts * kept
    units[contract.GENERATE] = tokens
    units[contract.JUDGE] = prompts * scored_per_prompt
    units[contract.TRAIN] = pairs * t.epochs_per_iteration
    lines.append(Line("tokens generated", f"~{_n(tokens)}", f"{per_answer:.1f} per answer in {rates.root}"))
    lines.append(Line("pairs judged", f"~{_n(pairs)}", f"{kept:.1%} of prompts kept in {rates.root}"))
    lines.append(Line("pairs trained", f"~{_n(seed_pairs + pairs * t.epochs_per_iteration)}",
                      f"seed x {t.seed_epochs:g} epochs + judged pairs x {t.epochs_per_iteration:g}"))
    for key, label in ((Ledger.ACCELERATOR_SECONDS, "GPU-hours"), (Ledger.CPU_SECONDS, "CPU-hours")):
        seconds, missing = 0.0, set()
        for kind, n in count.items():
            if kind in SCALES_WITH:  # per unit of work, times the plan's units of the kind
                rate = rates.ratio(kind, key, SCALES_WITH[kind])
                value = None if rate is None else rate * units.get(kind, 0.0)
            else:
                each = rates.per_stage(kind, key)
                value = None if each is None else each * n
            if value is None:
                missing.add(kind)
            else:
                seconds += value
        note = f"at the rates of {rates.root}" + (f"; no rate for {', '.join(sorted(missing))}" if missing else "")
        lines.append(Line(label, f"~{seconds / 3600:.3g}", note))
    return lines


def count_gold(spec: AlignmentRunSpec) -> dict[str, int | None]:
    """Rows of the seed and held-out files where they are local (S3 files are left to the validate stage)."""
    from spa_workers.data import read_records

    out: dict[str, int | None] = {}
    for name, uri in (("seed", spec.data.seed), ("heldout", spec.data.heldout)):
        if uri and not storage.is_s3(uri) and "://" not in uri.replace("file://", ""):
            try:
                out[name] = len(read_records(uri))
            except StageInputError:
                out[name] = None
        else:
            out[name] = None
    return out
