"""The ETA estimator (operator/spa_operator/eta.py), a pure function: the time model it documents, stage by stage.

Numbers below are worked by hand from the model in eta.py's docstring:
    stage time = gap + in-worker overhead of its kind + work / rate of its kind.
"""

from __future__ import annotations

import pytest
from spa_operator import eta
from spa_operator.eta import DONE, PENDING, RUNNING, StageClock
from spa_workers.contract import Ledger

L = Ledger


def plan(prompts=(10, 20), done_through: int = 1, parallel_eval: bool = True) -> list[StageClock]:
    """A 2-iteration plan; iteration 0 and the stages of iterations <= done_through finished with known figures:
    gap 1 s everywhere; generate 100 tokens/s after 2 s of loading, 100 tokens a prompt; judge 500 tokens/s after
    1 s, 400 tokens a prompt; train 2 pairs/s after 2 s, one pair a prompt; evaluate 3 s; validate 2 s; seed 5 s."""
    out = [StageClock("iter-00/validate", "validate", 0, (), 0, DONE, 3.0, 2.0),
           StageClock("iter-00/seed-train", "seed-train", 0, ("iter-00/validate",), 0, DONE, 6.0, 5.0, 4.0,
                      {L.PAIRS_TRAINED: 8}),
           StageClock("iter-00/evaluate", "evaluate", 0, ("iter-00/seed-train",), 0, DONE, 4.0, 3.0)]
    prev = "iter-00/seed-train"
    for i, n in enumerate(prompts, start=1):
        k = f"iter-{i:02d}"
        deps = {"generate": (prev,), "judge": (f"{k}/generate",), "train": (f"{k}/judge",),
                "evaluate": (f"{k}/train",)}
        if i <= done_through:
            out += [
                StageClock(f"{k}/generate", "generate", i, deps["generate"], n, DONE, 1 + 2 + n, 2 + n, n,
                           {L.TOKENS_GENERATED: 100 * n, L.PROMPTS: n}),
                StageClock(f"{k}/judge", "judge", i, deps["judge"], n, DONE, 1 + 1 + 0.8 * n, 1 + 0.8 * n, 0.8 * n,
                           {L.TOKENS_SCORED: 400 * n, L.PAIRS_JUDGED: n}),
                StageClock(f"{k}/train", "train", i, deps["train"], n, DONE, 1 + 2 + n / 2, 2 + n / 2, n / 2,
                           {L.PAIRS_TRAINED: n}),
                StageClock(f"{k}/evaluate", "evaluate", i, deps["evaluate"], 0, DONE, 4.0, 3.0)]
        else:
            out += [StageClock(f"{k}/{s}", s, i, deps[s], n if s != "evaluate" else 0)
                    for s in ("generate", "judge", "train", "evaluate")]
        prev = f"{k}/train"
    return out


# the remaining stages of iteration 2 (20 prompts), each worked by hand
GEN2 = 1 + 2 + 100 * 20 / 100  # 23
JUDGE2 = 1 + 1 + 400 * 20 / 500  # 18
TRAIN2 = 1 + 2 + 20 / 2  # 13
EVAL2 = 1 + 3  # 4


SPENT = 3 + 6 + 4 + 13 + 10 + 8 + 4  # the finished stages' durations


def test_sequential_remaining_is_the_sum_of_the_stages_left():
    est = eta.estimate(plan(), parallel=False)
    assert est.remaining_s == pytest.approx(GEN2 + JUDGE2 + TRAIN2 + EVAL2)
    assert est.percent == int(100 * SPENT / (SPENT + GEN2 + JUDGE2 + TRAIN2 + EVAL2))
    assert est.unknown_kinds == ()


def test_parallel_remaining_is_the_longest_chain():
    """On a cluster iteration 1's evaluate runs beside iteration 2's generate: only the chain counts."""
    stages = plan()
    stages[6] = StageClock("iter-01/evaluate", "evaluate", 1, ("iter-01/train",), 0, RUNNING, 1.0)  # 3 s left
    est = eta.estimate(stages, parallel=True)
    assert est.remaining_s == pytest.approx(GEN2 + JUDGE2 + TRAIN2 + EVAL2)
    seq = eta.estimate(stages, parallel=False)
    assert seq.remaining_s == pytest.approx(GEN2 + JUDGE2 + TRAIN2 + EVAL2 + 3.0)


def test_unknown_until_a_stage_of_every_kind_left_has_finished():
    stages = plan(done_through=0)
    est = eta.estimate(stages, parallel=True)
    assert est.remaining_s is None and est.unknown_kinds == ("generate", "judge", "train")
    assert est.percent == int(100 * 3 / len(stages))  # by stages done meanwhile
    # generate and judge of iteration 1 done: train still unmeasured
    full = plan(done_through=1)
    partial = [*full[:5], StageClock("iter-01/train", "train", 1, ("iter-01/judge",), 10), *plan(done_through=0)[6:]]
    assert eta.estimate(partial, parallel=True).unknown_kinds == ("train",)
    # a kind that no stage left needs is not waited for: only evaluate left, measured
    last = [StageClock(s.key, s.kind, s.iteration, s.depends_on, s.prompts, DONE, s.seconds or 4.0,
                       s.wall_s or 3.0, s.work_s, s.ledger) if s.key != "iter-02/evaluate" else s
            for s in plan(done_through=1)[:7]] + [StageClock("iter-02/evaluate", "evaluate", 2, ())]
    assert eta.estimate(last, parallel=True).remaining_s == pytest.approx(EVAL2)


def test_a_running_stage_counts_what_it_has_left_never_less_than_nothing():
    stages = plan()
    stages[7] = StageClock("iter-02/generate", "generate", 2, ("iter-01/train",), 20, RUNNING, 20.0)
    est = eta.estimate(stages, parallel=False)
    assert est.remaining_s == pytest.approx(GEN2 - 20.0 + JUDGE2 + TRAIN2 + EVAL2)
    stages[7] = StageClock("iter-02/generate", "generate", 2, ("iter-01/train",), 20, RUNNING, 500.0)  # overran
    assert eta.estimate(stages, parallel=False).remaining_s == pytest.approx(JUDGE2 + TRAIN2 + EVAL2)


def test_train_scales_by_the_pairs_its_judge_really_kept():
    stages = plan()
    # iteration 2's generate and judge done; the judge kept 12 of 20 prompts
    stages[7] = StageClock("iter-02/generate", "generate", 2, ("iter-01/train",), 20, DONE, 23.0, 22.0, 20.0,
                           {L.TOKENS_GENERATED: 2000, L.PROMPTS: 20})
    stages[8] = StageClock("iter-02/judge", "judge", 2, ("iter-02/generate",), 20, DONE, 18.0, 17.0, 16.0,
                           {L.TOKENS_SCORED: 8000, L.PAIRS_JUDGED: 12})
    est = eta.estimate(stages, parallel=False)
    # iteration 1 trained one pair per judged pair (1 epoch): 12 pairs at 2 pairs/s after 2 s, gap 1 s
    assert est.remaining_s == pytest.approx((1 + 2 + 12 / 2) + EVAL2)


def test_rates_pool_every_finished_stage_and_work_per_prompt_follows_the_latest():
    """Three iterations: answers grew longer in iteration 2 (200 tokens a prompt), so iteration 3's generate expects
    200 tokens a prompt, at the rate pooled over both finished generates."""
    stages = plan(prompts=(10, 20, 30), done_through=2)
    gen2 = stages[7]
    stages[7] = StageClock(gen2.key, gen2.kind, 2, gen2.depends_on, 20, DONE, 1 + 2 + 20, 2 + 20, 20.0,
                           {L.TOKENS_GENERATED: 4000, L.PROMPTS: 20})
    rate = (1000 + 4000) / (10 + 20)  # tokens/s pooled
    gen3 = 1 + 2 + 200 * 30 / rate
    judge3 = 1 + 1 + 400 * 30 / 500
    train3 = 1 + 2 + 30 / 2
    est = eta.estimate(stages, parallel=False)
    assert est.remaining_s == pytest.approx(gen3 + judge3 + train3 + EVAL2, abs=0.1)


def test_gap_is_the_mean_over_stages_the_executor_timed():
    """Stages whose executor duration is unknown (a resumed `spa run` that did not see them) add no gap sample."""
    stages = [StageClock(s.key, s.kind, s.iteration, s.depends_on, s.prompts, s.state,
                         (s.seconds or 0) + 2 if s.key == "iter-01/train" else None if s.state == DONE else s.seconds,
                         s.wall_s, s.work_s, s.ledger) for s in plan()]
    # only iteration 1's train was timed: its gap is 1 + 2 = 3 s, applied to every stage left
    est = eta.estimate(stages, parallel=False)
    assert est.remaining_s == pytest.approx(GEN2 + JUDGE2 + TRAIN2 + EVAL2 + 4 * 2)


def test_finished_run_and_empty_plan():
    stages = [StageClock(s.key, s.kind, s.iteration, s.depends_on, s.prompts, DONE, 1.0, 1.0, None, {})
              for s in plan(done_through=1)[:7]]
    assert eta.estimate(stages, parallel=True) == eta.Estimate(0.0, 100)
    assert eta.estimate([], parallel=True) == eta.Estimate(0.0, 100)


def test_percent_stays_below_100_until_every_stage_is_done():
    stages = plan(done_through=2)
    stages[-1] = StageClock("iter-02/evaluate", "evaluate", 2, ("iter-02/train",), 0, RUNNING, 1e6)  # overran
    est = eta.estimate(stages, parallel=False)
    assert (est.remaining_s, est.percent) == (0.0, 99)


@pytest.mark.parametrize(("seconds", "text"), [(None, "unknown"), (0, "0s"), (44.6, "45s"), (60, "1m"),
                                                (3599, "59m"), (3600, "1h00m"), (11100, "3h05m"),
                                                (86400 + 4 * 3600, "1d04h")])
def test_human(seconds, text):
    assert eta.human(seconds) == text


def test_pending_stage_of_a_kind_without_work_figures_is_unknown():
    """A generate that counted no tokens (an old manifest) cannot give a rate: unknown, not zero."""
    stages = plan()
    gen1 = stages[3]
    stages[3] = StageClock(gen1.key, gen1.kind, 1, gen1.depends_on, 10, DONE, 13.0, 12.0, None, {})
    assert eta.estimate(stages, parallel=True).unknown_kinds == ("generate",)
    assert PENDING == "pending"


def test_percent_is_the_stages_time_done_over_done_and_left_with_no_clock():
    """Stages not seen by this executor count their wall time (a resumed `spa run` does not restart at 0); a running
    stage counts the fraction its heartbeat reported, so the figures change with events, not with the clock."""
    stages = [StageClock(s.key, s.kind, s.iteration, s.depends_on, s.prompts, s.state,
                         None if s.key == "iter-00/validate" else s.seconds, s.wall_s, s.work_s, s.ledger)
              for s in plan()]
    spent = SPENT - 3 + 2  # validate: its wall time, 2 s
    # the gap is now measured on the six timed stages: still 1 s
    assert eta.estimate(stages, parallel=False).percent == int(100 * spent / (spent + GEN2 + JUDGE2 + TRAIN2 + EVAL2))
    stages[7] = StageClock("iter-02/generate", "generate", 2, ("iter-01/train",), 20, RUNNING, fraction=0.25)
    est = eta.estimate(stages, parallel=False)
    assert est.remaining_s == pytest.approx(0.75 * GEN2 + JUDGE2 + TRAIN2 + EVAL2, abs=0.05)
    assert est.percent == int(100 * (spent + 0.25 * GEN2) / (spent + GEN2 + JUDGE2 + TRAIN2 + EVAL2))
    assert eta.estimate(stages, parallel=False) == est  # the same observations, the same figures
